"""SynthFace in IJB form: loose face crops with 5-point landmarks and faceness scores, templates of several media
(stills and multi-frame videos), 1:1 pairs and two 1:N galleries, written in InsightFace's IJB layout.

Subjects come from their own SeedSequence split (`IJB_SPLIT`), disjoint from SynthFace's training identities.
Subject s owns one gallery template (stills; galleries G1 / G2 take the even / odd subjects) and
`probes_per_subject` probe templates; every gallery template is paired with every probe template.
Landmarks are the projected centres of the rendered eyes, nose tip and mouth corners plus detector noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from faceforge.data.images import encode_jpeg
from faceforge.data.synthface import SetStamp, identity_params, mapper
from faceforge.data.synthface_render import SIZE, Params, render_images, sample_nuisance, stack_params
from faceforge.errors import ConfigError

VERSION = 1
IJB_SPLIT = 3
PREFIX = "synthijb"
_SUBJECTS_PER_TASK = 8
_LANDMARK_NOISE_PX = 0.8
STAMP = SetStamp("synthface_ijb.json", VERSION, "SynthFace IJB set")


def landmarks(identity: Params, nuisance: Params) -> np.ndarray:
    """[n, 5, 2] pixel positions (OpenCV convention) of the eye centres, nose tip and mouth corners, image-left
    first, in faces rendered from stacked identity and nuisance parameters (see synthface_render)."""
    radius = identity["face"][:, 0] * 1.08
    eye_y, eye_dx = identity["eye"][:, 0], identity["eye"][:, 1]
    mouth_y, half_width = identity["mouth"][:, 0], identity["mouth"][:, 1]
    smile = nuisance["expression"][:, 0]
    rot, scale, shift_x, shift_y, yaw = nuisance["pose"].T
    corner = half_width * (1 + 0.15 * smile)
    frontal_u = np.stack([-eye_dx, eye_dx, 0.12 * np.sin(yaw), -corner, corner], axis=1)
    v = np.stack([eye_y, eye_y, identity["nose"][:, 0], mouth_y - 0.06 * smile, mouth_y - 0.06 * smile], axis=1)
    # The renderer's cylinder model for yaw, then its similarity transform, from the head frame to the screen.
    u = radius[:, None] * np.sin(np.arcsin(np.clip(frontal_u / radius[:, None], -1, 1)) + yaw[:, None])
    x = shift_x[:, None] + scale[:, None] * (np.cos(rot)[:, None] * u - np.sin(rot)[:, None] * v)
    y = shift_y[:, None] + scale[:, None] * (np.sin(rot)[:, None] * u + np.cos(rot)[:, None] * v)
    return np.stack([(x + 1) * SIZE / 2 - 0.5, (y + 1) * SIZE / 2 - 0.5], axis=-1)


def _loose(nuisance: Params, rng: np.random.Generator) -> Params:
    """A looser, less centred crop than SynthFace's training images: smaller, turned and shifted face."""
    pose = nuisance["pose"].copy()
    pose[0] += rng.uniform(-0.25, 0.25)
    pose[1] *= rng.uniform(0.72, 0.9)
    pose[2:4] += rng.uniform(-0.08, 0.08, 2)
    return {**nuisance, "pose": pose}


def _frames(base: Params, count: int, rng: np.random.Generator) -> list[Params]:
    """Frames of one video: the media's nuisance with a little motion, expression change and fresh sensor noise."""
    frames = []
    for _ in range(count):
        frame = {k: v.copy() for k, v in base.items()}
        frame["pose"] += rng.normal(0, [0.03, 0.02, 0.015, 0.015, 0.08]).astype(np.float32)
        frame["expression"][:3] += rng.normal(0, 0.1, 3).astype(np.float32)
        frame["degrade"][2:4] = rng.integers(0, SIZE, 2)
        frames.append(frame)
    return frames


def _faceness(nuisance: Params, rng: np.random.Generator) -> float:
    """A stand-in detector confidence: lower for occluded, blurred or strongly turned faces."""
    blur, yaw, occluded = nuisance["degrade"][0], nuisance["pose"][4], nuisance["occlusion"][0]
    return float(np.clip(0.97 - 0.2 * occluded - 0.1 * blur - 0.2 * abs(yaw) + rng.normal(0, 0.02), 0.3, 1.0))


