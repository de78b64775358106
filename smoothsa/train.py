"""Training (docs/official.md §4): Adam, linear-warmup-cosine lr, the detach_flag schedule, gradient clipping,
fp16 AMP, torch.compile, DistributedDataParallel, atomic checkpoints in the official layout, and resume.

    python -m smoothsa.train                       # the embedded demo: synthetic data, CPU, then evaluation
    python -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco
    python -m smoothsa.train --preset smoothsav_c-movi_c --data data/movi_c --out runs/movi_c --set optim.batch_size=4
    python -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco --resume
    torchrun --nproc_per_node 8 -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco
    python -m smoothsa.train --preset smoothsa_r_recogn-coco --data data/coco --out runs/recogn \\
        --discovery-ckpt runs/coco/ckpt-0100000.pth [--official-compat]

`--set section.field=value` overrides any preset field (see `smoothsa.presets`); the batch size is per GPU.
The library behind it is `smoothsa.trainer` (`Trainer`, `train`).
"""
import argparse
import sys

from smoothsa.dataio import BACKENDS, default_workers
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.trainer import RunOptions, train


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="preset name (default: the embedded demo)")
    parser.add_argument("--data", help="folder with train.lmdb and val.lmdb")
    parser.add_argument("--out", help="run folder (checkpoints, logs, config); default runs/<preset>")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset field, e.g. optim.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    parser.add_argument("--discovery-ckpt", help="recognition presets: the trained discovery checkpoint")
    parser.add_argument("--device", help="cpu, cuda (this process's GPU), cuda:1, … (default: this process's GPU, else CPU)")
    parser.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "none"])
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    parser.add_argument("--compile", dest="compile", action="store_true")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--loader", default="torch", choices=BACKENDS,
                        help="torch-gpu: workers only decode; crop, resize, flip and normalise run on the GPU")
    parser.add_argument("--workers", type=int, help="loader workers per process (default: one per CPU less one, "
                        "at most 15; the demo: 0)")
    parser.add_argument("--official-compat", action="store_true",
                        help="the official metric arithmetic and recognition matching, in training and validation")
    return parser.parse_args(argv)


def run_options(args: argparse.Namespace, workers: int | None = None, amp: str | None = None) -> RunOptions:
    """The `RunOptions` of parsed arguments (`workers` / `amp`: defaults where the arguments leave them open;
    workers: `default_workers()` unless given)."""
    workers = args.workers if args.workers is not None else workers if workers is not None else default_workers()
    return RunOptions(amp=amp or args.amp, compile=args.compile, compile_mode=args.compile_mode, backend=args.loader,
                      workers=workers, official_compat=args.official_compat)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.preset is None:
        from smoothsa.demo import run_demo

        run_demo(out=args.out, data=args.data, overrides=args.overrides, resume=args.resume, device=args.device,
                 options=run_options(args, workers=0, amp="none" if args.amp == "auto" else args.amp))
        return
    if args.data is None:
        sys.exit("--data is required with --preset (a folder with train.lmdb and val.lmdb)")
    try:
        preset = apply_overrides(get_preset(args.preset), args.overrides)
    except (KeyError, ValueError) as error:
        sys.exit(f"error: {error}")
    out = args.out or f"runs/{preset.name}"
    train(preset, args.data, out, run_options(args), resume=args.resume, discovery_ckpt=args.discovery_ckpt,
          device=args.device)


if __name__ == "__main__":
    main()
