"""Data-loading throughput: JPEG decode + random flip + [-1, 1] float, per JPEG decoder and through TrainLoader.

Builds (once, cached under .cache/bench/) a 20,000-image SynthFace .rec, then prints one JSON line per case:
  decode        bodies already in memory, one process, one thread: the decoder's cost alone
  dataset_read  the same through RecordDataset.read (file read + header + Pillow decode), one process
  train_loader  TrainLoader with --workers worker processes, batches turned into model input in the parent
Decoders other than Pillow are used when importable (simplejpeg, PyTurboJPEG, opencv-python-headless); PyTurboJPEG
also needs the system libturbojpeg (or --turbojpeg-lib PATH). Usage: python benchmarks/data_loader.py [--help]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL
import torch

from faceforge.data.images import decode_image, encode_jpeg
from faceforge.data.loader import BatchPlan, TrainLoader, to_model_input
from faceforge.data.record_dataset import RecordDataset
from faceforge.data.recordio import write_insightface_set

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"
Decoder = Callable[[bytes], np.ndarray]


def build_set(images: int, per_id: int) -> tuple[Path, str]:
    """The cached training folder and what made it: SynthFace when its generator works, else plain JPEGs."""
    identities = images // per_id
    try:
        from faceforge.data.synthface import generate

        out = CACHE / f"synthface-{identities}x{per_id}"
        generate(out, identities=identities, images_per_id=per_id, eval_identities=20, eval_images_per_id=2,
                 pairs=20, seed=0, workers=os.cpu_count() or 1, progress=True)
        return out / "train", "synthface"
    except Exception as exc:  # any failure of the other helper's generator: fall back, and say so
        print(json.dumps({"bench": "data_loader", "note": f"synthface unavailable ({type(exc).__name__}: {exc})"}))
    out = CACHE / f"gradients-{identities}x{per_id}"
    if not (out / "property").exists():
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:112, 0:112] / 112.0

        def samples():
            for i in range(identities * per_id):
                a, b, c = rng.uniform(1, 8, 3)
                rgb = np.stack([np.sin(a * x + b * y + c + k) for k in range(3)], -1)
                noise = rng.normal(0, 8, rgb.shape)
                yield encode_jpeg(np.clip((rgb + 1) * 120 + noise, 0, 255).astype(np.uint8), 90), i // per_id

        write_insightface_set(out, samples(), identities)
    return out, "gradients"


def decoders(turbojpeg_lib: str | None) -> dict[str, tuple[Decoder | None, str]]:
    """name -> (RGB decode function or None, version or why it is unavailable)."""
    found: dict[str, tuple[Decoder | None, str]] = {
        "pillow": (lambda body: decode_image(body, "bench"), PIL.__version__)
    }
    try:
        import simplejpeg

        found["simplejpeg"] = (lambda body: simplejpeg.decode_jpeg(body, colorspace="RGB"), simplejpeg.__version__)
    except ImportError as exc:
        found["simplejpeg"] = (None, f"not installed ({exc})")
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        jpeg = TurboJPEG(turbojpeg_lib)
        found["turbojpeg"] = (lambda body: jpeg.decode(body, pixel_format=TJPF_RGB),
                              importlib.metadata.version("PyTurboJPEG"))
    except ImportError as exc:
        found["turbojpeg"] = (None, f"not installed ({exc})")
    except (OSError, RuntimeError) as exc:
        found["turbojpeg"] = (None, f"no libturbojpeg ({' '.join(str(exc).split())[:120]})")
    try:
        import cv2

        cv2.setNumThreads(1)
        found["opencv"] = (lambda body: cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR_RGB),
                           cv2.__version__)
    except ImportError as exc:
        found["opencv"] = (None, f"not installed ({exc})")
    return found


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def augmented_rate(items: Sequence, fetch: Callable[[object], np.ndarray], batch: int, repeat: int) -> dict:
    """Median images/s of fetch (decode) → uint8 batch → flipped [-1, 1] float NCHW over `items`, and of the
    decode step alone (on a GPU run the float conversion happens on the device, so decode is the CPU cost)."""
    generator = torch.Generator().manual_seed(0)
    total, decode = [], []
    for _ in range(repeat):
        decoding = 0.0
        start = time.perf_counter()
        for i in range(0, len(items), batch):
            tick = time.perf_counter()
            images = torch.from_numpy(np.stack([fetch(item) for item in items[i : i + batch]]))
            decoding += time.perf_counter() - tick
            to_model_input(images, torch.device("cpu"), flip=True, generator=generator)
        total.append(len(items) / (time.perf_counter() - start))
        decode.append(len(items) / decoding)
    return {"images_per_s": round(statistics.median(total)),
            "decode_only_images_per_s": round(statistics.median(decode)), "runs": [round(r) for r in total]}


class _Decoding:
    """RecordDataset's records decoded with another decoder (the loader only needs len and read)."""

    def __init__(self, records: RecordDataset, decode: Decoder) -> None:
        self.records, self.decode = records, decode

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        key = self.records.keys[index]
        header, body = self.records.reader.read(key)
        return self.decode(body), int(header.label)