def render_subject(seed: int, subject: int, probes_per_subject: int, nuisance: float) -> list[list[list[tuple]]]:
    """One subject's templates (gallery first), each a list of media, each a list of frames
    (JPEG bytes, [5, 2] landmarks, faceness)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(IJB_SPLIT, subject, 1)))
    plan: list[list[int]] = []  # frames per media, per template
    for template in range(1 + probes_per_subject):
        media = rng.integers(1, 4)
        plan.append([1 if template == 0 or rng.random() < 0.6 else int(rng.integers(2, 5)) for _ in range(media)])
    images = []
    for frames_per_media in plan:
        for frames in frames_per_media:
            base = _loose(sample_nuisance(rng, nuisance), rng)
            images += [base] if frames == 1 else _frames(base, frames, rng)
    identity = stack_params([identity_params(seed, IJB_SPLIT, subject)] * len(images))
    stacked = stack_params(images)
    pixels = render_images(identity, stacked)
    points = landmarks(identity, stacked) + rng.normal(0, _LANDMARK_NOISE_PX, (len(images), 5, 2))
    records = iter([(encode_jpeg(rgb, int(p["degrade"][4])), pts, _faceness(p, rng))
                    for rgb, pts, p in zip(pixels, points, images)])
    return [[[next(records) for _ in range(frames)] for frames in template] for template in plan]


def _render_task(args: tuple) -> list:
    seed, first, count, probes, nuisance = args
    return [render_subject(seed, s, probes, nuisance) for s in range(first, first + count)]


def generate_ijb(
    out_dir: str | os.PathLike,
    subjects: int = 200,
    probes_per_subject: int = 2,
    seed: int = 0,
    nuisance: float = 0.75,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Write a SynthFace IJB set to `out_dir` (atomically, via a temporary folder) and return its metadata;
    returns at once when `out_dir` already holds one made with the same parameters."""
    if subjects < 2 or probes_per_subject < 1:
        raise ConfigError(f"need >= 2 subjects and >= 1 probe template each, got {subjects} and {probes_per_subject}")
    params = {"subjects": subjects, "probes_per_subject": probes_per_subject, "seed": seed, "nuisance": float(nuisance)}
    tasks = [(seed, first, min(_SUBJECTS_PER_TASK, subjects - first), probes_per_subject, float(nuisance))
             for first in range(0, subjects, _SUBJECTS_PER_TASK)]

    def write(tmp: Path) -> dict:
        (tmp / "loose_crop").mkdir()
        rendered: list = []
        with tqdm(total=subjects, desc="SynthFace IJB", unit="subject", disable=not progress) as bar, \
                mapper(workers) as pool_map:
            for chunk in pool_map(_render_task, tasks):
                rendered += chunk
                bar.update(len(chunk))
        return {"format": "synthface_ijb", "version": VERSION, "params": params, "counts": _write(tmp, rendered)}

    return STAMP.build(Path(out_dir), params, write)


def _write(root: Path, subjects: list[list[list[list[tuple]]]]) -> dict:
    """Write images and meta files; ids count up from 1 in subject, template, media, frame order."""
    faces, points, lists = [], [], {"G1": [], "G2": [], "probe_mixed": []}
    gallery_ids, probe_ids = [], []
    template_id = media_id = 0
    for s, templates in enumerate(subjects):
        for t, media in enumerate(templates):
            template_id += 1
            (gallery_ids if t == 0 else probe_ids).append((template_id, s))
            listing = lists["G1" if s % 2 == 0 else "G2"] if t == 0 else lists["probe_mixed"]
            for frames in media:
                media_id += 1
                for jpeg, pts, score in frames:
                    name = f"{len(faces) + 1}.jpg"
                    (root / "loose_crop" / name).write_bytes(jpeg)
                    faces.append(f"{name} {template_id} {media_id}")
                    points.append(" ".join([name, *(f"{v:.3f}" for v in pts.ravel()), f"{score:.4f}"]))
                    listing.append(f"{template_id},{s + 1},loose_crop/{name}")
    pairs = [f"{g} {p} {int(gs == ps)}" for g, gs in gallery_ids for p, ps in probe_ids]
    meta = root / "meta"
    meta.mkdir()
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME"
    files = {"face_tid_mid.txt": faces, "name_5pts_score.txt": points, "template_pair_label.txt": pairs,
             "1N_gallery_G1.csv": [header, *lists["G1"]], "1N_gallery_G2.csv": [header, *lists["G2"]],
             "1N_probe_mixed.csv": [header, *lists["probe_mixed"]]}
    for name, lines in files.items():
        (meta / f"{PREFIX}_{name}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"subjects": len(subjects), "images": len(faces), "media": media_id, "templates": template_id,
            "pairs": len(pairs), "genuine_pairs": len(probe_ids)}
