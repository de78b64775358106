"""LMDB record files in the official SmoothSA layout: safe reading, atomic writing, image codecs.

Layout (docs/official.md §6): one LMDB *file* per split (`subdir=False`). Sample keys are zero-padded ASCII
indices `b"000000"`, `b"000001"`, ...; the key `b"__keys__"` holds the pickled list of sample keys in
order. Each value is `pickle.dumps(dict)` whose leaves are numpy arrays, bytes and Python scalars.
Images are the original encoded file bytes; index maps are PNG buffers stored as the 1-D uint8 array
that `cv2.imencode` returns.

Reading never trusts the file: pickles go through an unpickler that only admits numpy arrays, dtypes,
scalars and plain containers, and every failure names the dataset, the split and the key.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import os
import pickle
import zlib
from pathlib import Path
from typing import Any, Iterable

import lmdb
import numpy as np
from PIL import Image

try:  # libjpeg-turbo without Pillow's detour through 4-byte pixels (see `decode_rgb`); Pillow decodes otherwise
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is an install requirement
    simplejpeg = None

KEYS_KEY = b"__keys__"
COMMIT_EVERY = 64  # the official writers commit every 64 samples
MAP_SIZE = 1024**4  # address space only: LMDB files stay sparse on Linux

try:  # numpy >= 2 moved the pickle helpers to numpy._core; files written by numpy 1.x still say numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


class RecordError(RuntimeError):
    """A dataset file, or one record in it, cannot be read. The message names dataset, split and key."""


def where(dataset: str, split: str, key: bytes | str | None = None, field: str | None = None) -> str:
    """Formats the location of a problem, e.g. `coco/val key 000042 field 'image'`."""
    text = f"{dataset}/{split}"
    if key is not None:
        text += f" key {key.decode('ascii', 'replace') if isinstance(key, bytes) else key}"
    if field is not None:
        text += f" field {field!r}"
    return text


# ------------------------------------------------------------------------------------------------
# restricted unpickling

# Everything numpy's own pickles reference (protocols 2-5, numpy 1.x and 2.x module names) plus the
# builtins plain containers need. Anything else (os.system, a custom class, ...) is refused: a record
# file is data downloaded from the internet, and pickle.loads would execute it.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles spell bytes this way
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, location: str):
        super().__init__(file)
        self.location = location

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles spell Python 3 modules the Python 2 way (__builtin__.set)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RecordError(
                f"{self.location}: refusing to unpickle '{module}.{name}'; records may only contain numpy "
                "arrays, dtypes, scalars and plain Python containers (is this an official SmoothSA file?)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise RecordError(f"{self.location}: pickle asks for a persistent id {pid!r}; refusing")


def safe_loads(data: bytes, location: str) -> Any:
    """Unpickles `data` admitting only numpy arrays / dtypes / scalars and plain containers.

    Args:
        data: the pickled bytes.
        location: dataset/split/key for error messages (see `where`).
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), location).load()
    except RecordError:
        raise
    except Exception as error:  # any malformed pickle: truncated value, bad opcode, ...
        reason = f"{type(error).__name__}: {error}"
        raise RecordError(f"{location}: the record is not a readable pickle ({reason})") from error


# ------------------------------------------------------------------------------------------------
# reading


def open_lmdb(path: Path, dataset: str, split: str) -> lmdb.Environment:
    """Opens an official split file read-only, after checking it exists and is not truncated.

    Args:
        path: the `.lmdb` file.
        dataset, split: names for error messages.
    """
    if path.is_dir():
        raise RecordError(
            f"{where(dataset, split)}: {path} is a directory; pass the split file itself (e.g. {path / 'train.lmdb'})"
        )
    if not path.exists():
        raise FileNotFoundError(f"{where(dataset, split)}: no LMDB file at {path}")
    try:
        env = lmdb.open(
            str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False, max_readers=256
        )
    except lmdb.Error as error:
        if "already open" in str(error):  # py-lmdb allows one environment per file and process
            problem = (
                f"{path} is already open in this process through another lmdb environment (another library "
                "or your own lmdb.open); close that environment first, or read the file in another process"
            )
        else:
            problem = f"{path} is not a readable LMDB file (corrupt or truncated?): {error}"
        raise RecordError(f"{where(dataset, split)}: {problem}") from error
    # A truncated file still opens (the meta pages are at its start), but touching a page past its end
    # through the memory map kills the process with SIGBUS, so compare the size LMDB expects up front.
    expected = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = path.stat().st_size
    if actual < expected:
        env.close()
        raise RecordError(
            f"{where(dataset, split)}: {path} is truncated ({actual} bytes, its LMDB header says {expected}); "
            "re-download or re-convert it"
        )
    return env


