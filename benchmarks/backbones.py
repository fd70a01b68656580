"""Backbone cost: forward GFLOPs per 112x112 image, parameters, and CPU training img/s (fwd + bwd + SGD).

Prints one JSON line per backbone. Usage: python benchmarks/backbones.py [--backbones tiny r18 mbf] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from faceforge.backbones import build_backbone, count_flops


def train_images_per_second(model: torch.nn.Module, batch: int, steps: int) -> float:
    """Two warm-up steps, then the mean rate over `steps` timed steps of fwd + bwd + SGD, as the CPU trainer runs
    them (NCHW input; backbones that prefer NHWC on the CPU switch inside their forward)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 112, 112)
    for i in range(2 + steps):
        if i == 2:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=["tiny", "mbf", "r18", "r50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.backbones:
        model = build_backbone(name, embedding_size=128 if name == "tiny" else 512)
        row = {
            "bench": "backbone",
            "backbone": name,
            "gflops": round(count_flops(model) / 1e9, 3),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "batch": args.batch,
            "cpu_threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        }
        row["train_img_s"] = round(train_images_per_second(model, args.batch, args.steps), 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
