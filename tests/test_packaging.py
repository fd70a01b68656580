"""Packaging: requirements.lock pins exactly what the project's venv holds, the wheel's metadata only asks for lower
bounds (so it installs next to a user's CUDA torch), the recipes ship in the package, `faceforge --version`; and,
under `make wheel-check` only, the built wheel installed into a fresh venv that already holds torch."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import faceforge
from faceforge.cli import main

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Not dependencies of the project: the editable faceforge itself, and the venv's own installer.
NOT_LOCKED = {"faceforge", "pip"}


def read_lock(text: str) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines; anything else that is not a comment is an error."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if not match:
            raise ValueError(f"requirements.lock: not a name==version pin: {line!r}")
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def read_freeze(text: str) -> dict[str, str]:
    """{canonical name: version} from `pip freeze` output; a direct-URL install keeps its URL as the version."""
    installed = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")):
            continue
        if " @ " in line:
            name, url = line.split(" @ ", 1)
            installed[canonicalize_name(name)] = "@ " + url
        else:
            name, version = line.split("==", 1)
            installed[canonicalize_name(name)] = version
    return installed


def torch_build_closure() -> set[str]:
    """Everything the installed torch pulls in (nvidia-*, triton, ... for a CUDA build), by its own metadata."""
    seen, todo = set(), ["torch"]
    while todo:
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in map(Requirement, requires):
            name = canonicalize_name(req.name)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def compare(locked: dict[str, str], installed: dict[str, str], allowed_extra: set[str] = frozenset()) -> list[str]:
    """Differences between a lock and an environment, one line each; [] when they agree.

    `==X` is read as pip reads it, so the lock's `torch==2.13.0` is met by 2.13.0+cpu or 2.13.0+cu130."""
    problems = []
    for name in sorted(installed.keys() - locked.keys() - NOT_LOCKED - allowed_extra):
        problems.append(f"installed but not in the lock: {name}=={installed[name]}")
    for name in sorted(locked.keys() - installed.keys()):
        problems.append(f"in the lock but not installed: {name}=={locked[name]}")
    for name in sorted(locked.keys() & installed.keys()):
        have = installed[name]
        if have.startswith("@ ") or not SpecifierSet(f"=={locked[name]}").contains(have, prereleases=True):
            problems.append(f"{name}: lock has {locked[name]}, venv has {have}")
    return problems


def declared_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["onnx"] + extras["test"]]


def test_lock_pins_every_declared_dependency_within_its_bounds():
    pins = read_lock(LOCK.read_text())
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} (pyproject.toml) has no pin in requirements.lock: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, outside {req}"


def test_lock_is_portable():
    """The CPU torch by its plain version (so a CUDA build of it also satisfies the lock), nothing of a CUDA torch,
    and no index or find-links lines naming the machine the lock was made on."""
    text = LOCK.read_text()
    pins = read_lock(text)
    assert pins["torch"] == "2.13.0"
    assert not [n for n in pins if n.startswith("nvidia-") or n == "triton"]
    assert not re.search(r"^\s*(-f|-i|--find-links|--index-url|--extra-index-url)\b", text, re.M)
    assert "make lock" in text.split("\n\n", 1)[0], "requirements.lock is generated by `make lock`"


def test_compare_reports_each_kind_of_difference():
    locked = {"numpy": "2.4.6", "torch": "2.13.0", "scipy": "1.17.1"}
    assert compare(locked, {"numpy": "2.4.6", "torch": "2.13.0+cpu", "scipy": "1.17.1", "pip": "23.2.1"}) == []
    assert compare(locked, {"numpy": "2.4.6", "torch": "2.13.0+cu130", "scipy": "1.17.1"}) == []
    problems = compare(locked, {"numpy": "2.4.5", "torch": "2.13.0", "jinja2": "3.1.6"})
    assert problems == ["installed but not in the lock: jinja2==3.1.6", "in the lock but not installed: scipy==1.17.1",
                        "numpy: lock has 2.4.6, venv has 2.4.5"]
    assert compare({"torch": "2.13.0"}, {"torch": "2.14.0", "nvidia-nccl-cu13": "2.28"}, {"nvidia-nccl-cu13"}) == [
        "torch: lock has 2.13.0, venv has 2.14.0"]
    freeze = "# Editable install (faceforge==0.1.0)\n-e /src/faceforge\nJinja2==3.1.6\nfoo @ file:///tmp/foo.whl\n"
    assert read_freeze(freeze) == {"jinja2": "3.1.6", "foo": "@ file:///tmp/foo.whl"}
    with pytest.raises(ValueError, match="not a name==version pin"):
        read_lock("numpy>=2\n")


