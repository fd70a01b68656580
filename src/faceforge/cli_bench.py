"""`faceforge bench flops | train | head | head-step`: measurements from the command line. The train flags stand for config keys
and show the config's own defaults; warm-up and timed step counts and the head-memory plan's defaults are the
flags' (bench_train and plan_head_memory take every value explicitly)."""

from __future__ import annotations

import argparse
import json
import typing

from faceforge.config import Config, OptimConfig, TrainConfig
from faceforge.errors import ConfigError


def cmd_bench_flops(args: argparse.Namespace) -> int:
    from faceforge.backbones import build_backbone, count_flops

    model = build_backbone(args.backbone, embedding_size=args.embedding_size)
    flops = count_flops(model)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"backbone": args.backbone, "gflops": round(flops / 1e9, 3), "params_m": round(params / 1e6, 3)}))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from faceforge.config import Config, config_from_dict, load_config
    from faceforge.engine.bench import bench_train

    keys = {  # flag -> the config key it overrides, on top of --config and the positional overrides
        "backbone": "backbone.name", "embedding_size": "backbone.embedding_size", "head": "head.name",
        "num_classes": "head.num_classes", "sample_rate": "head.sample_rate", "batch": "train.batch_size",
        "dtype": "train.precision", "device": "train.device", "workers": "data.num_workers",
    }
    flags = [f"{key}={getattr(args, name)}" for name, key in keys.items() if getattr(args, name) is not None]
    if args.compile:
        flags.append("train.compile=true")
    overrides = [*args.overrides, *flags]
    # Without a file, the overrides apply to the defaults in full (a bare `head.m=...` keeps head.name).
    cfg = load_config(args.config, overrides) if args.config else config_from_dict(Config().to_dict(), overrides)
    print(json.dumps(bench_train(cfg, warmup=args.warmup, steps=args.steps, data=args.data)))
    return 0


def _head_params(args: argparse.Namespace) -> dict:
    """The head's other parameters the flags set: UNPG's k, GIF's vocabulary and joint mode."""
    if args.head == "gif":
        if args.unpg is not None:
            raise ConfigError("--unpg wraps a softmax-family head, not gif")
        if args.gif_joint and args.gif_codes_only:
            raise ConfigError("--gif-joint trains the code vectors, which --gif-codes-only leaves out")
        return {"joint": args.gif_joint, **({} if args.v is None else {"v": args.v}),
                **({"gamma": 0.0} if args.gif_codes_only else {})}
    if args.gif_joint or args.gif_codes_only:
        raise ConfigError(f"--gif-joint and --gif-codes-only are for --head gif, not {args.head}")
    return {} if args.unpg is None else {"unpg": {"k": args.unpg}}


def cmd_bench_head(args: argparse.Namespace) -> int:
    from faceforge.engine.head_memory import plan_head_memory

    params = _head_params(args)
    for n in args.num_classes:
        for k in args.world_size:
            print(json.dumps(plan_head_memory(
                n, k, batch_per_rank=args.batch, embedding_size=args.embedding_size, optimizer=args.optimizer,
                sample_rate=args.sample_rate, head=args.head, head_params=params, device=args.device,
            )))
    return 0


def cmd_bench_head_step(args: argparse.Namespace) -> int:
    from faceforge.engine.bench import bench_head_step

    print(json.dumps(bench_head_step(
        args.head, args.num_classes, args.sample_rate, args.batch, args.embedding_size, args.steps, args.device,
        args.optimizer, args.warmup, head_params=_head_params(args), memory=args.memory,
    )))
    return 0


