"""Per-rank memory of a head's training step (class centres or GIF codes, gradients, optimizer state, the step's
logits and temporaries), so a user can plan N = 2M identities on K GPUs before renting them.

Nothing in the plan is a constant: `track_step` runs one train_step of the trainer (the head on a stand-in
backbone, a learnable [B, D] block) under a dispatch mode that follows every live tensor, the parameters, their
gradients and optimizer state it starts with included, and records, at every allocation, the live bytes per size
class: class rows [N, D], sampled rows [S, D], logits [B, S], embeddings [B, D], GIF codes [N, l], ... . The plan
runs that step on a small probe and scales each size class to the planned sizes at every allocation; the
largest scaled total is the plan's peak. Whatever a head, the sampled-row update or the optimizer holds (a
head rewritten to hold fewer bytes per logit too) is therefore in the plan as it is in the step.
"""

from __future__ import annotations

import inspect
import json
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from faceforge import distributed
from faceforge.config import config_from_dict
from faceforge.engine.step import StepParts, build_parts, train_step
from faceforge.errors import ConfigError
from faceforge.heads import build_head
from faceforge.registry import BACKBONES, HEADS
from faceforge.tokenizer.kmeans import code_length

PROBE_BATCH, PROBE_DIM, PROBE_CLASSES = 24, 40, 1499  # a centre head's probe: small, and no two size classes alike
GIF_VOCABULARY = 16  # v of the random codes a GIF plan or bench row uses when none is given
GIF_PROBE_DRAWS = 20  # a GIF probe holds >= 20x (batch + subset) identities: the uniformity ids are as many as at N
FIXED = "fixed"  # the size class of everything whose size depends on no planned size
ROW_CLASSES = ("class_rows", "sampled_rows", "embeddings", "code_vectors")  # fp32 [rows, D] size classes


class _LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors created under it, and of those it adopted, per size class (`size_class` of a
    storage's element count); `timeline` holds the live bytes after every new storage, `held` after adoption."""

    def __init__(self, size_class: Callable[[int], str] = lambda numel: FIXED) -> None:
        super().__init__()
        self._size_class = size_class
        self.live: dict[str, int] = {}
        self.timeline: list[dict[str, int]] = []
        self.held: dict[str, int] = {}
        self._seen: set[int] = set()

    @property
    def peak(self) -> int:
        """The largest total of live bytes."""
        return max((sum(s.values()) for s in self.timeline), default=0)

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that already exist (until they are freed), as what the tracked work starts with."""
        for t in tensors:
            self._count(t)
        self.held = dict(self.live)

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self._seen:
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        kind = self._size_class(nbytes // t.element_size())
        self.live[kind] = self.live.get(kind, 0) + nbytes
        self.timeline.append(dict(self.live))
        weakref.finalize(storage, self._release, key, kind, nbytes)

    def _release(self, key: int, kind: str, nbytes: int) -> None:
        self.live[kind] -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


class _BatchEmbeddings(nn.Module):
    """A stand-in backbone: a learnable [batch, D] block returned whatever the images, so that the trainer's own
    train_step runs the head path (forward, backward, clip, the update) and no real backbone."""

    def __init__(self, embedding_size: int, batch: int) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.embeddings = nn.Parameter(torch.randn(batch, embedding_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embeddings


def head_step_parts(head: str, num_classes: int, batch: int, embedding_size: int, optimizer: str,
                    device: torch.device, head_params: dict | None = None) -> StepParts:
    """The trainer's build_parts for `head` (built with `head_params`, tensors such as GIF codes included) on
    the _BatchEmbeddings backbone, with the config's defaults for everything else."""
    def factory(embedding_size: int, num_classes: int) -> nn.Module:
        return build_head(head, embedding_size, num_classes, **(head_params or {}))

    with BACKBONES.temporary("bench_embeddings", _BatchEmbeddings), HEADS.temporary("bench_head", factory):
        cfg = config_from_dict({
            "backbone": {"name": "bench_embeddings", "embedding_size": embedding_size, "batch": batch},
            "head": {"name": "bench_head"}, "optim": {"name": optimizer},
            "train": {"device": str(device), "batch_size": batch},
        })
        return build_parts(cfg, num_classes, device)


def random_gif_codes(identities: int, v: int, dim: int, seed: int = 0, length: int | None = None,
                     with_vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Distinct random codes [N, l] < v (l: the shortest that fits N, or `length`) and random unit code vectors
    [N, dim] (None without `with_vectors`): what a GIF step costs does not depend on the codes' look-alike
    structure."""
    length = code_length(identities, v) if length is None else length
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randperm(v**length, generator=gen)[:identities]
    codes = keys[:, None] // v ** torch.arange(length - 1, -1, -1) % v
    return codes, F.normalize(torch.randn(identities, dim, generator=gen), dim=1) if with_vectors else None


def with_random_codes(params: dict, identities: int, dim: int, length: int | None = None) -> dict:
    """GIF's head parameters (vocabulary params["v"]) with random_gif_codes made in memory: the codes, and the code
    vectors unless params' gamma is 0 (no pull term: only the codes must fit)."""
    codes, vectors = random_gif_codes(identities, params["v"], dim, length=length,
                                      with_vectors=params.get("gamma") != 0)
    return {**params, "codes": codes, "code_vectors": vectors}


def _held_tensors(parts: StepParts) -> Iterator[torch.Tensor]:
    """What a step starts with: parameters and their gradients, buffers, optimizer state, a sampling head's
    last block of rows."""
    for module in (parts.backbone, parts.head):
        yield from module.buffers()
        for p in module.parameters():
            yield from (p,) if p.grad is None else (p, p.grad)
    for state in parts.optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))
    for sampled in parts.head.sampled_blocks().values():
        yield from (t for t in (sampled.index, sampled.block, sampled.block.grad) if t is not None)


