"""Read an IJB-B / IJB-C folder in InsightFace's layout: `meta/<prefix>_*.txt|csv` and `loose_crop/`.

Every malformed line, missing file or unknown template id is a DataError naming the file and the line.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceforge.data.synthface_ijb import PREFIX as SYNTH_PREFIX
from faceforge.errors import DataError

NAMES = {"ijbb": "IJB-B", "ijbc": "IJB-C", SYNTH_PREFIX: "SynthFace-IJB"}
GALLERIES = ("G1", "G2", "S1", "S2")  # IJB-C names its two 1:N galleries G1/G2, IJB-B S1/S2


@dataclass
class TemplateList:
    """Templates of a 1:N gallery or probe list, one entry per template, and the line each first appeared on."""

    path: Path
    templates: np.ndarray  # int64 [T]
    subjects: np.ndarray  # int64 [T]
    lines: np.ndarray  # int64 [T]


@dataclass
class IJBMeta:
    """One IJB set: per-image template / media ids, 5 landmarks and faceness; 1:1 pairs; 1:N lists if present."""

    name: str
    root: Path
    prefix: str
    images: list[str]
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    landmarks: np.ndarray  # float32 [N, 5, 2], (x, y) in loose_crop pixels
    faceness: np.ndarray  # float32 [N]
    pairs: np.ndarray  # int64 [M, 2] template ids
    labels: np.ndarray  # bool [M]
    galleries: dict[str, TemplateList] = field(default_factory=dict)
    probes: TemplateList | None = None

    def meta_file(self, suffix: str) -> Path:
        return self.root / "meta" / f"{self.prefix}_{suffix}"

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (expected InsightFace's IJB layout: meta/, loose_crop/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def _fields(path: Path, lines: list[str], count: int, expected: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, checking the field count."""
    for number, line in enumerate(lines, 1):
        parts = [p.strip() for p in line.split(",")] if path.suffix == ".csv" else line.split()
        if not line.strip():
            continue
        if len(parts) < count:
            raise _bad(path, number, expected, line)
        yield number, parts


def _bad(path: Path, number: int, expected: str, line: str) -> DataError:
    return DataError(f"{path}, line {number}: expected '{expected}', got {line.strip()[:80]!r}")