def _add_head_flags(q: argparse.ArgumentParser, d: Config) -> None:
    """The head flags `bench head` and `bench head-step` share."""
    q.add_argument("--head", default=d.head["name"])
    q.add_argument("--batch", type=int, default=128, help="images per process")
    q.add_argument("--embedding-size", type=int, default=512)
    q.add_argument("--optimizer", choices=_choices(OptimConfig, "name"), default=d.optim.name)
    q.add_argument("--sample-rate", type=float, default=1.0, help="PartialFC fraction of the other classes")
    q.add_argument("--unpg", type=float, metavar="K", help="wrap the head in UNPG with Tukey fence k = K")
    q.add_argument("--v", type=int, help="--head gif: vocabulary size of the random codes (default 16)")
    q.add_argument("--gif-joint", action="store_true", help="--head gif: train the code vectors too")
    q.add_argument("--gif-codes-only", action="store_true",
                   help="--head gif: no [N, D] code vectors (no pull term), what must fit at any N")
    q.add_argument("--device", default="cpu", help="where the step runs (bench head: where the plan probes it)")


def _choices(table: type, key: str) -> list[str]:
    """The choices a config field's Literal type declares."""
    return list(typing.get_args(typing.get_type_hints(table)[key]))


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """The `bench` command and its four sub-commands."""
    d = Config()
    p = sub.add_parser("bench", help="measurements (see also benchmarks/)")
    bench = p.add_subparsers(dest="what", required=True)
    q = bench.add_parser("flops", help="forward GFLOPs per 112x112 image and parameter count")
    q.add_argument("--backbone", required=True)
    q.add_argument("--embedding-size", type=int, default=512)
    q.set_defaults(func=cmd_bench_flops)
    q = bench.add_parser("train", help="img/s, ms/step and peak memory of the real training step, from a training "
                                       "config or flags")
    q.add_argument("overrides", nargs="*", help="config overrides key=value, all in one run of words (e.g. right "
                                                "after --config FILE): head.unpg.k=1.5 head.sample_rate=0.1")
    q.add_argument("--config", help="CONFIG.yaml as `faceforge train` takes it (default: the config defaults)")
    q.add_argument("--backbone", help=f"backbone.name (default {d.backbone['name']})")
    q.add_argument("--head", help=f"head.name (default {d.head['name']})")
    q.add_argument("--num-classes", type=int, help="head.num_classes (default: a GIF head's codes decide, "
                                                   "else 93431)")
    q.add_argument("--sample-rate", type=float, help="head.sample_rate (PartialFC fraction of the other classes)")
    q.add_argument("--batch", type=int, help=f"train.batch_size (default {d.train.batch_size})")
    q.add_argument("--dtype", choices=_choices(TrainConfig, "precision"), help=f"train.precision (default {d.train.precision})")
    q.add_argument("--compile", action="store_true", help="train.compile=true: torch.compile the backbone")
    q.add_argument("--device", help=f"train.device (default {d.train.device})")
    q.add_argument("--embedding-size", type=int, help="backbone.embedding_size (default 512)")
    q.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    q.add_argument("--steps", type=int, default=40, help="timed steps")
    q.add_argument("--data", help="a train.rec folder to read through the real loader (default: synthetic on device)")
    q.add_argument("--workers", type=int, help=f"data.num_workers: loader workers with --data (default {d.data.num_workers})")
    q.set_defaults(func=cmd_bench_train)
    q = bench.add_parser("head", help="per-rank peak memory of a head's training step (centres or codes, "
                                      "gradients, optimizer state, logits, temporaries), planned from a probe")
    q.add_argument("--num-classes", type=int, nargs="+", required=True)
    q.add_argument("--world-size", type=int, nargs="+", default=[1])
    _add_head_flags(q, d)
    q.set_defaults(func=cmd_bench_head)
    q = bench.add_parser("head-step", help="ms per step and peak memory of the trainer's head path: forward, "
                                           "backward and the update, on a stand-in backbone")
    q.add_argument("--num-classes", type=int, required=True)
    _add_head_flags(q, d)
    q.add_argument("--steps", type=int, default=10, help="timed steps")
    q.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    q.add_argument("--memory", action="store_true", help="then one more step under the live-tensor tracker: its "
                                                         "peak next to the plan's (bench head) and their ratio")
    q.set_defaults(func=cmd_bench_head_step)