# One environment per file and process: py-lmdb refuses to open a file twice in one process, and an
# environment inherited through fork must be closed and reopened (LMDB forbids using it after fork).
_OPEN: dict[str, tuple[int, tuple[int, int], lmdb.Environment]] = {}


def shared_env(path: Path, dataset: str, split: str) -> lmdb.Environment:
    """This process's read-only environment of `path`, opened on first use (and reopened after a fork
    or when the file was replaced)."""
    name = os.path.abspath(path)
    entry = _OPEN.pop(name, None)
    if entry is not None:
        pid, ident, env = entry
        try:
            stat = os.stat(name)
            current = (stat.st_dev, stat.st_ino)
        except OSError:
            current = None
        if pid == os.getpid() and current == ident:
            _OPEN[name] = entry
            return env
        env.close()
    env = open_lmdb(Path(name), dataset, split)
    stat = os.stat(name)
    _OPEN[name] = (os.getpid(), (stat.st_dev, stat.st_ino), env)
    return env


def release_env(path: Path) -> None:
    """Closes this process's environment of `path`, if open."""
    entry = _OPEN.pop(os.path.abspath(path), None)
    if entry is not None:
        entry[2].close()  # also when inherited through fork: py-lmdb would refuse to reopen it otherwise


class LmdbRecords:
    """Read-only access to one split file; the environment opens lazily in each process.

    Nothing but the path and the key list is stored on the object (no open environment), so objects
    holding an `LmdbRecords` pickle to DataLoader workers, and each worker opens its own environment
    on first access.

    Args:
        path: the split file, e.g. `coco/val.lmdb`.
        dataset: dataset name used in error messages.
        split: split name used in error messages (default: the file stem).
    """

    def __init__(self, path: str | Path, dataset: str = "dataset", split: str | None = None):
        self.path = Path(path)
        self.dataset = dataset
        self.split = split or self.path.stem
        already_open = os.path.abspath(self.path) in _OPEN
        try:
            with self.env.begin(write=False) as txn:
                data = txn.get(KEYS_KEY)
        finally:
            if not already_open:
                release_env(self.path)  # stay lazy: workers (and this process) open on first read
        if data is None:
            raise RecordError(
                f"{self.where()}: {self.path} has no __keys__ entry; the conversion that wrote it did not finish"
            )
        keys = safe_loads(data, self.where(KEYS_KEY))
        if not isinstance(keys, list) or not all(isinstance(key, bytes) for key in keys):
            raise RecordError(f"{self.where(KEYS_KEY)}: expected a list of bytes keys, got {type(keys).__name__}")
        self.keys: list[bytes] = keys

    def where(self, key: bytes | None = None, field: str | None = None) -> str:
        return where(self.dataset, self.split, key, field)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def env(self) -> lmdb.Environment:
        return shared_env(self.path, self.dataset, self.split)

    def raw(self, key: bytes) -> bytes:
        """The stored (pickled) value of `key`."""
        with self.env.begin(write=False) as txn:
            data = txn.get(key)
        if data is None:
            raise RecordError(f"{self.where(key)}: listed in __keys__ but absent from {self.path}")
        return data

    def get(self, index: int) -> dict:
        """Sample `index` (position in `__keys__`) as the stored dict, unpickled safely."""
        key = self.keys[index]
        sample = safe_loads(self.raw(key), self.where(key))
        if not isinstance(sample, dict):
            raise RecordError(f"{self.where(key)}: expected a dict sample, got {type(sample).__name__}")
        return sample

    def close(self) -> None:
        """Closes this process's environment of the file (reopened on the next read)."""
        release_env(self.path)


# ------------------------------------------------------------------------------------------------
# writing


