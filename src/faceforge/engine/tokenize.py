"""`faceforge tokenize`: prototypes from a training set, uniformity spreading, balanced k-means, codes file."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from faceforge.config import config_from_dict
from faceforge.engine.datasets import open_training_set
from faceforge.errors import ConfigError
from faceforge.models import load_model
from faceforge.runtime import pick_device
from faceforge.tokenizer.codebook import Codebook, save_codes
from faceforge.tokenizer.kmeans import build_codes
from faceforge.engine.prototypes import mean_embeddings, model_encoder, random_prototypes
from faceforge.tokenizer.spreading import neighbour_overlap, sampled_potential, spread


def tokenize_dataset(
    data: str | Path,
    source: str,
    v: int,
    out: str | Path,
    epochs: int = 1000,
    seed: int = 0,
    t: float = 2.0,
    lr: float = 0.1,
    subset: int = 2048,
    length: int | None = None,
    dim: int = 512,
    backbone: str | None = None,
    images_per_identity: int | None = None,
    batch_size: int = 256,
    workers: int = 0,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Write GIF codes for every identity of the training set `data` (a .rec folder, an image folder or
    'synthface'); returns a summary (sizes, stage times, uniformity and neighbour preservation of the spreading).

    `source` is 'random' (uniform on the sphere, `dim`-d) or any model faceforge.models.load_model takes (run
    folder, checkpoint, state dict, or an .onnx image encoder fed (pixel/255 − pixel_mean) / pixel_std).
    """
    if v < 2:
        raise ConfigError(f"--v must be >= 2, got {v}")
    if epochs < 0:
        raise ConfigError(f"--epochs must be >= 0, got {epochs}")
    dev = pick_device(device)
    model = None if source == "random" else load_model(source, backbone, pixel_mean, pixel_std).module
    dataset, root = open_training_set(config_from_dict({"data": {"root": str(data)}, "train": {"progress_bar": progress}}))
    n = dataset.num_classes
    times, missing = {}, 0
    start = time.perf_counter()
    if model is None:
        prototypes = random_prototypes(n, dim, seed)
    else:
        encoder = model_encoder(model, dev, batch_size)
        prototypes, missing = mean_embeddings(dataset, n, encoder, batch_size, images_per_identity, workers, progress)
    times["prototypes_s"] = time.perf_counter() - start

    start = time.perf_counter()
    prototypes = prototypes.to(dev)
    vectors = spread(prototypes, epochs, t, lr, subset, seed, progress)
    times["spread_s"] = time.perf_counter() - start
    start = time.perf_counter()
    codes = build_codes(vectors, v, seed, length)
    times["kmeans_s"] = time.perf_counter() - start

    meta = {"v": v, "t": t, "epochs": epochs, "seed": seed, "source": source, "lr": lr, "subset": subset,
            "data": str(root)}
    save_codes(out, Codebook(codes, vectors.cpu(), v, {k: str(val) for k, val in meta.items()}))
    return {
        "out": str(out), "identities": n, "v": v, "l": codes.shape[1], "dim": vectors.shape[1],
        "identities_without_images": missing,
        "potential_before": round(sampled_potential(prototypes, t), 4),
        "potential_after": round(sampled_potential(vectors, t), 4),
        "neighbours_kept": round(neighbour_overlap(prototypes, vectors), 4),
        **{k: round(val, 2) for k, val in times.items()},
    }
