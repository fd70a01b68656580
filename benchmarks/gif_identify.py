"""Closed-set identification with a trained GIF model: decoding (beam search over the valid codes) against
brute-force cosine over the N code vectors, on unseen images of the training identities of a SynthFace set.

The set was trained on images 0..K-1 of each identity; the queries are images K..K+Q-1, rendered from the set's
own seeds (synthface.json), so they are new photos of known identities. Prints JSON lines: one setup row, then
accuracy, agreement with brute force and time per query for brute force (against the code vectors and, with
--gallery-per-id, against enrolment means of training images) and for each beam width.
Usage: python benchmarks/gif_identify.py RUN_OR_WEIGHTS --synthface DIR [--queries-per-id 2] [--beams 1 8]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from faceforge.data.images import decode_image, encode_jpeg
from faceforge.data.record_dataset import RecordDataset
from faceforge.data.synthface import TRAIN, identity_params, image_params
from faceforge.data.synthface_render import render_images, stack_params
from faceforge.errors import ConfigError
from faceforge.eval.identify import CodeTrie, brute_force_identify, gif_decode, load_gif_head
from faceforge.eval.verification import embed_images
from faceforge.models import load_backbone
from faceforge.runtime import pick_device, timed
from faceforge.engine.prototypes import mean_embeddings, model_encoder

_RENDER_CHUNK = 48


def unseen_images(synthface: Path, identities: int, per_id: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [identities·per_id, 112, 112, 3] new images of the first `identities` training identities, as the
    generator would have written them (JPEG at each image's own quality), and their labels."""
    meta = json.loads((synthface / "synthface.json").read_text())["params"]
    seed, nuisance, first_new = meta["seed"], meta["nuisance"], meta["images_per_id"]
    if identities > meta["identities"]:
        raise ConfigError(f"{synthface} has {meta['identities']} training identities, asked for {identities}")
    pairs = [(i, first_new + j) for i in range(identities) for j in range(per_id)]
    images = []
    for start in range(0, len(pairs), _RENDER_CHUNK):
        chunk = pairs[start : start + _RENDER_CHUNK]
        ids = stack_params([identity_params(seed, TRAIN, i) for i, _ in chunk])
        nuis = stack_params([image_params(seed, TRAIN, i, j, nuisance) for i, j in chunk])
        for k, rgb in enumerate(render_images(ids, nuis)):
            jpeg = encode_jpeg(rgb, int(nuis["degrade"][k, 4]))
            images.append(decode_image(jpeg, f"query {start + k}"))
    return np.stack(images), np.array([i for i, _ in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="a GIF run folder or its .safetensors checkpoint")
    parser.add_argument("--synthface", required=True, help="the SynthFace folder the model was trained on")
    parser.add_argument("--queries-per-id", type=int, default=2)
    parser.add_argument("--identities", type=int, help="query only the first N identities (default: all)")
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--gallery-per-id", type=int, default=0,
                        help="also brute force against the mean embedding of this many training images per identity")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    head = load_gif_head(args.weights).to(device).eval()
    backbone = load_backbone(args.weights).to(device)
    count = args.identities or head.num_classes
    (images, labels), render_s = timed(torch.device("cpu"), unseen_images, Path(args.synthface), count,
                                       args.queries_per_id)
    emb, embed_s = timed(device, lambda: torch.from_numpy(embed_images(backbone, images, device=device, flip=False)))
    emb, truth = emb.to(device), torch.from_numpy(labels).to(device)
    trie, trie_s = timed(device, lambda: CodeTrie(head.codes.to(device), head.v))
    common = {"bench": "gif_identify", "identities": head.num_classes, "queries": len(labels), "v": head.v,
              "l": head.length, "device": str(device), "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    print(json.dumps({**common, "row": "setup", "render_s": round(render_s, 1), "embed_s": round(embed_s, 1),
                      "trie_build_ms": round(1000 * trie_s, 2)}), flush=True)
    (brute, _), brute_s = timed(device, brute_force_identify, emb, head.code_vectors)
    print(json.dumps({**common, "row": "brute_force", "centres": "code_vectors",
                      "accuracy": round((brute == truth).float().mean().item(), 4),
                      "us_per_query": round(1e6 * brute_s / len(labels), 2)}), flush=True)
    if args.gallery_per_id:
        encoder = model_encoder(backbone, device, batch_size=256)
        dataset = RecordDataset(Path(args.synthface) / "train")
        gallery = mean_embeddings(dataset, head.num_classes, encoder, per_identity=args.gallery_per_id)[0].to(device)
        (found, _), gallery_s = timed(device, brute_force_identify, emb, gallery)
        print(json.dumps({**common, "row": "brute_force", "centres": f"gallery_mean_of_{args.gallery_per_id}",
                          "accuracy": round((found == truth).float().mean().item(), 4),
                          "us_per_query": round(1e6 * gallery_s / len(labels), 2)}), flush=True)
    for beam in args.beams:
        (ids, _), decode_s = timed(device, gif_decode, head, emb, beam=beam, trie=trie)
        print(json.dumps({**common, "row": "decode", "beam": beam,
                          "accuracy": round((ids == truth).float().mean().item(), 4),
                          "agreement_with_brute_force": round((ids == brute).float().mean().item(), 4),
                          "us_per_query": round(1e6 * decode_s / len(labels), 2)}), flush=True)


if __name__ == "__main__":
    main()
