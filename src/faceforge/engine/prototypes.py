"""Per-identity prototypes for GIF codes: the normalised mean image embedding from any model faceforge loads (a
checkpoint, a state dict, an ONNX image encoder such as CLIP), or random directions on the sphere."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from faceforge.data.record_dataset import FaceImages
from faceforge.errors import ConfigError, DataError
from faceforge.eval.verification import embed_images

Encoder = Callable[[np.ndarray], np.ndarray]  # uint8 [B, 112, 112, 3] RGB -> [B, D]


def random_prototypes(num_identities: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Directions uniform on the unit sphere S^(dim-1): [num_identities, dim]."""
    if dim < 2:
        raise ConfigError(f"prototype dimension must be >= 2, got {dim}")
    return F.normalize(torch.randn(num_identities, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def model_encoder(model: torch.nn.Module, device: torch.device, batch_size: int) -> Encoder:
    """A loaded model (see faceforge.models.load_model) as an encoder of uint8 face crops, without flip fusion."""
    model = model.to(device)
    return lambda images: embed_images(model, images, batch_size=batch_size, device=device, flip=False)


def _collate(items: list) -> tuple[np.ndarray, np.ndarray] | None:
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return np.stack([image for image, _ in kept]), np.array([label for _, label in kept], dtype=np.int64)


def mean_embeddings(
    dataset: FaceImages,
    num_identities: int,
    encode: Encoder,
    batch_size: int = 256,
    per_identity: int | None = None,
    workers: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Per identity, the normalised mean of its images' normalised embeddings, and how many identities had no
    image (those get random unit vectors so that every identity still has a prototype)."""
    labels = np.asarray(dataset.labels)
    if labels.size and labels.max() >= num_identities:
        raise DataError(f"label {labels.max()} in the training set is >= its {num_identities} identities")
    indices = np.flatnonzero(labels >= 0)
    if per_identity is not None:
        order = indices[np.argsort(labels[indices], kind="stable")]
        sorted_labels = labels[order]
        rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels)
        indices = np.sort(order[rank < per_identity])
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_identities)
    for batch in tqdm(loader, desc="prototypes", disable=not progress, dynamic_ncols=True):
        if batch is None:
            continue
        images, y = batch
        emb = F.normalize(torch.as_tensor(encode(images)).float().cpu(), dim=1)
        if sums is None:
            sums = torch.zeros(num_identities, emb.shape[1])
        y_t = torch.from_numpy(y)
        sums.index_add_(0, y_t, emb)
        counts.index_add_(0, y_t, torch.ones(len(y_t)))
    if sums is None:
        raise DataError("no readable training image to embed")
    empty = counts == 0
    missing = int(empty.sum())
    if missing:
        sums[empty] = random_prototypes(missing, sums.shape[1])
    return F.normalize(sums, dim=1), missing
