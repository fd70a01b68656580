"""SynthFace: the embedded default data set of procedurally rendered 112x112 faces, in InsightFace's layout.

Every identity draws from `SeedSequence(seed, spawn_key=(split, identity, 0))` and its image j from
`(split, identity, 1 + j)`, split 0 = train, 1 = held-out: the output is byte-identical for a seed whatever the
worker count, and the two splits come from disjoint streams. Writes `train/train.rec, train.idx, property`, `heldout.bin` (LFW-style
pairs in 10 contiguous folds) and `synthface.json`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from faceforge.config import SynthFaceConfig
from faceforge.data.binsets import write_bin
from faceforge.data.images import encode_jpeg
from faceforge.data.recordio import write_insightface_set
from faceforge.data.synthface_render import (
    SIZE, Params, render_images, sample_identity, sample_nuisance, stack_params,
)
from faceforge.errors import ConfigError, DataError

VERSION = 1
_DEFAULTS = SynthFaceConfig()  # the set `data.root: synthface` trains on; its defaults are the config's
TRAIN, HELDOUT, PAIRS = 0, 1, 2
FOLDS = 10
_CHUNK_IMAGES = 48


def identity_params(seed: int, split: int, identity: int) -> Params:
    """The parameters of one identity of a split (TRAIN or HELDOUT)."""
    stream = np.random.SeedSequence(seed, spawn_key=(split, identity, 0))
    return sample_identity(np.random.default_rng(stream))


def image_params(seed: int, split: int, identity: int, image: int, nuisance: float) -> Params:
    """The nuisance parameters of one image of an identity."""
    stream = np.random.SeedSequence(seed, spawn_key=(split, identity, 1 + image))
    return sample_nuisance(np.random.default_rng(stream), nuisance)


def render_identities(seed: int, split: int, first: int, count: int, images_per_id: int,
                      nuisance: float) -> list[bytes]:
    """JPEG bytes of every image of identities first..first+count-1, identity-major."""
    identities, images = [], []
    for identity in range(first, first + count):
        params = identity_params(seed, split, identity)
        for image in range(images_per_id):
            identities.append(params)
            images.append(image_params(seed, split, identity, image, nuisance))
    nuisances = stack_params(images)
    pixels = render_images(stack_params(identities), nuisances)
    return [encode_jpeg(rgb, int(quality)) for rgb, quality in zip(pixels, nuisances["degrade"][:, 4])]


def make_pairs(seed: int, identities: int, images_per_id: int, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """LFW-style pairs over held-out image indices (identity * images_per_id + image): ([pairs, 2], issame).

    Fold f uses only the identities of the f-th of 10 contiguous identity groups; each fold is its genuine pairs
    (distinct image pairs of one identity) followed by as many impostor pairs (two identities of the group).
    """
    half = pairs // (2 * FOLDS)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(PAIRS,)))
    k = images_per_id
    a, b = np.triu_indices(k, 1)
    index = np.empty((pairs, 2), np.int64)
    for fold, group in enumerate(np.array_split(np.arange(identities), FOLDS)):
        genuine = rng.choice(len(group) * len(a), half, replace=False)
        ident = group[genuine // len(a)] * k
        start = 2 * half * fold
        index[start:start + half] = np.stack([ident + a[genuine % len(a)], ident + b[genuine % len(a)]], 1)
        seen: set[tuple[int, int]] = set()
        while len(seen) < half:
            i, j = rng.choice(group, 2, replace=False)
            pair = (int(i * k + rng.integers(k)), int(j * k + rng.integers(k)))
            if pair not in seen and pair[::-1] not in seen:
                seen.add(pair)
                index[start + half + len(seen) - 1] = pair
    issame = np.tile(np.repeat([True, False], half), FOLDS)
    return index, issame


def generate(
    out_dir: str | os.PathLike,
    identities: int = _DEFAULTS.identities,
    images_per_id: int = _DEFAULTS.images_per_id,
    eval_identities: int = _DEFAULTS.eval_identities,
    eval_images_per_id: int = _DEFAULTS.eval_images_per_id,
    pairs: int = _DEFAULTS.pairs,
    seed: int = _DEFAULTS.seed,
    nuisance: float = _DEFAULTS.nuisance,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Write a SynthFace set to `out_dir` (atomically, via `out_dir.tmp-<pid>`) and return its metadata.

    Returns at once when `out_dir` already holds a set made with the same parameters.
    """
    params = {"identities": identities, "images_per_id": images_per_id, "eval_identities": eval_identities,
              "eval_images_per_id": eval_images_per_id, "pairs": pairs, "seed": seed, "nuisance": nuisance}
    _check(params)
    params = {k: float(v) if k == "nuisance" else int(v) for k, v in params.items()}
    meta = {"format": "synthface", "version": VERSION, "params": params, "counts": {
        "train_images": identities * images_per_id, "train_classes": identities,
        "eval_images": eval_identities * eval_images_per_id, "pairs": pairs, "genuine_pairs": pairs // 2,
        "folds": FOLDS, "image_size": SIZE},
        "files": ["train/train.rec", "train/train.idx", "train/property", "heldout.bin"]}

    def write(tmp: Path) -> dict:
        _write(tmp, params, workers, progress)
        return meta

    return STAMP.build(Path(out_dir), params, write)