class LmdbWriter:
    """Writes a split file atomically in the official layout.

    Samples go to `<path>.tmp`; every 64 samples are committed (as the official writers do); `__keys__`
    is written last, in its own transaction, and only then is the file renamed to `path`. A conversion
    killed half-way therefore leaves a `.tmp` file, never a file that looks complete.

    Args:
        path: destination split file, e.g. `out/train.lmdb`.
        commit_every: samples per write transaction.
        map_size: LMDB map size (address space, not disk).

    Use as a context manager: the file appears at `path` when the block exits without an exception.
    """

    def __init__(self, path: str | Path, commit_every: int = COMMIT_EVERY, map_size: int = MAP_SIZE):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.commit_every = commit_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.tmp, Path(str(self.tmp) + "-lock")):
            stale.unlink(missing_ok=True)
        self.env = lmdb.open(str(self.tmp), subdir=False, map_size=map_size, readonly=False, meminit=False, lock=False)
        self.txn = self.env.begin(write=True)
        self.keys: list[bytes] = []

    def append(self, sample: dict) -> bytes:
        """Stores one sample dict under the next zero-padded key; returns the key."""
        key = f"{len(self.keys):06d}".encode("ascii")
        self.txn.put(key, pickle.dumps(sample))
        self.keys.append(key)
        if len(self.keys) % self.commit_every == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
        return key

    def close(self) -> Path:
        """Commits the rest, writes `__keys__`, and moves the file into place."""
        self.txn.commit()
        with self.env.begin(write=True) as txn:
            txn.put(KEYS_KEY, pickle.dumps(self.keys))
        self.env.sync(True)
        self.env.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drops everything written so far."""
        self.txn.abort()
        self.env.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "LmdbWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_records(path: str | Path, samples: Iterable[dict]) -> Path:
    """Writes all `samples` (dicts) to `path` atomically; returns `path`."""
    with LmdbWriter(path) as writer:
        for sample in samples:
            writer.append(sample)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# image codecs (Pillow; the official files were written with cv2 and decode identically)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel


def check_png(buffer: Any, location: str, inflate: bool = True) -> None:
    """Refuses a PNG that libpng (the official reader's decoder, through cv2) would refuse.

    Pillow skips most integrity checks, so a flipped bit can decode to a different image without an
    error. Checked here: the signature; every chunk's CRC (ancillary ones too, where libpng would only
    drop the chunk); IHDR first and IEND present; with `inflate`, also the zlib stream of the IDAT
    chunks (complete, Adler-32 intact) and, for non-interlaced images, exactly one filter byte (0..4)
    plus one row of samples per image row. The CRCs alone catch every corruption of up to 32
    consecutive bits after the file was written; inflating also catches a file written corrupt.

    Args:
        buffer: encoded bytes or a 1-D uint8 array.
        location: dataset/split/key/field for error messages.
        inflate: check the image data stream too (costs about half a decode).
    """
    data = bytes(_as_bytes(buffer))

    def refuse(problem: str) -> RecordError:
        return RecordError(f"{location}: cannot decode the image (corrupt PNG: {problem})")

    if not data.startswith(PNG_SIGNATURE):
        raise refuse("bad signature")
    position, header, compressed = len(PNG_SIGNATURE), None, []
    while True:
        if position + 12 > len(data):
            raise refuse("truncated before IEND")
        length = int.from_bytes(data[position : position + 4], "big")
        end = position + 8 + length
        if length >= 1 << 31 or end + 4 > len(data):
            raise refuse(f"chunk at byte {position} runs past the end of the file")
        kind, body = data[position + 4 : position + 8], data[position + 8 : end]
        if zlib.crc32(kind + body) != int.from_bytes(data[end : end + 4], "big"):
            raise refuse(f"CRC mismatch in chunk {kind!r} at byte {position}")
        if header is None and kind != b"IHDR":
            raise refuse("the first chunk is not IHDR")
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            compressed.append(body)
        position = end + 4
        if kind == b"IEND":
            break
    if len(header) != 13:
        raise refuse("IHDR has the wrong size")
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise refuse(f"IHDR has colour type {colour} and bit depth {depth}")
    if not inflate:
        return
    stream = zlib.decompressobj()
    try:
        raw = stream.decompress(b"".join(compressed))
    except zlib.error as error:
        raise refuse(f"the image data does not inflate ({error})") from None
    if not stream.eof:
        raise refuse("the image data stream is incomplete")
    if interlace == 0:
        stride = 1 + (width * _PNG_CHANNELS[colour] * depth + 7) // 8
        if len(raw) != height * stride:
            raise refuse(f"{len(raw)} bytes of image data, {height} rows of {stride} expected")
        if height and np.frombuffer(raw, np.uint8)[::stride].max() > 4:
            raise refuse("a row has an unknown filter type")


def _as_bytes(buffer: Any) -> bytes | memoryview:
    if isinstance(buffer, np.ndarray):
        return memoryview(np.ascontiguousarray(buffer, dtype=np.uint8)).cast("B")
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        return buffer
    raise TypeError(f"expected encoded bytes or a 1-D uint8 array, got {type(buffer).__name__}")


def _open(buffer: Any, location: str, strict: bool) -> Image.Image:
    """Decodes with Pillow; PNGs are checked first (`check_png`, inflating them too when `strict`)."""
    if bytes(_as_bytes(buffer)[:8]) == PNG_SIGNATURE:
        check_png(buffer, location, inflate=strict)
    try:
        image = Image.open(io.BytesIO(_as_bytes(buffer)))
        image.load()  # decode now: Pillow opens lazily and a truncated file would only fail later
    except Exception as error:
        raise RecordError(f"{location}: cannot decode the image ({type(error).__name__}: {error})") from error
    return image


def decode_rgb(buffer: Any, location: str, channels_reversed: bool = False) -> np.ndarray:
    """Decodes a PNG/JPEG buffer to RGB (PNG chunk CRCs checked, see `check_png`).

    Colour and grayscale JPEGs decode with simplejpeg when it is installed: it runs the libjpeg-turbo that
    Pillow runs, with the same integer IDCT and upsampling, so the pixels are Pillow's, bit for bit, in
    about 60 % of the time (Pillow unpacks to 4-byte pixels and packs them back). Anything it declines
    (CMYK, damaged data libjpeg only warns about) goes to Pillow, as does every PNG.

    Args:
        buffer: encoded bytes or a 1-D uint8 array.
        location: dataset/split/key/field for error messages.
        channels_reversed: the buffer was written by `cv2.imencode` from an RGB array (MOVi frames), so
            the file's R and B are swapped; undo it, as the official reader's cv2.imdecode does.

    Shapes:
        returns (H, W, 3) uint8; grayscale files are replicated, alpha is dropped.
    """
    array = _decode_jpeg(buffer)
    if array is None:
        image = _open(buffer, location, strict=False)
        array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    return np.ascontiguousarray(array[..., ::-1]) if channels_reversed else array


def _decode_jpeg(buffer: Any) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of a YCbCr or grayscale JPEG decoded by simplejpeg; None for anything else."""
    data = _as_bytes(buffer)
    if simplejpeg is None or bytes(data[:2]) != JPEG_SIGNATURE:
        return None
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in ("YCbCr", "Gray"):
            return None  # CMYK/YCCK and untransformed RGB: Pillow's colour conversions apply
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:  # damaged: Pillow decides, as it would have alone
        return None


