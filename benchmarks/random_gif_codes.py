"""Random GIF codes for speed rows: N distinct codes of l = ceil(log_v N) tokens and N random unit code vectors,
from a seeded generator, written as the codes file `faceforge tokenize` writes (head.codes=FILE).

They carry no look-alike structure, which a step's cost does not depend on: use them to time GIF at millions of
identities (e.g. `faceforge bench train --config configs/ms1mv3_r50_gif.yaml head.codes=FILE`), never to train.
Drawn on --device (a GPU makes 4M x 512 vectors in a second; the CPU takes minutes).

Usage: python benchmarks/random_gif_codes.py OUT.safetensors --identities 4000000 [--v 16] [--dim 512] [--seed 0]
       [--device cuda]      (prints one JSON line)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from faceforge.tokenizer import Codebook, code_length, save_codes


def random_codebook(identities: int, v: int, dim: int, seed: int, device: torch.device) -> Codebook:
    """Distinct codes (a random sample of the v^l base-v numbers, spelt out) and unit vectors, on the CPU."""
    length = code_length(identities, v)
    gen = torch.Generator(device).manual_seed(seed)
    keys = torch.randperm(v**length, generator=gen, device=device)[:identities]
    place = v ** torch.arange(length - 1, -1, -1, device=device)
    codes = keys[:, None] // place % v
    vectors = F.normalize(torch.randn(identities, dim, generator=gen, device=device), dim=1)
    meta = {"source": "random (benchmark only)", "seed": str(seed)}
    return Codebook(codes.cpu(), vectors.cpu(), v, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--identities", type=int, required=True)
    parser.add_argument("--v", type=int, default=16, help="vocabulary size")
    parser.add_argument("--dim", type=int, default=512, help="code vector size: the backbone's embedding size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    book = random_codebook(args.identities, args.v, args.dim, args.seed, torch.device(args.device))
    save_codes(args.out, book)
    print(json.dumps({"bench": "random_gif_codes", "out": args.out, "identities": args.identities, "v": args.v,
                      "l": book.length, "dim": args.dim, "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
