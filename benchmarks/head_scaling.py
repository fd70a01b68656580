"""Head step time and peak memory against the number of identities N, through the trainer's own head path
(`faceforge bench head-step`: build_parts + train_step with a learnable [B, D] block for a backbone, forward,
backward and the update, the sampled-row update included): full ArcFace, ArcFace with PartialFC rate 0.1,
SphereFace2 sampled at 0.1, GIF with its code vectors and GIF with its codes only (no pull term, what must fit
at any N).

Each case runs in a fresh process (its peak memory is its own) with OMP_NUM_THREADS=--threads; a case whose
planned memory (`faceforge bench head`'s planner, engine/head_memory.py) exceeds the budget is not run and its
row says so. One JSON line per case.

Usage: python benchmarks/head_scaling.py [--sizes 1e4 1e5 1e6 1e7] [--batch 128] [--dim 512] [--max-gb 16]
       [--threads 1] [--out benchmarks/results/head_scaling]   (writes OUT.jsonl and OUT.png)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from faceforge.fileio import atomic_write

METHODS = {  # name -> bench head-step flags
    "arcface": ["--head", "arcface"],
    "arcface_pfc0.1": ["--head", "arcface", "--sample-rate", "0.1"],
    "sphereface2_pfc0.1": ["--head", "sphereface2", "--sample-rate", "0.1"],
    "gif": ["--head", "gif"],
    "gif_codes": ["--head", "gif", "--gif-codes-only"],
}


def planned_gib(method: str, n: int, batch: int, dim: int) -> float:
    """The planner's per-process peak for the case (it probes the real step at a small size and scales it)."""
    from faceforge.engine.head_memory import plan_head_memory

    flags = METHODS[method]
    head = flags[1]
    rate = float(flags[flags.index("--sample-rate") + 1]) if "--sample-rate" in flags else 1.0
    params = {"gamma": 0.0} if "--gif-codes-only" in flags else {}
    return plan_head_memory(n, 1, batch, dim, "sgd", rate, head, head_params=params)["total_gib"]


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


def run_case(method: str, n: int, args: argparse.Namespace) -> dict:
    """One `faceforge bench head-step` in a fresh process; a crash (the OOM killer) becomes a 'failed' row."""
    steps = max(2, args.steps if n < 1_000_000 else args.steps // 2)
    cmd = [sys.executable, "-m", "faceforge", "bench", "head-step", *METHODS[method], "--num-classes", str(n),
           "--batch", str(args.batch), "--embedding-size", str(args.dim), "--steps", str(steps), "--warmup", "1",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "reason": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return {"status": "ok", "command": " ".join(["faceforge", *cmd[3:]]), **json.loads(lines[-1])}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        done = sorted((r["n"], r) for r in rows if r["method"] == method and r["status"] == "ok")
        if done:
            ns = [n for n, _ in done]
            axes[0].plot(ns, [r["ms_per_step"] for _, r in done], "o-", label=method)
            axes[1].plot(ns, [r["peak_memory_gb"] for _, r in done], "o-", label=method)
    for ax, label in zip(axes, ("ms per head step", "peak RSS (GB)")):
        ax.set(xscale="log", yscale="log", xlabel="identities N", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    first = rows[0] if rows else {}
    axes[0].set_title(f"trainer's head step, B={first.get('batch')}, D={first.get('dim')}, CPU")
    axes[1].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (half of them from N = 1e6 on)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-gb", type=float, default=16.0, help="skip cases planned to need more")
    parser.add_argument("--out", help="write OUT.jsonl and OUT.png")
    args = parser.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes):
        for method in args.methods:
            plan = planned_gib(method, n, args.batch, args.dim)
            budget = min(args.max_gb, 0.8 * available_gib())
            row = {"bench": "head_scaling", "method": method, "n": n, "batch": args.batch, "dim": args.dim,
                   "threads": args.threads, "planned_gib": plan}
            if plan > budget:
                row.update(status="skipped", reason=f"planned {plan:.1f} GiB > budget {budget:.1f} GiB")
            else:
                row.update({**run_case(method, n, args), "bench": "head_scaling"})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        out = Path(args.out)
        atomic_write(out.with_suffix(".jsonl"), lambda tmp: Path(tmp).write_text(
            "".join(json.dumps(r) + "\n" for r in rows)))
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
