"""Per-rank memory of a class-sharded head (centres, their gradient and optimizer state, the step's logits), so a
user can plan N = 2M identities on K GPUs before renting them.

The logits term is measured, not guessed: a small head step runs under a dispatch mode that tracks every live
tensor, and the peak of [B, C]-sized memory per logit is scaled to the planned sizes.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from faceforge import distributed
from faceforge.heads import build_head

STATE_COPIES = {"sgd": 1, "adamw": 2}


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created under it that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def logits_bytes_per_element(head: str = "arcface", batch: int = 512, classes: int = 2048, dim: int = 512) -> float:
    """Peak bytes a head step (forward + backward) holds per element of its [batch, classes] logit matrix,
    beyond the centres and their gradient."""
    torch.manual_seed(0)
    module = build_head(head, dim, classes)
    emb = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    with _LiveBytes() as tracker:
        out = module(emb, labels)
        out.loss.backward()
        del out
    weight_grad = classes * dim * 4
    return (tracker.peak - weight_grad) / (batch * classes)


def plan_head_memory(
    num_classes: int,
    world_size: int,
    batch_per_rank: int,
    embedding_size: int,
    optimizer: str,
    sample_rate: float,
    head: str,
    per_logit: float | None = None,
) -> dict:
    """Bytes per rank: centres, their gradient, optimizer state, and the logits of the global batch (the defaults
    live in one place, `faceforge bench head`'s flags)."""
    shard = distributed.largest_shard(num_classes, world_size)
    columns = shard if sample_rate >= 1.0 else min(shard, math.ceil(shard * sample_rate) + batch_per_rank * world_size)
    per_logit = logits_bytes_per_element(head) if per_logit is None else per_logit
    centres = shard * embedding_size * 4
    parts = {
        "centres": centres,
        "centre_grads": centres,
        "optimizer_state": STATE_COPIES[optimizer] * centres,
        "logits": int(per_logit * batch_per_rank * world_size * columns),
    }
    return {
        "num_classes": num_classes, "world_size": world_size, "classes_per_rank": shard, "sampled_columns": columns,
        "global_batch": batch_per_rank * world_size, "embedding_size": embedding_size, "optimizer": optimizer,
        "head": head, "sample_rate": sample_rate, "logit_bytes_per_element": round(per_logit, 2),
        **{f"{k}_gib": round(v / 2**30, 3) for k, v in parts.items()},
        "total_gib": round(sum(parts.values()) / 2**30, 3),
    }
