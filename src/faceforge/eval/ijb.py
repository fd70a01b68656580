"""IJB-B / IJB-C evaluation of a model: align each loose crop with its 5 points, embed with flip fusion, pool
templates as InsightFace does by default (mode N1D1F2), then 1:1 TAR@FAR and, with the gallery files, 1:N."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from faceforge.data.align import align_face
from faceforge.data.images import FACE_SIZE, decode_image
from faceforge.errors import DataError
from faceforge.eval.bootstrap import PairSubjects, identification_replicates, resample_counts, verification_replicates
from faceforge.eval.ijb_meta import IJBMeta, read_ijb
from faceforge.eval.ijb_scoring import pool_templates, score_pairs, search
from faceforge.eval.metrics import SearchOutcomes, identification_rates, roc_head, tar_from_roc
from faceforge.eval.options import EvalOptions
from faceforge.eval.verification import embed_images
from faceforge.runtime import pick_device

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (1e-2, 1e-1)
RANKS = (1, 5)
_CURVE_POINTS = 2000  # ROCs with more points are kept (for plots) at this many log-spaced FARs


class AlignedCrops(Dataset):
    """The loose crops of an IJB set, each aligned onto the ArcFace template with its 5 landmarks."""

    def __init__(self, folder: Path, names: list[str], landmarks: np.ndarray) -> None:
        self.folder, self.names, self.landmarks = folder, names, landmarks

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.folder / self.names[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
        try:
            return align_face(decode_image(data, str(path)), self.landmarks[index], FACE_SIZE)
        except ValueError as exc:
            raise DataError(f"{path}: cannot align with its landmarks ({exc})") from None


def _stack(batch: list[np.ndarray]) -> np.ndarray:
    return np.stack(batch)


def embed_crops(model: torch.nn.Module, meta: IJBMeta, device: torch.device, options: EvalOptions) -> np.ndarray:
    """float32 [N, D] features of every image (image + mirror summed with `options.flip`, norms kept); `model` is
    already on `device`."""
    crops = AlignedCrops(meta.image_dir, meta.images, meta.landmarks)
    loader = DataLoader(crops, batch_size=options.batch_size, num_workers=options.workers, collate_fn=_stack)
    features, done = None, 0
    for batch in tqdm(loader, desc=f"{meta.name} embed", unit="batch", disable=not options.progress):
        embedded = embed_images(model, batch, batch_size=len(batch), device=device, flip=options.flip)
        if features is None:  # filled in place: IJB-C's 469k x 512 floats are ~1 GB, not to be held twice
            features = np.empty((len(crops), embedded.shape[1]), dtype=np.float32)
        features[done:done + len(embedded)] = embedded
        done += len(embedded)
    return features


@dataclass
class IJBResult:
    """The report row of one IJB set, its ROC up to FAR ~1e-1 (sampled when large), the 1:1 scores and the
    1:N search outcomes per gallery (the inputs of the bootstrap)."""

    row: dict
    curve: tuple[np.ndarray, np.ndarray]
    scores: np.ndarray
    labels: np.ndarray
    meta: IJBMeta | None = None
    outcomes: dict[str, SearchOutcomes] = field(default_factory=dict)


def _identification(
    meta: IJBMeta, ids: np.ndarray, feats: np.ndarray, device: str | torch.device, found: dict[str, SearchOutcomes]
) -> dict:
    """1:N rates per gallery and their mean (the IJB-C convention averages its two galleries); each gallery's
    search outcomes go into `found`."""
    probes = meta.probes
    probe_rows = np.searchsorted(ids, probes.templates)
    per_gallery: dict[str, dict] = {}
    for name, gallery in meta.galleries.items():
        outcomes = search(feats, probe_rows, probes.subjects, np.searchsorted(ids, gallery.templates),
                                          gallery.subjects, device)
        if not (outcomes.mate_rank > 0).any():
            raise DataError(f"{gallery.path}: no probe of {probes.path.name} has a mate in this gallery")
        found[name] = outcomes
        per_gallery[name] = {"gallery_templates": int(gallery.templates.size),
                             **identification_rates(outcomes, RANKS, FPIRS)}
    rates = list(per_gallery.values())
    mean = {f"rank_{k}": float(np.mean([r[f"rank_{k}"] for r in rates])) for k in RANKS}
    if all(r["tpir_at_fpir"] for r in rates):
        mean["tpir_at_fpir"] = {f: float(np.mean([r["tpir_at_fpir"][f] for r in rates])) for f in FPIRS}
    return {**per_gallery, "mean": mean}


def score_ijb(
    meta: IJBMeta,
    features: np.ndarray,
    device: str | torch.device = "cpu",
    faceness: bool = True,
    normalize_images: bool = False,
    flip: bool = True,
) -> IJBResult:
    """Pool the image features into templates, score the 1:1 pairs and run the 1:N searches.

    `faceness` weights images by their detector score (D1), `normalize_images` drops the feature norms (N0);
    `flip` only says whether the features are flip-fused, for the mode label (F2 or F0).
    """
    weights = meta.faceness if faceness else None
    ids, feats = pool_templates(features, meta.templates, meta.medias, weights, normalize_images)
    rows = np.searchsorted(ids, meta.pairs)
    scores = score_pairs(feats, rows[:, 0], rows[:, 1], device=device)
    # Only the ROC up to FAR 1e-1 (what IJB tables and InsightFace's plots show): a partition, not a full sort.
    fpr, tpr = roc_head(scores[meta.labels], scores[~meta.labels], max(FARS))
    fars = np.array(FARS)
    row: dict = {
        "set": meta.name,
        "protocol": "1:1" + (" + 1:N" if meta.galleries else ""),
        "mode": f"N{0 if normalize_images else 1}D{int(faceness)}F{2 if flip else 0}",
        "images": len(meta.images),
        "templates": int(ids.size),
        "pairs": int(scores.size),
        "genuine": int(meta.labels.sum()),
        "tar_at_far": dict(zip(FARS, tar_from_roc(fpr, tpr, fars).tolist())),
        "tar_at_far_nearest": dict(zip(FARS, tar_from_roc(fpr, tpr, fars, "nearest").tolist())),
    }
    outcomes: dict[str, SearchOutcomes] = {}
    if meta.galleries:
        row["identification"] = _identification(meta, ids, feats, device, outcomes)
    return IJBResult(row, _sampled(fpr, tpr, int((~meta.labels).sum())), scores, meta.labels, meta, outcomes)


def _sampled(fpr: np.ndarray, tpr: np.ndarray, impostors: int) -> tuple[np.ndarray, np.ndarray]:
    """The ROC itself when small, else read at log-spaced FARs from 1 / impostors (the smallest measurable) on."""
    if fpr.size <= _CURVE_POINTS:
        return fpr, tpr
    grid = np.r_[0.0, np.logspace(-np.log10(impostors), np.log10(fpr[-1]), _CURVE_POINTS - 1)]
    return grid, tar_from_roc(fpr, tpr, grid)


def evaluate_ijb(model: torch.nn.Module, root: str | Path, options: EvalOptions = EvalOptions()) -> IJBResult:
    """The whole IJB protocol on `model` (moved to `options.device`) for the set at `root` (InsightFace layout)."""
    meta = read_ijb(root)
    device = pick_device(options.device)
    features = embed_crops(model.to(device), meta, device, options)
    return score_ijb(meta, features, device, flip=options.flip)


def _subject_index(meta: IJBMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted template ids, their subjects' columns, sorted subject ids) from the 1:N lists, which name the
    subjects; the 1:1 pair file does not."""
    lists = [*meta.galleries.values(), *([meta.probes] if meta.probes else [])]
    if not lists:
        raise DataError(f"{meta.root}: --bootstrap needs the 1:N lists (meta/*_1N_*.csv) to know each template's "
                        "subject")
    templates = np.concatenate([t.templates for t in lists])
    subjects = np.concatenate([t.subjects for t in lists])
    ids, first = np.unique(templates, return_index=True)
    subject_ids, column = np.unique(subjects[first], return_inverse=True)
    return ids, column.ravel(), subject_ids


