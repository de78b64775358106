"""The command line's edge: user errors become one line on stderr and exit status 2, never a traceback.

Library code raises `UserError` (or a subclass) with a message that names what is wrong and how to fix it;
`main` functions are wrapped once, and `--debug` (or `SMOOTHSA_DEBUG=1`) prints the traceback as well:

    @cli.entry_point
    def main(argv=None):
        parser = argparse.ArgumentParser()
        cli.add_debug_argument(parser)
        ...
        device = cli.resolve_device(args.device, local_rank)

Exit statuses: 0 done, 2 a user error (bad preset, missing data, bad `--set`, bad checkpoint, unavailable
device, no space left, read-only output, a run that diverged), 128 + signal number for a run stopped by a
signal after saving its state (143 SIGTERM, 130 SIGINT).
"""
import errno
import functools
import os
import sys
import traceback

import torch

USER_ERROR_STATUS = 2
# Errors of the file system that are the user's to fix (the message names the file); any other OSError is a bug.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_USER_ERRNOS = set(WRITE_ERRNOS) | {errno.ENOENT, errno.ENOTDIR, errno.EISDIR}
_FIXES = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space or choose another --out",
    errno.EROFS: "choose a writable --out",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
}


def fix_for(code: int) -> str:
    """What the user can do about a file-system error number."""
    return _FIXES.get(code, "check the path")


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it, in one line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Diverged(UserError, FloatingPointError):
    """Training stopped because too many steps in a row had a non-finite loss; the message says what to change."""


class Stopped(KeyboardInterrupt):
    """A run stopped before its end on purpose (a signal); the message says how to continue."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message = message
        self.status = status


def user_message(error: BaseException) -> str | None:
    """The one line to print for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno in _USER_ERRNOS:
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror or os.strerror(error.errno)}; {fix_for(error.errno)}"
    if isinstance(error, FileNotFoundError):  # our loaders raise it with the fix in the message
        return str(error)
    return None


def entry_point(main):
    """Wraps `main(argv=None)`: user errors → one stderr line and status 2; `Stopped` → its message and status;
    a plain Ctrl-C → status 130 without a traceback. `--debug` in argv (or SMOOTHSA_DEBUG=1) adds the traceback."""

    @functools.wraps(main)
    def wrapper(argv=None):
        words = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in words or os.environ.get("SMOOTHSA_DEBUG", "") not in ("", "0")
        try:
            return main(argv)
        except Stopped as stop:
            if debug:
                traceback.print_exc()
            print(stop.message, file=sys.stderr, flush=True)
            sys.exit(stop.status)
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(128 + 2)
        except Exception as error:
            message = user_message(error)
            if message is None:
                raise
            if debug:
                traceback.print_exc()
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_STATUS)

    return wrapper


def add_debug_argument(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")


def resolve_device(arg: str | None, local_rank: int = 0) -> torch.device:
    """`--device` → a torch.device: None = this process's GPU if there is one, else the CPU; "cuda" = the GPU of
    this local rank (`cuda:<LOCAL_RANK>`); "cuda:N" = that GPU. An unknown or absent device is a `UserError`."""
    if arg is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise UserError(f"--device {arg}: unknown device; use cpu, cuda (this process's GPU) or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {arg}: no CUDA GPU is visible here (check the driver and CUDA_VISIBLE_DEVICES); "
                            "use --device cpu")
        index = local_rank if device.index is None else device.index
        if index >= count:
            visible = "cuda:0" if count == 1 else f"cuda:0 … cuda:{count - 1}"
            which = f"local rank {local_rank}'s GPU cuda:{index}" if device.index is None else f"cuda:{index}"
            raise UserError(f"--device {arg}: {which} does not exist; {count} GPU(s) visible ({visible})")
        return torch.device("cuda", index)
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise UserError(f"--device {arg}: not available here; use cpu, cuda (this process's GPU) or cuda:N")