def _check(p: dict) -> None:
    for key in ("identities", "images_per_id", "eval_identities", "eval_images_per_id", "pairs", "seed"):
        if not isinstance(p[key], (int, np.integer)) or p[key] < (key != "seed"):
            raise ConfigError(f"{key} must be a {'non-negative' if key == 'seed' else 'positive'} integer, got {p[key]!r}")
    if p["pairs"] % (2 * FOLDS):
        raise ConfigError(f"pairs must be a multiple of {2 * FOLDS} (10 folds, half genuine), got {p['pairs']}")
    if p["eval_identities"] < 2 * FOLDS or p["eval_images_per_id"] < 2:
        raise ConfigError(f"pairs need >= {2 * FOLDS} eval identities and >= 2 eval images per identity")
    smallest, k = p["eval_identities"] // FOLDS, p["eval_images_per_id"]
    if p["pairs"] // (2 * FOLDS) > min(smallest * k * (k - 1) // 2, smallest * (smallest - 1) // 2 * k * k):
        raise ConfigError(f"{p['pairs']} pairs need more eval identities or images than "
                         f"{p['eval_identities']} x {p['eval_images_per_id']}")
    if not 0.0 <= p["nuisance"] <= 2.0:
        raise ConfigError(f"nuisance must be in [0, 2], got {p['nuisance']}")


@dataclass(frozen=True)
class SetStamp:
    """How a generated set marks its folder: the metadata file, the format version and its name in errors.

    `build` writes into a temporary folder and renames it, so `out` holds a whole set or nothing.
    """

    info: str
    version: int
    kind: str

    def cached(self, out: Path, params: dict) -> dict | None:
        """The metadata of the finished set at `out` when it matches `params`; DataError if `out` is something else."""
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return None
        try:
            meta = json.loads((out / self.info).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError(f"{out}: exists and is not a {self.kind} (no readable {self.info})") from None
        if meta.get("version") != self.version or meta.get("params") != params:
            raise DataError(f"{out}: holds a {self.kind} made with other parameters ({meta.get('params')}); "
                            "remove it or choose another folder")
        return meta

    def build(self, out: Path, params: dict, write: Callable[[Path], dict]) -> dict:
        """The set at `out`: the cached one, else write(tmp) fills a temporary folder and returns the metadata,
        and the folder is renamed to `out` (another process finishing the same set first is fine)."""
        cached = self.cached(out, params)
        if cached is not None:
            return cached
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            meta = write(tmp)
            (tmp / self.info).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            try:
                os.rename(tmp, out)
            except OSError:
                if self.cached(out, params) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.cached(out, params) or meta


STAMP = SetStamp("synthface.json", VERSION, "SynthFace set")


def _write(root: Path, p: dict, workers: int, progress: bool) -> None:
    nuisance = p["nuisance"]
    train = _chunks(p["seed"], TRAIN, p["identities"], p["images_per_id"], nuisance)
    heldout = _chunks(p["seed"], HELDOUT, p["eval_identities"], p["eval_images_per_id"], nuisance)
    total = p["identities"] * p["images_per_id"] + p["eval_identities"] * p["eval_images_per_id"]
    with tqdm(total=total, desc="SynthFace", unit="img", disable=not progress) as bar, \
            mapper(workers) as pool_map:
        results = pool_map(render_identities, *zip(*(train + heldout)))

        def samples() -> Iterator[tuple[bytes, int]]:
            for (_, _, first, _, per_id, _), images in zip(train, islice(results, len(train))):
                bar.update(len(images))
                yield from ((jpeg, first + i // per_id) for i, jpeg in enumerate(images))

        write_insightface_set(root / "train", samples(), p["identities"])
        eval_images: list[bytes] = []
        for images in results:
            bar.update(len(images))
            eval_images.extend(images)
    index, issame = make_pairs(p["seed"], p["eval_identities"], p["eval_images_per_id"], p["pairs"])
    write_bin(root / "heldout.bin", [eval_images[i] for i in index.ravel()], issame.tolist())


def _chunks(seed: int, split: int, identities: int, per_id: int, nuisance: float) -> list[tuple]:
    """render_identities arguments for fixed identity ranges of about _CHUNK_IMAGES images (worker-independent)."""
    size = max(1, _CHUNK_IMAGES // per_id)
    return [(seed, split, first, min(size, identities - first), per_id, nuisance)
            for first in range(0, identities, size)]


@contextmanager
def mapper(workers: int) -> Iterator[Callable]:
    """An ordered `map`: in this process for workers <= 1, else over a spawn pool that stops at once on errors."""
    if workers <= 1:
        yield map
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool.map
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
