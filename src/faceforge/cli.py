"""Command line: `faceforge demo | train | eval | export | embed | verify | info | convert | synth | tokenize | list |
pack | pack-bin | bench`. User errors print one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from faceforge import __version__
from faceforge.cli_bench import add_bench_parser
from faceforge.config import SynthFaceConfig
from faceforge.errors import FaceforgeError
from faceforge.eval.options import THRESHOLD_FAR, EvalOptions


def cmd_demo(args: argparse.Namespace) -> int:
    from faceforge.demo import run_demo

    run_demo(args.overrides)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train or resume; a stop on SIGTERM/SIGINT prints its one line (rank 0) and exits with 128 + the signal."""
    from faceforge.distributed import shutdown
    from faceforge.config import load_config
    from faceforge.engine.stop import TrainingInterrupted
    from faceforge.engine.trainer import Trainer

    if args.resume:
        if args.config:
            args.overrides.insert(0, args.config)
        trainer = Trainer.resume(args.resume, args.overrides, step=args.step)
    else:
        if not args.config or args.step is not None:
            raise FaceforgeError("train needs a CONFIG.yaml, or --resume RUN_DIR [--step N]")
        trainer = Trainer.start(load_config(args.config, args.overrides))
    try:
        summary = trainer.fit()
    except TrainingInterrupted as exc:
        if trainer.par.is_main:
            print(f"faceforge: {exc}", file=sys.stderr)
        shutdown()
        return 128 + exc.signum
    shutdown()
    print(json.dumps(summary, default=float))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from faceforge.eval.model_eval import default_out_dir, evaluate_model, format_table, write_evaluation

    options = EvalOptions(batch_size=args.batch_size, device=args.device, flip=not args.no_flip, workers=args.workers,
                          progress=not args.no_progress, bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    evaluation = evaluate_model(args.weights, args.bins, args.ijb, backbone=args.backbone, options=options,
                                threshold_far=args.threshold_far, pixel_mean=args.pixel_mean, pixel_std=args.pixel_std)
    print(format_table(evaluation.rows))
    report = write_evaluation(evaluation, args.out or default_out_dir(args.weights))
    print(f"report: {report}")
    if args.json:
        print(json.dumps(evaluation.rows, default=float))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from faceforge.export.onnx import export_weights

    result = export_weights(args.weights, args.onnx, backbone=args.backbone, opset=args.opset)
    print(f"wrote {result['onnx']} (opset {result['opset']}): onnxruntime vs PyTorch max abs difference "
          f"{result['max_abs_diff']:.3g} (bound {result['bound']:.3g}, batches {result['batches']})")
    print(json.dumps(result))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from faceforge.eval.embed import Embedder, embed_folder

    embedder = Embedder(args.model, backbone=args.backbone, device=args.device, batch_size=args.batch_size,
                        pixel_mean=args.pixel_mean, pixel_std=args.pixel_std)
    print(json.dumps(embed_folder(embedder, args.images_dir, args.out, args.landmarks, normalize=not args.raw,
                                  progress=not args.no_progress)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from faceforge.eval.embed import Embedder, verify_pair

    embedder = Embedder(args.model, backbone=args.backbone, device=args.device, pixel_mean=args.pixel_mean,
                        pixel_std=args.pixel_std)
    result = verify_pair(embedder, args.image_a, args.image_b, args.landmarks, args.threshold)
    print(f"cosine {result['cosine']:.4f}: {'same' if result['same'] else 'different'} "
          f"(threshold {result['threshold']:.4f})")
    print(json.dumps(result))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from faceforge.models import load_model, model_info

    info = {"model": args.model, **model_info(load_model(args.model, args.backbone, args.pixel_mean, args.pixel_std))}
    parameters = f"{info['parameters']:,}"
    print(f"{info['architecture']}: embedding size {info['embedding_size']}, {parameters} parameters")
    print(f"architecture: {info['architecture_from']}")
    shape = ", ".join(map(str, info["input"]["shape"]))
    print(f"input [{shape}] {info['input']['dtype']} {info['input']['channels']}, {info['input']['normalisation']}")
    print(f"from {info['file']} ({info['format']})")
    print(json.dumps(info))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from faceforge.models import convert_model

    result = convert_model(args.model, args.out, args.backbone)
    print(f"wrote {result['out']}: {result['architecture']}, embedding size {result['embedding_size']}, "
          f"from {result['file']}")
    print(json.dumps(result))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    if args.ijb:
        from faceforge.data.synthface_ijb import generate_ijb

        print(json.dumps(generate_ijb(args.out_dir, subjects=args.subjects, probes_per_subject=args.probes_per_subject,
                                      seed=args.seed, nuisance=args.nuisance, workers=args.workers)))
        return 0
    from faceforge.engine.datasets import ensure_synthface

    cfg = SynthFaceConfig(**{name: getattr(args, name) for name in _synthface_defaults()})
    out = ensure_synthface(cfg, out_dir=Path(args.out_dir), workers=args.workers)
    print(json.dumps(json.loads((out / "synthface.json").read_text())))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from faceforge.engine.tokenize import tokenize_dataset

    summary = tokenize_dataset(
        args.data, args.source, args.v, args.out, epochs=args.epochs, seed=args.seed, t=args.t, lr=args.lr,
        subset=args.subset, length=args.length, dim=args.dim, backbone=args.backbone,
        images_per_identity=args.images_per_id, batch_size=args.batch_size, workers=args.workers,
        pixel_mean=args.pixel_mean, pixel_std=args.pixel_std, device=args.device, progress=not args.no_progress,
    )
    print(json.dumps(summary))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """The registered names of every component a config table can name, one kind per line."""
    from faceforge.backbones import list_backbones
    from faceforge.heads import list_head_wrappers, list_heads
    from faceforge.regularizers import list_regularizers

    kinds = {"backbones": list_backbones(), "heads": list_heads(), "head_wrappers": list_head_wrappers(),
             "regularizers": list_regularizers()}
    for kind, names in kinds.items():
        print(f"{kind}: {' '.join(names)}")
    if args.json:
        print(json.dumps(kinds))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from faceforge.data.pack import pack_folder

    stats = pack_folder(args.image_root, args.out_dir, landmarks=args.landmarks, workers=args.workers,
                        quality=args.quality)
    print(json.dumps(stats, default=str))
    return 0


def cmd_pack_bin(args: argparse.Namespace) -> int:
    from faceforge.data.pack import pack_pairs

    pairs = pack_pairs(args.pairs, args.out_bin, root=args.root, landmarks=args.landmarks)
    print(json.dumps({"out_bin": args.out_bin, "pairs": pairs}))
    return 0


def _synthface_defaults() -> dict[str, int | float]:
    """The SynthFace parameters `faceforge synth` takes as flags, with the config's defaults (one source)."""
    return {k: v for k, v in dataclasses.asdict(SynthFaceConfig()).items() if k != "cache_dir"}


_MODEL_HELP = ("a faceforge run folder or checkpoint, a .safetensors / .pt / .pth / .bin state dict (arcface_torch), "
               "an .onnx model, or a folder holding one of these")
_BACKBONE_HELP = "architecture (r18 ... r200, mbf, mbf_large, tiny); read from the weights when not given"


def _input_options(p: argparse.ArgumentParser) -> None:
    """--backbone, and an ONNX model's input scaling."""
    p.add_argument("--backbone", help=_BACKBONE_HELP)
    p.add_argument("--pixel-mean", type=float, nargs=3, metavar="M",
                   help="ONNX input: (pixel/255 - mean) / std, RGB (default 0.5 0.5 0.5: InsightFace's)")
    p.add_argument("--pixel-std", type=float, nargs=3, metavar="S", help="ONNX input std (default 0.5 0.5 0.5)")


def _model_options(p: argparse.ArgumentParser, batch_size: int | None = None, progress: bool = False) -> None:
    """The options of every command that runs a model: --backbone, the ONNX input scaling, --device, and when
    asked --batch-size (with this default) and --no-progress."""
    _input_options(p)
    p.add_argument("--device", default="auto")
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size)
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceforge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"faceforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="SynthFace + a small ArcFace model on the CPU in minutes, with baselines")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.time_budget_s=60")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train from a YAML config, or resume a run folder")
    p.add_argument("config", nargs="?", help="CONFIG.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. head.m=0.4)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest intact checkpoint")
    p.add_argument("--step", type=int, metavar="N", help="with --resume: from the kept checkpoint of step N "
                                                         "(later checkpoints and metrics are dropped)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="verification .bin sets and IJB-B/C folders -> one report (report.md, JSON, plots)")
    p.add_argument("weights", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--bin", dest="bins", action="append", default=[], help="verification .bin (repeatable)")
    p.add_argument("--ijb", action="append", default=[], metavar="IJB_ROOT",
                   help="IJB-B/C folder in InsightFace's layout: meta/, loose_crop/ (repeatable)")
    p.add_argument("--out", help="report folder (default: <run folder>/eval, or eval/ beside the model file)")
    p.add_argument("--threshold-far", type=float, default=THRESHOLD_FAR,
                   help="FAR of the verify threshold stored beside the weights (chosen on the first IJB set, "
                        "else the first .bin set)")
    _model_options(p, batch_size=EvalOptions.batch_size, progress=True)
    p.add_argument("--workers", type=int, default=EvalOptions.workers, help="image decoding / alignment processes for IJB")
    p.add_argument("--no-flip", action="store_true", help="skip flip-test fusion")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="IJB sets: 95%% intervals of every metric from N subject-level bootstrap resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0,
                   help="seed of the resamples: equal seeds pair two models' intervals on the same set")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export torch weights to ONNX (dynamic batch), checked in onnxruntime")
    p.add_argument("weights", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--backbone", help=_BACKBONE_HELP)
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, written exactly or refused (9 and up)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="embed the face images of a folder (flip-fused, L2-normalised) into a .npy")
    p.add_argument("images_dir")
    p.add_argument("--out", required=True, help="output .npy ([N, D] float32); row names go to the same path .txt")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--landmarks", help="file of 'relative/path.jpg x1 y1 ... x5 y5' lines: align raw images "
                                       "(without it the images must be aligned 112x112 crops)")
    p.add_argument("--raw", action="store_true", help="keep the embedding norms (no L2 normalisation)")
    _model_options(p, batch_size=64, progress=True)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("verify", help="cosine of two face images and same/different at the model's stored threshold")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--threshold", type=float, help="decide at this cosine instead of the threshold stored by eval")
    p.add_argument("--landmarks", help="5-point landmarks file (keys: the paths as given, or file names)")
    _model_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("info", help="a model's architecture, embedding size, parameters, input and where it came from")
    p.add_argument("model", help=_MODEL_HELP)
    _input_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="any torch model file -> a faceforge .safetensors (backbone weights)")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--backbone", help=_BACKBONE_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("synth", help="generate a SynthFace set (train.rec/.idx/property + heldout.bin), "
                                     "or with --ijb a SynthFace IJB folder")
    p.add_argument("out_dir")
    p.add_argument("--ijb", action="store_true", help="IJB layout: loose crops, 5 points, templates, pairs, galleries")
    p.add_argument("--subjects", type=int, default=200, help="--ijb: subjects (one gallery template each)")
    p.add_argument("--probes-per-subject", type=int, default=2, help="--ijb: probe templates per subject")
    for name, default in _synthface_defaults().items():  # the synthface config table's keys, its defaults
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help="default %(default)s")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("tokenize", help="GIF identity codes: prototypes, uniformity spreading, balanced k-means")
    p.add_argument("--data", required=True, help="training set: a .rec folder, an image folder or 'synthface'")
    p.add_argument("--source", required=True,
                   help="'random', or a model (" + _MODEL_HELP + "), e.g. an .onnx image encoder such as CLIP")
    p.add_argument("--v", type=int, default=16, help="vocabulary size (branches per k-means level)")
    p.add_argument("--out", required=True, help="codes file (.safetensors)")
    p.add_argument("--epochs", type=int, default=1000, help="uniformity-spreading epochs (0: none)")
    p.add_argument("--t", type=float, default=2.0, help="Gaussian-potential temperature")
    p.add_argument("--lr", type=float, default=0.1, help="spreading SGD learning rate")
    p.add_argument("--subset", type=int, default=2048, help="identities per spreading step")
    p.add_argument("--length", type=int, help="code length l (default: ceil(log_v N))")
    p.add_argument("--dim", type=int, default=512, help="prototype dimension for --source random")
    p.add_argument("--images-per-id", type=int, help="images per identity for the mean embedding (default: all)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    _model_options(p, batch_size=256, progress=True)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("list", help="the backbones, heads and regularizers a config can name")
    p.add_argument("--json", action="store_true", help="also print them as one JSON line")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("pack", help="pack an image folder (one sub-folder per identity) into train.rec/.idx/property")
    p.add_argument("image_root")
    p.add_argument("out_dir")
    p.add_argument("--landmarks", help="file of 'relative/path.jpg x1 y1 ... x5 y5' lines: align on the way")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the packed images")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("pack-bin", help="write a verification .bin from a list of 'path_a path_b 1|0' pairs")
    p.add_argument("pairs", help="pairs list; paths relative to its folder or to --root")
    p.add_argument("out_bin")
    p.add_argument("--root", help="folder the pair paths are relative to")
    p.add_argument("--landmarks", help="5-point landmarks file to align the images with")
    p.set_defaults(func=cmd_pack_bin)

    add_bench_parser(sub)
    return parser


def _use_huge_pages() -> None:
    """Ask torch to back CPU tensors of 2 MB and more with transparent huge pages (its THP_MEM_ALLOC_ENABLE).

    A step on the CPU allocates fresh [S, D] temporaries each time (a sampled block of centres, its gradient,
    the update's rows); with 4 KB pages the kernel faults and zeroes every page on first touch, which took
    about half of a PartialFC head step on one thread. torch reads the variable once, at its first allocation,
    so it is set here, before any command imports torch; a value the user set is kept.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    _use_huge_pages()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FaceforgeError as exc:
        print(f"faceforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
