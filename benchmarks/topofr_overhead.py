"""TopoFR's cost: the training step with and without it, its parts alone, and persistence0 by batch size.

Prints one JSON line per case. Step cases alternate plain / TopoFR rounds so that drift in machine load hits both.
Usage: python benchmarks/topofr_overhead.py [--device auto] [--backbone tiny] [--batch 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch

from faceforge.config import config_from_dict
from faceforge.engine.step import build_parts, optimisation_step
from faceforge.regularizers import TopoFR
from faceforge.runtime import pick_device, synchronize
from faceforge.topology import persistence0


def _seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Mean seconds per call over `repeat` calls, device synchronised at both ends."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def _machine(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__}


def step_cases(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """ms per optimisation step, plain head vs head + TopoFR (paper loss, SDE on), median over rounds."""
    runs = {}
    for name, regs in (("plain", []), ("topofr", [{"name": "topofr", "loss": args.loss}])):
        cfg = config_from_dict({
            "backbone": {"name": args.backbone, "embedding_size": args.embedding_size},
            "head": {"name": args.head},
            "regularizers": regs,
            "train": {"batch_size": args.batch, "device": str(device)},
        })
        torch.manual_seed(0)
        parts = build_parts(cfg, args.num_classes, device)
        fmt = torch.channels_last if parts.channels_last else torch.contiguous_format
        x = (torch.rand(args.batch, 3, 112, 112, device=device) * 2 - 1).contiguous(memory_format=fmt)
        y = torch.randint(0, args.num_classes, (args.batch,), device=device)
        for _ in range(args.warmup):
            optimisation_step(parts, x, y)
        runs[name] = (parts, x, y, [])
    for _ in range(args.rounds):
        for parts, x, y, times in runs.values():
            times.append(_seconds(lambda: optimisation_step(parts, x, y), device, args.steps))
    base = statistics.median(runs["plain"][3])
    rows = []
    for name, (*_, times) in runs.items():
        ms = 1000 * statistics.median(times)
        rows.append({"bench": "topofr_step", "case": name, "backbone": args.backbone, "head": args.head,
                     "num_classes": args.num_classes, "batch": args.batch, "loss": args.loss,
                     "ms_step": round(ms, 2), "ms_step_rounds": [round(1000 * t, 1) for t in times],
                     "overhead_pct": round(100 * (ms / (1000 * base) - 1), 1)})
    return rows


def part_cases(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """TopoFR's pieces alone at the step's shapes: perturbation, alignment (both losses), SDE."""
    from faceforge.heads import build_head

    torch.manual_seed(0)
    head = build_head(args.head, args.embedding_size, args.num_classes).to(device)
    x = torch.rand(args.batch, 3, 112, 112, device=device) * 2 - 1
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    z = torch.randn(args.batch, args.embedding_size, device=device, requires_grad=True)
    out = head(z, y)
    batch = {"images": x, "inputs": x, "labels": y}
    cases = {
        "perturb": lambda: TopoFR().perturb(x, y),
        "align_paper+backward": lambda: TopoFR(loss="paper", sde=False)(batch, z, out).loss.backward(),
        "align_official+backward": lambda: TopoFR(loss="official", sde=False)(batch, z, out).loss.backward(),
        "align_paper+sde": lambda: TopoFR(loss="paper")(batch, z, out),
    }
    rows = []
    for name, fn in cases.items():
        fn()
        rows.append({"bench": "topofr_part", "case": name, "batch": args.batch,
                     "ms": round(1000 * _seconds(fn, device, args.part_repeat), 3)})
    return rows


def persistence_cases(sizes: list[int], device: torch.device, repeat: int) -> list[dict]:
    """persistence0 on one B×B distance matrix (random 512-d points) and on a stack of two, as TopoFR calls it."""
    rows = []
    for n in sizes:
        pts = torch.randn(2, n, 512, device=device)
        dist = torch.cdist(pts, pts)
        for label, d in (("one", dist[0]), ("stack2", dist)):
            persistence0(d)
            reps = max(1, repeat * 128 // n)
            rows.append({"bench": "persistence0", "n": n, "matrices": label,
                         "ms": round(1000 * _seconds(lambda: persistence0(d), device, reps), 3), "repeat": reps})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default=None, help="default: r50 on GPU, tiny on CPU")
    parser.add_argument("--head", default="arcface")
    parser.add_argument("--num_classes", type=int, default=10_000)
    parser.add_argument("--embedding_size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--loss", default="paper", choices=["paper", "official"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part_repeat", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--skip_steps", action="store_true", help="only the parts and persistence0")
    args = parser.parse_args()
    device = pick_device(args.device)
    args.backbone = args.backbone or ("r50" if device.type == "cuda" else "tiny")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    machine = _machine(device)
    rows = [] if args.skip_steps else step_cases(args, device)
    rows += part_cases(args, device) + persistence_cases(args.sizes, device, args.part_repeat)
    for row in rows:
        print(json.dumps({**row, **machine}), flush=True)


if __name__ == "__main__":
    main()
