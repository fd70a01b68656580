"""IJB-C-sized 1:1 scoring: template features -> 15.7M pair scores -> TAR at FAR 1e-6 ... 1e-1.

Synthetic data with IJB-C's shape: 23,124 unit 512-d templates (3,531 enrolment, 19,593 probe), 15,658,489 pairs
between the two (19,557 genuine). Times faceforge's blocked scorer and its linear-time TAR@FAR (both readings);
with --baselines also one gathered dot product per pair (the shape of InsightFace's eval_ijbc loop) and TAR@FAR
through scikit-learn's full roc_curve, checking that both paths agree.
Prints one JSON line per case. Usage: python benchmarks/ijb_scoring.py [--device cuda] [--baselines] [--scale 0.01]
(--scale: that fraction of IJB-C's pairs, for a quick check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import numpy as np
import torch

from faceforge.eval.ijb_scoring import score_pairs
from faceforge.eval.metrics import fast_tar_at_far, tar_at_far
from faceforge.runtime import timed

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
GALLERY, PROBES, PAIRS, GENUINE, DIM = 3_531, 19_593, 15_658_489, 19_557, 512


def ijbc_sizes(scale: float = 1.0) -> tuple[int, int, int, int]:
    """(enrolment templates, probe templates, pairs, genuine pairs): IJB-C's, or `scale` times its pairs from
    sqrt(scale) times its templates (and genuine pairs, one per probe at most), so that the pairs fill the
    enrolment x probe grid as densely as IJB-C's do."""
    if not 0 < scale <= 1:
        raise SystemExit(f"ijb_scoring.py: --scale must be in (0, 1], got {scale}")
    root = math.sqrt(scale)
    return round(GALLERY * root), round(PROBES * root), round(PAIRS * scale), round(GENUINE * root)


def synthetic_ijbc(
    seed: int = 0, sizes: tuple[int, int, int, int] = (GALLERY, PROBES, PAIRS, GENUINE)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features [gallery + probes, 512], left rows, right rows, labels): enrolment templates first, probes after
    them; IJB-C's sizes (23,124 templates) unless `sizes` says otherwise."""
    gallery, probes, pairs, genuine = sizes
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((gallery, DIM), dtype=np.float32)
    subject = rng.integers(0, gallery, probes)
    # Per-template noise of 1 to 2.5 times the identity signal: genuine cosines spread over about 0.1 to 0.5
    # against impostors at 0 +- 0.045, so TAR climbs from ~0.7 at FAR 1e-6 to ~1 at 1e-1, much as real models do.
    noise = rng.standard_normal((gallery + probes, DIM), dtype=np.float32)
    noise *= rng.uniform(1.0, 2.5, (gallery + probes, 1)).astype(np.float32)
    feats = np.concatenate([centres, centres[subject]]) + noise
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    genuine_probes = rng.choice(probes, genuine, replace=False)
    mates = np.zeros((gallery, probes), dtype=bool)
    mates[subject, np.arange(probes)] = True
    # Impostors: a uniform sample of the non-mated enrolment-probe cells, drawn row block by row block. The draw
    # overshoots by 0.1 % (about 4.5 standard deviations of the drawn count at IJB-C's size), or by 3.9 / sqrt(count)
    # at small --scale, where 0.1 % is less than one standard deviation; full-size data is unchanged.
    density = (pairs - genuine) / (gallery * probes - probes) * (1 + max(1e-3, 3.9 / math.sqrt(pairs - genuine)))
    cells = [np.flatnonzero((rng.random(block.shape, dtype=np.float32) < density) & ~block) + r * probes
             for r, block in ((r, mates[r:r + 256]) for r in range(0, gallery, 256))]
    cells = np.concatenate(cells)
    cells = cells[rng.choice(cells.size, pairs - genuine, replace=False)]
    left = np.concatenate([subject[genuine_probes], cells // probes])
    right = np.concatenate([genuine_probes, cells % probes]) + gallery
    labels = np.zeros(pairs, dtype=bool)
    labels[:genuine] = True
    shuffle = rng.permutation(pairs)
    return feats, left[shuffle], right[shuffle], labels[shuffle]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--baselines", action="store_true", help="also time per-pair gathering and sklearn's ROC")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's pairs (templates: its square root)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = ijbc_sizes(args.scale)
    pairs, genuine = sizes[2], sizes[3]
    feats, left, right, labels = synthetic_ijbc(sizes=sizes)
    base = {"bench": "ijb_scoring", "templates": len(feats), "pairs": pairs, "genuine": genuine, "dim": DIM,
            "device": args.device, "cpu_threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__}

    def report(case: str, seconds: float, **extra) -> None:
        print(json.dumps({**base, "case": case, "seconds": round(seconds, 3), **extra}), flush=True)

    scores, t_score = timed(device, score_pairs, feats, left, right, device=args.device, method="blocked")
    report("score_pairs blocked", t_score, pairs_per_s=round(pairs / t_score))
    tars, t_tar = timed(device, fast_tar_at_far, scores, labels, FARS)
    report("fast_tar_at_far interpolate", t_tar, tar_at_far={str(k): round(v, 5) for k, v in tars.items()})
    nearest, t_near = timed(device, fast_tar_at_far, scores, labels, FARS, mode="nearest")
    report("fast_tar_at_far nearest", t_near, tar_at_far={str(k): round(v, 5) for k, v in nearest.items()})
    report("total: blocked scoring + TAR@FAR (interpolate)", t_score + t_tar)
    if not args.baselines:
        return
    gathered, t_gather = timed(device, score_pairs, feats, left, right, device=args.device, method="gather")
    report("score_pairs gather (one dot product per pair)", t_gather, pairs_per_s=round(pairs / t_gather),
           max_abs_diff_vs_blocked=float(np.abs(gathered - scores).max()))
    ref, t_ref = timed(device, tar_at_far, scores, labels, FARS)
    report("sklearn roc_curve + tar_at_far interpolate", t_ref, identical_to_fast=ref == tars)
    ref_near, t_ref = timed(device, tar_at_far, scores, labels, FARS, mode="nearest")
    report("sklearn roc_curve + tar_at_far nearest", t_ref, identical_to_fast=ref_near == nearest)


if __name__ == "__main__":
    main()
