"""Cost of UNPG on a head step (forward + backward of the head alone): ArcFace with and without the wrapper.

    python benchmarks/unpg_cost.py                       # batch 512 and 8192, 10,000 classes on CPU
    python benchmarks/unpg_cost.py --classes 85742       # MS1MV2's class count (GPU)

Prints one JSON line per (batch, head). The two heads are timed in alternation, so a machine whose load drifts
slows both alike and the overhead ratio stays meaningful.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from faceforge.heads import build_head
from faceforge.runtime import pick_device


def step_seconds(head: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> float:
    if emb.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    emb.grad = None
    head.zero_grad(set_to_none=True)
    head(emb, labels).loss.backward()
    if emb.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_bytes(head: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> int | None:
    if not emb.is_cuda:
        return None
    torch.cuda.reset_peak_memory_stats()
    step_seconds(head, emb, labels)
    return torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per head (after one warm-up)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    for batch in args.batches:
        heads = {
            "arcface": build_head("arcface", args.dim, args.classes).to(device),
            "arcface+unpg": build_head("arcface", args.dim, args.classes, unpg={"k": 1.5}).to(device),
        }
        heads["arcface+unpg"].base.weight.data.copy_(heads["arcface"].weight.data)
        emb = torch.randn(batch, args.dim, device=device, requires_grad=True)
        labels = torch.randint(0, args.classes, (batch,), device=device)
        times: dict[str, list[float]] = {name: [] for name in heads}
        for name, head in heads.items():
            step_seconds(head, emb, labels)
        for _ in range(args.repeats):
            for name, head in heads.items():
                times[name].append(step_seconds(head, emb, labels))
        base_ms = 1000 * min(times["arcface"])
        for name, head in heads.items():
            ms = 1000 * min(times[name])
            print(json.dumps({
                "bench": "unpg_cost", "device": str(device), "batch": batch, "classes": args.classes, "dim": args.dim,
                "head": name, "ms_per_step": round(ms, 2), "overhead_pct": round(100 * (ms / base_ms - 1), 1),
                "negative_pairs": batch * (batch - 1) // 2, "peak_bytes": peak_bytes(head, emb, labels),
                "threads": torch.get_num_threads(),
            }), flush=True)


if __name__ == "__main__":
    main()
