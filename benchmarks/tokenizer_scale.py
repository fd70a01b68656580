"""Tokenizer cost at training-set scale: uniformity spreading and balanced hierarchical k-means on N prototypes.

Random unit prototypes [N, D] stand in for the per-identity mean embeddings (their cost is the encoder's, not
the tokenizer's). Prints one JSON line per N: seconds per spreading epoch, k-means seconds, code length, peak RSS.
Usage: python benchmarks/tokenizer_scale.py [--sizes 1e5 2e6] [--dim 512] [--v 16] [--epochs 1] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource

import torch

from faceforge.runtime import pick_device, timed
from faceforge.tokenizer import build_codes, check_codes, spread
from faceforge.engine.prototypes import random_prototypes


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 2e6])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--v", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1, help="spreading epochs timed (the paper runs 1000)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    for size in args.sizes:
        n = int(size)
        prototypes = random_prototypes(n, args.dim, seed=0).to(device)
        vectors, spread_s = timed(device, spread, prototypes, args.epochs)
        del prototypes  # at 2M × 512 every copy is 4 GB
        codes, kmeans_s = timed(device, build_codes, vectors, args.v)
        check_codes(codes, args.v, "benchmark")
        print(json.dumps({
            "bench": "tokenizer_scale", "identities": n, "dim": args.dim, "v": args.v, "l": codes.shape[1],
            "spread_s_per_epoch": round(spread_s / max(args.epochs, 1), 2), "kmeans_s": round(kmeans_s, 2),
            "peak_rss_mb": round(_peak_rss_mb()), "device": str(device), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