def loader_rate(dataset, batch: int, workers: int, batches: int, augment: bool) -> float:
    """Steady-state images/s of TrainLoader (timed from the first batch, over `batches` batches), optionally with
    model-input preparation in the parent as the trainer does it on a CPU run."""
    plan = BatchPlan(len(dataset), batch, seed=0)
    loader = TrainLoader(dataset, plan, num_workers=workers, progress=False)
    generator = torch.Generator().manual_seed(0)
    count, start = 0, 0.0
    for step, (images, _, _) in enumerate(loader.epoch(0)):
        if augment:
            to_model_input(images, torch.device("cpu"), flip=True, generator=generator)
        if step == 0:
            start = time.perf_counter()
        else:
            count += len(images)
        if step == batches:
            break
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="training images in the cached set")
    parser.add_argument("--decode-images", type=int, default=5_000, help="images per timed decode pass")
    parser.add_argument("--repeat", type=int, default=3, help="timed decode passes (median reported)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="TrainLoader worker processes")
    parser.add_argument("--loader-batches", type=int, default=40, help="timed TrainLoader batches per case")
    parser.add_argument("--decoders", nargs="+", default=["pillow", "simplejpeg", "turbojpeg", "opencv"])
    parser.add_argument("--turbojpeg-lib", default=os.environ.get("TURBOJPEG_LIB"), help="path to libturbojpeg.so")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root, source = build_set(args.images, per_id=20)
    records = RecordDataset(root)
    info = {"bench": "data_loader", "data": source, "images": len(records), **machine()}
    bodies = [records.reader.read(key)[1] for key in records.keys[: args.decode_images]]
    reference = [decode_image(body, "bench") for body in bodies[:200]]
    available = decoders(args.turbojpeg_lib)

    def emit(**row) -> None:
        print(json.dumps({**info, **row}), flush=True)

    for name in args.decoders:
        decode, version = available.get(name, (None, "unknown decoder"))
        if decode is None:
            emit(case="decode", decoder=name, skipped=version)
            continue
        diff = max(int(np.abs(decode(body).astype(int) - ref).max()) for body, ref in zip(bodies, reference))
        emit(case="decode", decoder=name, version=version, workers=1,
             **augmented_rate(bodies, decode, args.batch, args.repeat), max_abs_diff_vs_pillow=diff)

    emit(case="dataset_read", decoder="pillow", workers=1,
         **augmented_rate(range(len(bodies)), lambda i: records.read(i)[0], args.batch, args.repeat))

    for name in args.decoders:
        decode, _ = available.get(name, (None, ""))
        if decode is not None:
            dataset = records if name == "pillow" else _Decoding(records, decode)
            rates = {key: round(loader_rate(dataset, args.batch, args.workers, args.loader_batches, augment))
                     for key, augment in (("images_per_s", True), ("no_augment_images_per_s", False))}
            emit(case="train_loader", decoder=name, workers=args.workers, batch=args.batch, **rates)


if __name__ == "__main__":
    main()
