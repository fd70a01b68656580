"""Head-only cost against the number of identities N: step time and peak memory of full softmax (ArcFace),
sampled softmax (ArcFace with PartialFC rate 0.1), SphereFace2 and GIF.

One step = head forward on random embeddings [B, D], backward, SGD with momentum over the head's parameters
(dense over all N centres for the sampled head, as arcface_torch's PartialFC). Each case runs in a fresh
subprocess so that its peak memory is its own; a case whose estimated memory exceeds the budget is not run and
prints a JSON line with the estimate instead. `gif` keeps codes and code vectors; `gif_codes` only the codes
(no γ term), the part that must stay in memory at any N.

Usage: python benchmarks/head_scaling.py [--sizes 1e4 1e5 1e6 1e7 1e8] [--batch 64] [--max-gb 8]
       [--out benchmarks/results/head_scaling]   (writes OUT.jsonl and OUT.png)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from faceforge.errors import ConfigError
from faceforge.fileio import atomic_write
from faceforge.heads import GIF, build_head
from faceforge.runtime import synchronize
from faceforge.tokenizer import code_length

METHODS = {
    "arcface": ("arcface", {}),
    "arcface_pfc0.1": ("arcface", {"sample_rate": 0.1}),
    "sphereface2": ("sphereface2", {}),
    "gif": ("gif", {}),
    "gif_codes": ("gif", {}),
}
GIF_V, GIF_HEAD_DIM = 16, 512
_CODE_CHUNK = 1 << 22


def estimate_bytes(method: str, n: int, batch: int, dim: int) -> int:
    """Upper estimate of the head's peak memory, fitted on measured peaks at N = 1e4 and 1e5 (CPU, fp32): about
    eight N×D tensors for a full head (centres, their gradient and momentum, the normalised copy and its
    gradient), four for the sampled head (which keeps a dense gradient), sixteen B×N logit temporaries, and
    GIF's codes (kept and built a chunk at a time) plus two copies of its code vectors."""
    if method.startswith("gif"):
        length = code_length(n, GIF_V)
        fixed = 3 * 4 * length * (GIF_HEAD_DIM * dim + GIF_V * GIF_HEAD_DIM)
        vectors = 2 * 4 * n * dim if method == "gif" else 0  # the caller's copy and the head's, while building
        return fixed + 2 * n * length + vectors + 4 * 8 * _CODE_CHUNK
    if method == "arcface_pfc0.1":
        return 4 * 4 * n * dim + 16 * 4 * batch * (n // 10 + batch) + 24 * n
    return 8 * 4 * n * dim + 16 * 4 * batch * n


def digit_codes(n: int, length: int) -> torch.Tensor:
    """Codes spelling 0..n-1 in base GIF_V (uint8): unique at any N, built a chunk at a time."""
    codes = torch.empty(n, length, dtype=torch.uint8)
    for start in range(0, n, _CODE_CHUNK):
        ids = torch.arange(start, min(start + _CODE_CHUNK, n))
        for j in range(length):
            codes[start : start + len(ids), j] = (ids // GIF_V ** (length - 1 - j)) % GIF_V
    return codes


def make_head(method: str, n: int, dim: int) -> torch.nn.Module:
    name, params = METHODS[method]
    if name != "gif":
        return build_head(name, dim, n, **params)
    codes = digit_codes(n, code_length(n, GIF_V))
    vectors = F.normalize(torch.randn(n, dim), dim=1) if method == "gif" else None
    return GIF(dim, codes, vectors, head_dim=GIF_HEAD_DIM, v=GIF_V)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(method: str, n: int, batch: int, dim: int, steps: int, device: str) -> dict:
    """Build the head, one warm-up step, then `steps` timed steps; median ms and peak extra memory."""
    dev = torch.device(device)
    base = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    head = make_head(method, n, dim).to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(1 + steps):
        x = torch.randn(batch, dim, generator=gen).to(dev).requires_grad_()
        y = torch.randint(n, (batch,), generator=gen).to(dev)
        synchronize(dev)
        start = time.perf_counter()
        loss = head(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(dev)
        if i:
            times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {
        "status": "ok",
        "ms_per_step": round(1000 * sorted(times)[len(times) // 2], 3),
        "peak_mb": round(peak, 1),
        "head_params": sum(p.numel() for p in head.parameters()),
    }


def budget_bytes(max_gb: float, device: str) -> int:
    """The smaller of --max-gb and 70% of the memory free now (RAM, or the GPU's)."""
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    return int(min(max_gb * 2**30, 0.7 * free))


def child(case: dict) -> dict:
    """Run one case in a fresh interpreter; a crash (e.g. the OOM killer) becomes a 'failed' row."""
    cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "reason": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        done = sorted((r["n"], r) for r in rows if r["method"] == method and r["status"] == "ok")
        if not done:
            continue
        ns = [n for n, _ in done]
        axes[0].plot(ns, [r["ms_per_step"] for _, r in done], "o-", label=method)
        axes[1].plot(ns, [max(r["peak_mb"], 1.0) for _, r in done], "o-", label=method)
    device = rows[0]["device"] if rows else ""
    for ax, label in zip(axes, ("ms per head step", "peak head memory (MB)")):
        ax.set(xscale="log", yscale="log", xlabel="identities N", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"head step, batch {rows[0]['batch']}, D={rows[0]['dim']} ({device})" if rows else "")
    axes[1].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip cases estimated to need more")
    parser.add_argument("--out", help="write OUT.jsonl and OUT.png")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        c = json.loads(args.case)
        try:
            print(json.dumps(run_case(c["method"], c["n"], c["batch"], c["dim"], c["steps"], c["device"])))
        except ConfigError as exc:
            print(json.dumps({"status": "skipped", "reason": str(exc)}))
        return
    rows = []
    for n in (int(s) for s in args.sizes):
        for method in args.methods:
            case = {"method": method, "n": n, "batch": args.batch, "dim": args.dim, "steps": args.steps,
                    "device": args.device}
            est, budget = estimate_bytes(method, n, args.batch, args.dim), budget_bytes(args.max_gb, args.device)
            row = {"bench": "head_scaling", **case, "est_mb": round(est / 2**20, 1)}
            if est > budget:
                row.update(status="skipped", reason=f"estimated {est / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB")
            else:
                row.update(child(case))
            row.update(threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                       torch=torch.__version__)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        out = Path(args.out)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(out.with_suffix(".jsonl"), lambda tmp: Path(tmp).write_text(text))
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