def read_face_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`<prefix>_face_tid_mid.txt`: (image names, template ids, media ids)."""
    expected = "image_name template_id media_id"
    lines = _read_lines(path)
    names, ids, seen = [], [], set()
    for number, parts in _fields(path, lines, 3, expected):
        try:
            ids.append((int(parts[1]), int(parts[2])))
        except ValueError:
            raise _bad(path, number, expected, lines[number - 1]) from None
        if parts[0] in seen:
            raise DataError(f"{path}, line {number}: image {parts[0]} listed twice")
        seen.add(parts[0])
        names.append(parts[0])
    if not names:
        raise DataError(f"{path}: no images listed")
    table = np.array(ids, dtype=np.int64)
    return names, table[:, 0], table[:, 1]


def read_landmarks(path: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`<prefix>_name_5pts_score.txt` lines `image x1 y1 ... x5 y5 faceness`: arrays in the order of `names`."""
    expected = "image_name x1 y1 ... x5 y5 faceness_score"
    lines = _read_lines(path)
    position = {name: i for i, name in enumerate(names)}
    values = np.full((len(names), 11), np.nan, dtype=np.float64)
    for number, parts in _fields(path, lines, 12, expected):
        row = position.get(parts[0])
        if row is None:
            continue
        try:
            values[row] = [float(v) for v in parts[1:12]]
        except ValueError:
            raise _bad(path, number, expected, lines[number - 1]) from None
        if not np.isfinite(values[row]).all():
            raise _bad(path, number, expected, lines[number - 1])
    missing = np.flatnonzero(np.isnan(values[:, 0]))
    if missing.size:
        raise DataError(f"{path}: no landmarks for {names[missing[0]]} (and {missing.size - 1} more images)")
    return values[:, :10].reshape(-1, 5, 2).astype(np.float32), values[:, 10].astype(np.float32)


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`<prefix>_template_pair_label.txt` lines `tid1 tid2 label`: ([M, 2] template ids, bool labels)."""
    expected = "template_id_1 template_id_2 label(0/1)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file is reported below
            table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (expected InsightFace's IJB layout: meta/, loose_crop/)") from None
    except ValueError:
        table = None
    if table is None or (table.size and table.shape[1] != 3) or (table.size and not np.isin(table[:, 2], (0, 1)).all()):
        # The fast reader only says that something is wrong; find the line by reading it slowly.
        lines = _read_lines(path)
        for number, parts in _fields(path, lines, 3, expected):
            if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts) or parts[2] not in ("0", "1"):
                raise _bad(path, number, expected, lines[number - 1])
        raise DataError(f"{path}: cannot parse as '{expected}' lines")
    if table.size == 0:
        raise DataError(f"{path}: no pairs listed")
    labels = table[:, 2].astype(bool)
    if labels.all() or not labels.any():
        raise DataError(f"{path}: needs both genuine (1) and impostor (0) pairs")
    return table[:, :2], labels


def read_template_list(path: Path) -> TemplateList:
    """A 1:N csv (`TEMPLATE_ID,SUBJECT_ID,...` header, one row per image): one entry per template."""
    expected = "TEMPLATE_ID,SUBJECT_ID,..."
    lines = _read_lines(path)
    seen: dict[int, tuple[int, int]] = {}
    for number, parts in _fields(path, lines, 2, expected):
        try:
            template, subject = int(parts[0]), int(parts[1])
        except ValueError:
            if number == 1:
                continue  # the header
            raise _bad(path, number, expected, lines[number - 1]) from None
        if seen.setdefault(template, (subject, number))[0] != subject:
            raise DataError(f"{path}, line {number}: template {template} listed with subjects "
                            f"{seen[template][0]} and {subject}")
    if not seen:
        raise DataError(f"{path}: no templates listed")
    table = np.array([(t, s, n) for t, (s, n) in seen.items()], dtype=np.int64)
    return TemplateList(path, table[:, 0], table[:, 1], table[:, 2])


def read_ijb(root: str | Path) -> IJBMeta:
    """Read the meta files of an IJB folder; the 1:N lists are optional (1:N runs only when they are there)."""
    root = Path(root)
    found = sorted((root / "meta").glob("*_face_tid_mid.txt"))
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise DataError(f"{root}: {what} meta/*_face_tid_mid.txt "
                        "(expected InsightFace's IJB layout: meta/, loose_crop/)")
    prefix = found[0].name[: -len("_face_tid_mid.txt")]
    names, templates, medias = read_face_list(found[0])
    meta = IJBMeta(NAMES.get(prefix.lower(), prefix), root, prefix, names, templates, medias,
                   *read_landmarks(root / "meta" / f"{prefix}_name_5pts_score.txt", names),
                   *read_pairs(root / "meta" / f"{prefix}_template_pair_label.txt"))
    known = np.unique(templates)
    _check_known(meta.pairs.ravel(), known, meta.meta_file("template_pair_label.txt"), found[0],
                 lines=np.arange(meta.pairs.size) // 2 + 1)
    probe_path = meta.meta_file("1N_probe_mixed.csv")
    for gallery in GALLERIES:
        path = meta.meta_file(f"1N_gallery_{gallery}.csv")
        if path.is_file() and probe_path.is_file():
            meta.galleries[gallery] = read_template_list(path)
    if meta.galleries:
        meta.probes = read_template_list(probe_path)
        for listed in (*meta.galleries.values(), meta.probes):
            _check_known(listed.templates, known, listed.path, found[0], listed.lines)
    return meta


def _check_known(ids: np.ndarray, known: np.ndarray, path: Path, face_list: Path, lines: np.ndarray) -> None:
    where = np.searchsorted(known, ids).clip(max=known.size - 1)
    unknown = np.flatnonzero(known[where] != ids)
    if unknown.size:
        first = unknown[0]
        raise DataError(f"{path}, line {lines[first]}: template {ids[first]} has no images in {face_list.name}")
