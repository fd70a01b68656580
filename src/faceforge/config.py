"""Typed run configuration: YAML file + dotted `key=value` overrides, validated with errors that name the key."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from faceforge.errors import ConfigError


@dataclass
class DataConfig:
    """Where training and validation data come from and how it is read."""

    root: str = "synthface"  # train.rec/.idx/property folder, image folder (one sub-folder per identity), or "synthface"
    val_bins: list[str] = field(default_factory=list)  # verification .bin files; empty + synthface -> heldout.bin
    in_memory: bool = False  # decode every training image once into RAM (small sets, CPU training)
    num_workers: int = 4
    resize: bool = False  # resize images that are not 112x112 instead of refusing them
    on_corrupt: Literal["raise", "skip"] = "raise"  # skip: drop undecodable records (counted) instead of stopping
    flip: bool = True  # random horizontal flip


@dataclass
class SynthFaceConfig:
    """Size and seed of the SynthFace set used when data.root is 'synthface'."""

    cache_dir: str = ".cache/synthface"
    identities: int = 1500
    images_per_id: int = 12
    eval_identities: int = 600
    eval_images_per_id: int = 10
    pairs: int = 6000
    seed: int = 0
    nuisance: float = 0.75


@dataclass
class OptimConfig:
    """Optimizer settings (SGD with momentum, or AdamW)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    grad_clip: float = 5.0  # max global grad norm of the backbone; 0 disables
    # Fused kernels (null: on CUDA). They also skip a non-finite step on the device, without a host sync.
    fused: bool | None = None


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over training progress in [0, 1] (steps, or wall-clock with a time budget)."""

    name: Literal["poly", "cosine"] = "poly"
    warmup: float = 0.0  # fraction of training spent in linear warm-up
    power: float = 1.0  # poly exponent
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    """Loop length, precision, seeding and what the run folder receives."""

    batch_size: int = 128
    epochs: int = 20
    max_steps: int = 0  # > 0 overrides epochs
    time_budget_s: float = 0.0  # > 0: stop after this many seconds; the schedule follows elapsed time
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: GPU bf16 where native, else fp16; CPU fp32
    # NHWC activations: auto = on a GPU. YAML true / false are read as "true" / "false".
    channels_last: bool | Literal["auto"] = "auto"  # auto: on for CUDA
    compile: bool = False  # torch.compile the backbone (off by default until measured to help on the GPU)
    tf32: bool = True  # CUDA: TF32 for the backbone's fp32 matmuls and convolutions; heads always compute in fp32
    ddp_bucket_mb: float = 25.0  # torchrun: gradient all-reduce bucket size
    ddp_static_graph: bool = True  # torchrun: the backbone's graph is the same every step (true for ours)
    log_every: int = 20
    eval_every: int = 0  # steps between evaluations on data.val_bins; 0 = at the end only
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at the end only
    keep_checkpoints: int = 3  # newest checkpoints kept (older ones deleted once a new one is on disk); 0 = all
    max_bad_steps: int = 20  # abort after this many consecutive non-finite losses
    init_from: str = ""  # weights (.safetensors or run folder) to fine-tune from
    out_dir: str = "runs"
    run_name: str = ""
    progress_bar: bool = True
    dist_timeout_s: float = 600.0  # torchrun: a collective waiting longer than this (a rank died) ends the run


@dataclass
class Config:
    """A whole training run. `backbone`, `head` and each regularizer are `{name: ..., **params}` tables."""

    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "r50"})
    head: dict[str, Any] = field(default_factory=lambda: {"name": "arcface"})
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    synthface: SynthFaceConfig = field(default_factory=SynthFaceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_choice(value: Any, choices: tuple, key: str) -> Any:
    """`value` when it is one of the Literal's `choices`; a YAML bool matches the choice "true" / "false"."""
    if isinstance(value, bool) and "true" in choices:
        value = "true" if value else "false"
    if value in choices and not isinstance(value, bool):
        return value
    raise ConfigError(f"config key {key!r} must be one of {sorted(map(str, choices))}, got {value!r}")


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation` where lossless (int -> float), else raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return _check_choice(value, typing.get_args(annotation), key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__}")
        (inner,) = typing.get_args(annotation)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {type(value).__name__}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} has the wrong type: {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r} must be null")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
    else:
        return value
    raise ConfigError(f"config key {key!r} must be {annotation.__name__}, got {value!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(key, names)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} must be a mapping, got {type(value).__name__}")
            kwargs[key] = _build(annotation, value, f"{dotted}.")
        else:
            kwargs[key] = _check_type(value, annotation, dotted)
    return cls(**kwargs)


def _validate_components(cfg: Config) -> None:
    for key, table in [("backbone", cfg.backbone), ("head", cfg.head)] + [
        (f"regularizers[{i}]", r) for i, r in enumerate(cfg.regularizers)
    ]:
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise ConfigError(f"config key {key!r} must be a mapping with a string 'name'")


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` inside nested dicts, creating missing levels."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {'.'.join(parts[: i + 1])!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: typing.Sequence[str]) -> list[tuple[str, Any]]:
    """Parse `key.sub=value` strings; values are YAML scalars or lists (`m=0.4`, `val_bins=[a.bin,b.bin]`)."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def config_from_dict(raw: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a Config from a nested dict plus dotted overrides."""
    raw = copy.deepcopy(raw) if raw else {}
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping at the top level")
    for key, value in parse_overrides(overrides):
        set_dotted(raw, key, value)
    cfg = _build(Config, raw, "")
    _validate_components(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when path is None) and apply overrides."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p}{where} is not valid YAML") from None
    return config_from_dict(raw, overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, what each run folder stores as config.yaml."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