def track_step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor,
               size_class: Callable[[int], str] = lambda numel: FIXED) -> _LiveBytes:
    """One train_step under the live-tensor tracker, what it starts with adopted: its `peak` is what the step
    holds at most. Run it after at least one step, so that lazily created optimizer state exists."""
    tracker = _LiveBytes(size_class)
    tracker.adopt(_held_tensors(parts))
    with tracker:
        train_step(parts, images, labels)
    return tracker


def sampled_columns(classes: int, batch: int, sample_rate: float) -> int:
    """Columns a PartialFC step of `classes` rows uses for `batch` distinct labels (the most it can be):
    every label's class plus ceil(rate x the others), as heads/centres.py sample_classes takes them."""
    positives = min(batch, classes)
    others = classes - positives
    return classes if sample_rate >= 1.0 or others == 0 else positives + math.ceil(sample_rate * others)


def _centre_sizes(classes: int, columns: int, batch: int, dim: int) -> dict[str, int]:
    """Element counts of a centre head step's size classes."""
    sizes = {"class_rows": classes * dim, "logits": batch * columns, "embeddings": batch * dim,
             "classes": classes, "batch": batch, "batch_pairs": batch * batch,
             "negative_pairs": batch * (batch - 1) // 2}
    if columns < classes:
        sizes.update(sampled_rows=columns * dim, columns=columns)
    return sizes


def _gif_sizes(identities: int, length: int, dim: int) -> dict[str, int]:
    """Element counts of a GIF step's size classes that grow with the identities (the rest is fixed)."""
    return {"codes": identities * length, "code_vectors": identities * dim, "identities": identities}


def _centre_probe_sizes(sample_rate: float) -> dict[str, int]:
    """A centre head probe's sizes: the fewest classes from PROBE_CLASSES on whose size classes all differ."""
    classes = PROBE_CLASSES
    while True:
        columns = sampled_columns(classes, PROBE_BATCH, sample_rate)
        sizes = _centre_sizes(classes, columns, PROBE_BATCH, PROBE_DIM)
        if len(set(sizes.values())) == len(sizes):
            return sizes
        classes += 1


class _Scaling(NamedTuple):
    """A plan's probe (its classes, batch and dim), the element counts of each size class there and at the
    planned sizes, and what the plan reports about its sizes."""

    probe: tuple[int, int, int]
    probe_sizes: dict[str, int]
    plan_sizes: dict[str, int]
    about: dict


def _centre_scaling(num_classes: int, world_size: int, batch_per_rank: int, dim: int,
                    sample_rate: float) -> _Scaling:
    """A class-sharded head: this rank's shard of classes, the global batch (what the head sees), and the
    columns a sampled step uses; probed at PROBE_BATCH x PROBE_DIM."""
    shard = distributed.largest_shard(num_classes, world_size)
    batch = batch_per_rank * world_size
    columns = sampled_columns(shard, batch, sample_rate)
    probe = _centre_probe_sizes(sample_rate)
    about = {"classes_per_rank": shard, "sample_rate": sample_rate, "sampled_columns": columns, "global_batch": batch}
    return _Scaling((probe["classes"], PROBE_BATCH, PROBE_DIM), probe, _centre_sizes(shard, columns, batch, dim),
                    about)


def _gif_scaling(identities: int, batch: int, dim: int, params: dict) -> tuple[_Scaling, dict]:
    """GIF (replicated on every rank): probed at the planned batch, dim, code length l and vocabulary, with
    GIF_PROBE_DRAWS x (batch + subset) identities at most, so that the uniformity loss' random ids are nearly as
    many as at N. Returns the scaling and the head's parameters for the probe (v and l added)."""
    params = {**params, "v": params.get("v", GIF_VOCABULARY)}
    length = code_length(identities, params["v"])
    subset = params.get("subset", _gif_defaults()["subset"])
    probed = min(identities, GIF_PROBE_DRAWS * (batch + subset) + 1)
    about = {"classes_per_rank": identities, "global_batch": batch, "v": params["v"], "code_length": length}
    scaling = _Scaling((probed, batch, dim), _gif_sizes(probed, length, dim), _gif_sizes(identities, length, dim),
                       about)
    return scaling, {**params, "length": length}


def _gif_defaults() -> dict:
    """GIF's keyword defaults (the uniformity subset a plan probes for when none is given)."""
    return {k: p.default for k, p in inspect.signature(HEADS.get("gif")).parameters.items()
            if p.default is not inspect.Parameter.empty}


@lru_cache(maxsize=64)
def _probe(head: str, optimizer: str, params_json: str, probe: tuple[int, int, int], sizes_json: str,
           device: str) -> tuple[tuple[dict[str, int], ...], dict[str, int]]:
    """The timeline and held bytes of one tracked train_step (after one untracked) at the probe's classes, batch
    and dim on `device` (CUDA steps with fused optimizers), labels all distinct, bytes split by the size classes
    `sizes_json` names; cached per probe."""
    params, classes_of = json.loads(params_json), json.loads(sizes_json)
    classes, batch, dim = probe
    if head == "gif":
        params = with_random_codes(params, classes, dim, length=params.pop("length"))
    torch.manual_seed(0)
    dev = torch.device(device)
    parts = head_step_parts(head, classes, batch, dim, optimizer, dev, params)
    perm = torch.randperm(classes, generator=torch.Generator().manual_seed(0))
    labels = perm[torch.arange(batch) % classes].to(dev)  # distinct while there are as many classes
    images = torch.zeros(batch, 1, device=dev)
    train_step(parts, images, labels)
    inverse = {numel: name for name, numel in classes_of.items()}
    tracker = track_step(parts, images, labels, lambda numel: inverse.get(numel, FIXED))
    return tuple(tracker.timeline), tracker.held


def _scaled(snapshot: dict[str, int], factors: dict[str, float]) -> dict[str, float]:
    return {k: v * factors.get(k, 1.0) for k, v in snapshot.items()}


def _scaling_for(head: str, num_classes: int, world_size: int, batch_per_rank: int, embedding_size: int,
                 sample_rate: float, head_params: dict) -> tuple[_Scaling, dict]:
    """The scaling of a plan and the parameters its probe builds the head with."""
    if head == "gif":
        return _gif_scaling(num_classes, batch_per_rank, embedding_size, head_params)
    params = {**head_params, "sample_rate": sample_rate}
    return _centre_scaling(num_classes, world_size, batch_per_rank, embedding_size, sample_rate), params


def plan_head_memory(
    num_classes: int,
    world_size: int,
    batch_per_rank: int,
    embedding_size: int,
    optimizer: str,
    sample_rate: float,
    head: str,
    per_logit: float | None = None,
    head_params: dict | None = None,
    device: str = "cpu",
) -> dict:
    """Bytes per rank at the peak of a training step of `head` (its other parameters `head_params`, e.g.
    {"unpg": {"k": 1.5}} or GIF's {"v": 16, "joint": True}): the probe's timeline scaled to these sizes, split
    by size class at the peak (`<class>_gib`; `<class>_fp32_copies` for [rows, D] classes: e.g. centres +
    momentum + dense gradient + the optimizer's temporaries), with what the step starts with (`held_gib`:
    parameters, optimizer state, the last step's gradients) and the most bytes per logit the logits held at
    once. `per_logit` plans for a head holding that many bytes per logit instead of the measured ones; `device`
    is where the probe runs (a CUDA step's fused optimizer holds less). The defaults live in one place,
    `faceforge bench head`'s flags."""
    scaling, params = _scaling_for(head, num_classes, world_size, batch_per_rank, embedding_size, sample_rate,
                                   head_params or {})
    timeline, held = _probe(head, optimizer, json.dumps(params, sort_keys=True), scaling.probe,
                            json.dumps(scaling.probe_sizes, sort_keys=True), device)
    factors = {k: scaling.plan_sizes[k] / n for k, n in scaling.probe_sizes.items()}
    if "logits" in factors:
        measured = _peak_share(timeline, "logits", scaling.probe_sizes["logits"])
        per_logit = measured if per_logit is None else per_logit
        factors["logits"] *= per_logit / measured
    peak = max((_scaled(s, factors) for s in timeline), key=lambda s: sum(s.values()))
    return {
        "num_classes": num_classes, "world_size": world_size, **scaling.about, "embedding_size": embedding_size,
        "optimizer": optimizer, "head": head, "head_params": head_params or {}, "probe_device": device,
        **({} if per_logit is None else {"logit_bytes_per_element": round(per_logit, 2)}),
        **{f"{k}_fp32_copies": round(peak.get(k, 0) / (4 * n), 2) for k, n in scaling.plan_sizes.items()
           if k in ROW_CLASSES},
        **{f"{k}_gib": round(v / 2**30, 4) for k, v in sorted(peak.items())},
        "held_gib": round(sum(_scaled(held, factors).values()) / 2**30, 4),
        "total_gib": round(sum(peak.values()) / 2**30, 4), "total_bytes": round(sum(peak.values())),
    }


def _peak_share(timeline: Iterable[dict[str, int]], kind: str, numel: int) -> float:
    """The most bytes per element the size class `kind` held at once."""
    return max(s.get(kind, 0) for s in timeline) / numel


def logits_bytes_per_element(head: str = "arcface", sample_rate: float = 1.0, optimizer: str = "sgd",
                             head_params: dict | None = None) -> float:
    """The most bytes a centre head's training step holds at once per element of its [batch, columns] logits,
    measured on the plan's probe (what a head rewritten to hold fewer bytes per logit lowers)."""
    plan = plan_head_memory(PROBE_CLASSES, 1, PROBE_BATCH, PROBE_DIM, optimizer, sample_rate, head,
                            head_params=head_params)
    if "logit_bytes_per_element" not in plan:
        raise ConfigError(f"head {head!r} has no [batch, classes] logits")
    return plan["logit_bytes_per_element"]
