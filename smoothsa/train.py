"""Training (docs/official.md §4): Adam, linear-warmup-cosine lr, the detach_flag schedule, gradient clipping,
fp16 AMP, torch.compile, DistributedDataParallel, atomic checkpoints in the official layout, and resume.

    python -m smoothsa.train                       # the embedded demo: synthetic data, CPU, then evaluation
    python -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco
    python -m smoothsa.train --preset smoothsav_c-movi_c --data data/movi_c --out runs/movi_c --set optim.batch_size=4
    python -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco --resume
    torchrun --nproc_per_node 8 -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco
    python -m smoothsa.train --preset smoothsa_r_recogn-coco --data data/coco --out runs/recogn \\
        --discovery-ckpt runs/coco/ckpt-0100000.pth [--official-compat]
    python -m smoothsa.train --preset spot_r_distill-coco --data data/coco --out runs/distill \\
        --teacher-ckpt runs/spot/last.pth

A run folder that holds a run is refused unless --resume (continue it with its saved config.json) or
--overwrite (its files are moved to <out>/previous-<n>/). The state is saved at validations, every
--save-every-min minutes and on SIGTERM/SIGINT (then exit status 143/130: continue with --resume).
Exit status 2: a user error, said in one line (--debug shows the traceback).

`--set section.field=value` overrides any preset field (see `smoothsa.presets`); the batch size is per GPU.
The library behind it is `smoothsa.trainer` (`Trainer`, `train`).
"""
import argparse
import os

from smoothsa import cli, runs
from smoothsa.cli import UserError
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
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its state.pt, with its saved config.json")
    runs.add_arguments(parser)
    parser.add_argument("--backbone-weights", default="auto", metavar="PATH|auto|random",
                        help="the DINOv2 weights of a new run: auto (the cached file, else the download), a file, "
                             "or random (on purpose only: benchmarks, tests)")
    parser.add_argument("--discovery-ckpt", help="recognition presets: the trained discovery checkpoint")
    parser.add_argument("--teacher-ckpt", help="spot_r_distill-coco: the trained spot_r-coco checkpoint (the teacher)")
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
    cli.add_debug_argument(parser)
    return parser.parse_args(argv)


def run_options(args: argparse.Namespace, defaults: RunOptions | None = None) -> RunOptions:
    """The `RunOptions` of parsed arguments; `defaults` gives the workers, amp and compile setting where the
    arguments leave them open (None: `default_workers()`, amp and compile decided by the device)."""
    workers = args.workers if args.workers is not None else defaults.workers if defaults else default_workers()
    amp = args.amp if args.amp != "auto" or defaults is None else defaults.amp
    compile = args.compile if args.compile is not None or defaults is None else defaults.compile
    return RunOptions(amp=amp, compile=compile, compile_mode=args.compile_mode, backend=args.loader,
                      workers=workers, official_compat=args.official_compat)


def run_flags(args: argparse.Namespace) -> dict:
    """The run-folder arguments of `smoothsa.trainer.train` from parsed arguments."""
    return dict(resume=args.resume, overwrite=args.overwrite, overrides=args.overrides,
                save_every_min=args.save_every_min, keep_last=args.keep_last)


@cli.entry_point
def main(argv=None) -> None:
    args = parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.preset is None:
        from smoothsa.demo import DEMO_OPTIONS, run_demo

        device = cli.resolve_device(args.device or "cpu", local_rank)
        run_demo(out=args.out, data=args.data, device=device, backbone_weights=args.backbone_weights,
                 options=run_options(args, DEMO_OPTIONS), **run_flags(args))
        return
    device = cli.resolve_device(args.device, local_rank)
    if args.data is None:
        raise UserError("--data is required with --preset (a folder with train.lmdb and val.lmdb)")
    preset = apply_overrides(get_preset(args.preset), args.overrides)
    out = args.out or f"runs/{preset.name}"
    train(preset, args.data, out, run_options(args), device=device, discovery_ckpt=args.discovery_ckpt,
          teacher_ckpt=args.teacher_ckpt, backbone_weights=args.backbone_weights, **run_flags(args))


if __name__ == "__main__":
    main()