def decode_index(buffer: Any, location: str) -> np.ndarray:
    """Decodes an 8-bit single-channel PNG index map, strictly (`check_png` with the image data inflated):
    a corrupt map is an error, never a wrong labelling.

    Shapes:
        returns (H, W) uint8.
    """
    image = _open(buffer, location, strict=True)
    if image.mode not in ("L", "P"):
        raise RecordError(f"{location}: an index map must be an 8-bit single-channel PNG, got mode {image.mode}")
    return np.asarray(image)


def image_size(buffer: Any, location: str) -> tuple[int, int]:
    """(height, width) of an encoded image, read from its header only."""
    data = _as_bytes(buffer)
    if simplejpeg is not None and bytes(data[:2]) == JPEG_SIGNATURE:
        try:
            return simplejpeg.decode_jpeg_header(data)[:2]
        except ValueError:
            pass  # Pillow reads what it can, or says why not
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception as error:
        problem = f"{type(error).__name__}: {error}"
        raise RecordError(f"{location}: cannot decode the image (its header: {problem})") from error
    return height, width


def encode_png(array: np.ndarray, compress_level: int = 1) -> np.ndarray:
    """PNG-encodes a (H, W) or (H, W, 3) uint8 array (or (H, W) uint16) like `cv2.imencode(".png", array)[1]`.

    Note: cv2 treats 3-channel input as BGR; pass `array[..., ::-1]` to mimic it writing an RGB array.

    Shapes:
        returns (num_bytes,) uint8.
    """
    if array.dtype == np.uint16 and array.ndim != 2:
        raise ValueError("16-bit PNGs must be single-channel")
    image = Image.fromarray(np.ascontiguousarray(array))  # uint16 (H, W) becomes mode "I;16"
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=compress_level)
    return np.frombuffer(out.getvalue(), dtype=np.uint8)


def encode_jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    """JPEG-encodes an (H, W, 3) RGB uint8 array; returns the file bytes."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="JPEG", quality=quality)
    return out.getvalue()