def test_project_venv_matches_the_lock():
    """`pip freeze` of the venv `make venv` built holds exactly the lock (bar faceforge and pip)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("not run from the project's .venv, which is what requirements.lock describes")
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    installed = read_freeze(freeze.stdout)
    # A CUDA build of the locked torch (README, GPU users) brings its own nvidia-* / triton packages.
    local = Version(installed.get("torch", "0").split("@")[0].strip() or "0").local
    allowed = torch_build_closure() - read_lock(LOCK.read_text()).keys() if local not in (None, "cpu") else set()
    problems = compare(read_lock(LOCK.read_text()), installed, allowed)
    assert not problems, ("the venv and requirements.lock disagree (rm -rf .venv && make venv; after editing "
                          "pyproject.toml, make lock):\n  " + "\n  ".join(problems))


def test_declared_dependencies_are_lower_bounds_only():
    """The wheel must install into an environment with its own (CUDA) torch without replacing it: no pins, no caps."""
    for req in declared_requirements():
        assert all(spec.operator == ">=" for spec in req.specifier), f"{req}: pyproject.toml takes lower bounds only"
    core = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    assert "torch" in core and not core & {"onnx", "onnxruntime", "onnxscript"}, "ONNX belongs to faceforge[onnx]"


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"faceforge {faceforge.__version__}\n"
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "faceforge.__version__"}


def test_recipes_ship_in_the_package():
    """configs/ is the package's configs folder, so every recipe the repo shows is package data in the wheel."""
    shipped = resources.files("faceforge") / "configs"
    names = sorted(p.name for p in shipped.iterdir() if p.name.endswith(".yaml"))
    assert "demo.yaml" in names and "ms1mv3_r50_arcface.yaml" in names
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == names
    assert (REPO / "configs").resolve() == (REPO / "src/faceforge/configs").resolve()
    assert "configs/*.yaml" in PYPROJECT["tool"]["setuptools"]["package-data"]["faceforge"]


def run(cmd: list, **kwargs) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.skipif(not os.environ.get("FACEFORGE_WHEEL_CHECK"),
                    reason="builds and installs the wheel into a new venv (minutes, needs the index): make wheel-check")
def test_wheel_installs_into_a_fresh_venv_next_to_torch(tmp_path):
    # Build from the tracked sources only, away from the repo's build/ and egg-info.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("faceforge-*.whl")
    assert wheel.name == f"faceforge-{faceforge.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
        metadata = zf.read(f"faceforge-{faceforge.__version__}.dist-info/METADATA").decode()
    recipes = {p.name for p in (REPO / "src/faceforge/configs").glob("*.yaml")}
    assert {f"faceforge/configs/{n}" for n in recipes} <= files
    assert "Requires-Dist: torch>=2.4\n" in metadata
    print(f"\n$ pip wheel --no-deps .\n{wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB, {len(files)} files")

    # A fresh venv that already holds a torch (here the CPU build this venv has; for a user, their CUDA build).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    py, exe = venv / "bin/python", venv / "bin/faceforge"
    run([py, "-m", "pip", "install", "--quiet", f"torch=={importlib.metadata.version('torch')}"])
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())

    def torch_install():
        (record,) = site.glob("torch-*.dist-info/RECORD")
        return record.parent.name, record.stat().st_mtime_ns

    before = torch_install()
    # The lock as constraints: the same versions as the project's venv, from pip's cache where it has them.
    run([py, "-m", "pip", "install", "--quiet", "--constraint", LOCK, wheel])
    assert torch_install() == before, "installing the wheel replaced the torch that was there"
    assert run([py, "-c", "import importlib.util as u; print(u.find_spec('onnx'))"]).strip() == "None", \
        "the core install pulled in onnx, which belongs to faceforge[onnx]"

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    work = tmp_path / "work"
    work.mkdir()
    print(f"$ pip install torch=={importlib.metadata.version('torch')}; pip install {wheel.name}\n"
          f"kept {before[0]}; onnx not installed")
    version = run([exe, "--version"], cwd=work, env=env)
    assert version.strip() == f"faceforge {faceforge.__version__}"
    usage = run([exe, "demo", "--help"], cwd=work, env=env)
    assert "usage: faceforge demo" in usage
    print(f"$ faceforge --version\n{version.strip()}\n$ faceforge demo --help\n{usage.splitlines()[0]}")
    recipe = Path(run([py, "-c", "from importlib import resources; "
                       "print(resources.files('faceforge') / 'configs' / 'synthface_arcface.yaml')"], cwd=work).strip())
    assert recipe.is_relative_to(site), f"the recipe came from {recipe}, not from the installed wheel"
    out = run([exe, "train", recipe, "synthface.identities=12", "synthface.images_per_id=4",
               "synthface.eval_identities=20", "synthface.eval_images_per_id=2", "synthface.pairs=20",
               "train.max_steps=2", "train.batch_size=16", "train.log_every=1", "train.progress_bar=false",
               "train.run_name=wheel-check"], cwd=work, env={**env, "OMP_NUM_THREADS": "2"})
    print(f"$ faceforge train .../site-packages/faceforge/configs/synthface_arcface.yaml train.max_steps=2 ...\n"
          f"{out.strip().splitlines()[-1]}")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and (work / "runs/wheel-check/summary.json").is_file()
