"""The command line through subprocess: train, eval, synth, bench flops, and one-line user errors."""

import json
import subprocess
import sys

import yaml
from PIL import Image


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "faceforge", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_train_then_eval(tiny_config, tmp_path):
    cfg = tiny_config(train={"max_steps": 3, "run_name": "cli"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    done = _run("train", str(path), "optim.lr=0.02")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    bin_path = cfg.data.val_bins[0]
    shown = _run("eval", summary["run_dir"], "--bin", bin_path, "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout.strip().splitlines()[-1])
    assert rows[0]["set"] == "val" and rows[0]["pairs"] == 20
    assert rows[0]["accuracy"] == summary["eval"]["val"]["accuracy"]
    weights = sorted((tmp_path / "runs" / "cli" / "checkpoints").glob("*.safetensors"))[-1]
    assert _run("eval", str(weights), "--bin", bin_path).returncode == 0
    resumed = _run("train", "--resume", summary["run_dir"], "train.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == 4


def test_user_errors_are_one_line(tiny_config, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config().to_dict()))
    cases = [
        (("train", str(path), "train.bach_size=4"), "unknown config key 'train.bach_size'"),
        (("train", str(tmp_path / "missing.yaml")), "config file not found"),
        (("eval", str(tmp_path / "nothing.safetensors"), "--bin", "x.bin"), "model not found"),
        (("bench", "flops", "--backbone", "r51"), "unknown backbone 'r51'"),
    ]
    for args, message in cases:
        done = _run(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr


def test_bench_flops():
    done = _run("bench", "flops", "--backbone", "r50")
    assert done.returncode == 0, done.stderr
    assert abs(json.loads(done.stdout)["gflops"] - 12.62) < 0.1


def test_pack_folder_then_train_on_folder_and_rec(tiny_data, tiny_config, tmp_path):
    from faceforge.data.record_dataset import RecordDataset

    source = RecordDataset(tiny_data)
    folder = tmp_path / "faces"
    for i in range(len(source)):
        image, label = source.read(i)
        (folder / f"id{label:03d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"id{label:03d}" / f"{i}.png")
    packed = _run("pack", str(folder), str(tmp_path / "packed"), "--workers", "2")
    assert packed.returncode == 0, packed.stderr
    assert json.loads(packed.stdout)["images"] == len(source)
    repacked = RecordDataset(tmp_path / "packed")
    assert repacked.num_classes == source.num_classes and list(repacked.labels) == list(source.labels)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("id000/0.png id000/1.png 1\nid000/0.png id001/6.png 0\n")
    done = _run("pack-bin", str(pairs), str(tmp_path / "p.bin"), "--root", str(folder))
    assert done.returncode == 0 and json.loads(done.stdout)["pairs"] == 2, done.stderr
    for root in (folder, tmp_path / "packed"):
        cfg = tiny_config(data={"root": str(root)}, train={"max_steps": 2, "run_name": root.name})
        path = tmp_path / f"{root.name}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        trained = _run("train", str(path))
        assert trained.returncode == 0, trained.stderr


def test_synth_command(tmp_path):
    args = ["--identities", "4", "--images-per-id", "3", "--eval-identities", "20", "--eval-images-per-id", "3",
            "--pairs", "40", "--seed", "5", "--workers", "1"]
    done = _run("synth", str(tmp_path / "sf"), *args)
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout.strip().splitlines()[-1])
    assert meta["counts"]["train_images"] == 12 and meta["counts"]["pairs"] == 40 and meta["params"]["seed"] == 5
    assert (tmp_path / "sf" / "train" / "train.rec").is_file() and (tmp_path / "sf" / "heldout.bin").is_file()


def test_bench_train_synthetic_and_records(tiny_data):
    base = ["bench", "train", "--backbone", "tiny", "--embedding-size", "16", "--num-classes", "8", "--batch", "8",
            "--warmup", "1", "--steps", "2"]
    for extra in ([], ["--data", str(tiny_data), "--workers", "0"]):
        done = _run(*base, *extra)
        assert done.returncode == 0, done.stderr
        row = json.loads(done.stdout)
        assert row["img_s"] > 0 and row["steps"] == 2 and row["peak_memory_gb"] > 0
        assert row["data"] == (extra[1] if extra else "synthetic-on-device")