def bootstrap_ijb(result: IJBResult, resamples: int, seed: int) -> dict[str, np.ndarray | None]:
    """[resamples] replicates of every metric of the row (subject-level bootstrap, see eval.bootstrap), keyed
    "tar@<far>", "<gallery>/rank_k", "<gallery>/tpir@<fpir>" and "mean/..."; None where not measurable."""
    meta = result.meta
    ids, column, subject_ids = _subject_index(meta)
    where = np.searchsorted(ids, meta.pairs).clip(max=ids.size - 1)
    if (ids[where] != meta.pairs).any():
        raise DataError(f"{meta.meta_file('template_pair_label.txt')}: --bootstrap needs every 1:1 template in "
                        "the 1:N lists (to know its subject)")
    counts = resample_counts(subject_ids.size, resamples, seed)
    pairs = PairSubjects(subject_ids, column[where[:, 0]], column[where[:, 1]])
    tars = verification_replicates(result.scores, result.labels, pairs, counts, result.row["tar_at_far"])
    replicates: dict[str, np.ndarray | None] = {f"tar@{far:g}": v for far, v in tars.items()}
    per_gallery = []
    probe_column = column[np.searchsorted(ids, meta.probes.templates)] if meta.probes else None
    for name, outcomes in result.outcomes.items():
        rates = identification_replicates(outcomes, probe_column, counts, RANKS, FPIRS)
        replicates.update({f"{name}/{key}": v for key, v in rates.items()})
        per_gallery.append(rates)
    if per_gallery:
        shared = set.intersection(*(set(r) for r in per_gallery))
        replicates.update({f"mean/{key}": np.mean([r[key] for r in per_gallery], axis=0) for key in sorted(shared)})
    return replicates
