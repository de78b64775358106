"""User errors at the command line's edge: one stderr line, exit status 2, a traceback only with --debug; and
`--device` resolved to this rank's GPU with clear errors."""
import errno
import os

import pytest
import torch

from smoothsa import cli
from smoothsa.checkpoint import load_official, read_checkpoint
from smoothsa.data import LoaderOptions, build_loader
from smoothsa.presets import PRESETS, apply_overrides, get_preset


def run_main(body, argv, capsys):
    """Calls `body` as an entry point's main; returns (exit status, stderr)."""

    @cli.entry_point
    def main(argv=None):
        body()
        return "done"

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err


def bad_checkpoint(tmp_path):
    path = tmp_path / "last.pth"
    path.write_bytes(b"PK\x03\x04 half a zip")
    return lambda: read_checkpoint(path)


def wrong_checkpoint(tmp_path):
    from smoothsa.build import build_model

    model = build_model("demo", backbone=False)
    return lambda: load_official(model, {"m.decode.bos": torch.zeros(1)})


CASES = {
    "preset": (lambda tmp: lambda: get_preset("smoothsa_r-cocoa"), "unknown preset 'smoothsa_r-cocoa'; known presets: demo"),
    "set": (lambda tmp: lambda: apply_overrides(get_preset("demo"), ["optim.clip_type=l3"]),
            "--set optim.clip_type=l3: expected one of 'l2', 'inf'"),
    "range": (lambda tmp: lambda: apply_overrides(get_preset("demo"), ["optim.batch_size=-4"]),
              "optim.batch_size must be at least 1, got -4"),
    "data": (lambda tmp: lambda: build_loader(get_preset("demo"), tmp / "nowhere", "train", LoaderOptions(batch_size=4)),
             "no train split at"),
    "checkpoint file": (bad_checkpoint, "last.pth is not a readable checkpoint (RuntimeError: PytorchStreamReader"),
    "checkpoint keys": (wrong_checkpoint, "checkpoint does not match SmoothSA"),
    "device": (lambda tmp: lambda: cli.resolve_device("tpu", 0), "--device tpu: unknown device"),
    "disk": (lambda tmp: lambda: _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "log.csv"))),
             "log.csv: No space left on device; free some space or choose another --out"),
    "read-only": (lambda tmp: lambda: _raise(PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp))),
                  "Permission denied; check its permissions"),
}


def _raise(error):
    raise error


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_is_one_line_and_status_2(case, tmp_path, capsys):
    make, expected = CASES[case]
    status, error = run_main(make(tmp_path), [], capsys)
    assert status == 2
    assert error.startswith("error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    assert expected in error, error


def test_debug_adds_the_traceback(capsys):
    status, error = run_main(lambda: get_preset("nope"), ["--preset", "nope", "--debug"], capsys)
    assert status == 2 and "Traceback" in error and error.rstrip().endswith("known presets: " + ", ".join(sorted(PRESETS)))


def test_a_bug_keeps_its_traceback_and_a_success_returns():
    @cli.entry_point
    def broken(argv=None):
        raise RuntimeError("a bug, not the user's fault")

    with pytest.raises(RuntimeError, match="a bug"):
        broken([])
    assert cli.entry_point(lambda argv=None: 7)([]) == 7


def test_ctrl_c_exits_130_without_a_traceback(capsys):
    status, error = run_main(lambda: _raise(KeyboardInterrupt()), [], capsys)
    assert status == 130 and error == "interrupted\n"


def test_the_preset_lookup_error_is_still_a_key_error():
    with pytest.raises(KeyError):
        get_preset("nope")
    with pytest.raises(cli.UserError):
        get_preset("nope")


def test_cpu_is_the_cpu_on_any_rank():
    assert cli.resolve_device("cpu", 3) == torch.device("cpu")


def test_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cli.resolve_device(None, 0) == torch.device("cpu")
    for arg in ("cuda", "cuda:0"):
        with pytest.raises(cli.UserError, match=f"--device {arg}: no CUDA GPU is visible here .*use --device cpu"):
            cli.resolve_device(arg, 0)


def test_cuda_is_the_local_ranks_gpu_and_absent_gpus_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.resolve_device("cuda", 1) == torch.device("cuda:1")
    assert cli.resolve_device(None, 1) == torch.device("cuda:1")
    assert cli.resolve_device("cuda:0", 1) == torch.device("cuda:0")
    absent = r"--device cuda:7: cuda:7 does not exist; 2 GPU\(s\) visible \(cuda:0 … cuda:1\)"
    with pytest.raises(cli.UserError, match=absent):
        cli.resolve_device("cuda:7", 0)
    with pytest.raises(cli.UserError, match="local rank 3's GPU cuda:3 does not exist"):
        cli.resolve_device("cuda", 3)
    with pytest.raises(cli.UserError, match="--device gpu: unknown device; use cpu, cuda"):
        cli.resolve_device("gpu", 0)


def test_a_full_disk_without_a_file_name_still_says_what_to_do():
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert cli.user_message(error) == "No space left on device; free some space or choose another --out"
    assert cli.user_message(OSError(errno.EIO, "Input/output error")) is None  # not the user's to fix: a traceback
