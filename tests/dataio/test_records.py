"""LMDB record files: official-format compatibility, atomic writing, safe unpickling, clear errors."""

import os
import pickle
import subprocess
import sys
import textwrap

import io

import lmdb
import numpy as np
import pytest
from PIL import Image

from smoothsa.dataio import records
from smoothsa.dataio.records import (
    COMMIT_EVERY,
    KEYS_KEY,
    LmdbRecords,
    LmdbWriter,
    RecordError,
    decode_index,
    decode_rgb,
    encode_jpeg,
    encode_png,
    image_size,
    safe_loads,
    write_records,
)


def official_write(path, samples):
    """Writes a file exactly as the official converters do (lmdb_open_write + pickle + __keys__ last)."""
    env = lmdb.open(str(path), map_size=1024**4, subdir=False, readonly=False, meminit=False)
    keys = []
    txn = env.begin(write=True)
    for i, sample in enumerate(samples):
        key = f"{i:06d}".encode("ascii")
        keys.append(key)
        txn.put(key, pickle.dumps(sample))
        if (i + 1) % 64 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", pickle.dumps(keys))
    env.close()


def sample(i, rng):
    return {
        "image": bytes(rng.integers(0, 256, 20, dtype=np.uint8)),
        "segment": rng.integers(0, 256, 33, dtype=np.uint8),
        "clazz": rng.integers(1, 91, 3).astype(np.uint8),
        "isthing": rng.random(3) < 0.5,
        "bbox": rng.random((2, 3, 4)).astype(np.float32),
        "s": i,
        "depth": {"data": [np.arange(4, dtype=np.uint16)], "min": np.float32(0.5), "max": 3.0},
    }


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    else:
        assert a == b


def test_reads_official_files(tmp_path):
    rng = np.random.default_rng(0)
    samples = [sample(i, rng) for i in range(70)]
    official_write(tmp_path / "val.lmdb", samples)
    records = LmdbRecords(tmp_path / "val.lmdb", dataset="coco")
    assert records.split == "val" and len(records) == 70
    assert records.keys[:2] == [b"000000", b"000001"] and records.keys[-1] == b"000069"
    for i in (0, 63, 64, 69):
        assert_same(records.get(i), samples[i])


def test_writer_files_read_like_official(tmp_path):
    rng = np.random.default_rng(1)
    samples = [sample(i, rng) for i in range(130)]
    path = write_records(tmp_path / "train.lmdb", samples)
    assert sorted(os.listdir(tmp_path)) == ["train.lmdb"]  # no .tmp, no lock file left behind
    # the official reader: plain lmdb + pickle
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False)
    with env.begin() as txn:
        keys = pickle.loads(txn.get(b"__keys__"))
        assert keys == [f"{i:06d}".encode() for i in range(130)]
        assert_same(pickle.loads(txn.get(keys[77])), samples[77])
    env.close()


def test_killed_writer_leaves_no_complete_file(tmp_path):
    """A conversion killed after 100 samples: only `<path>.tmp` exists, holding the 64 committed ones."""
    path = tmp_path / "train.lmdb"
    script = textwrap.dedent(
        f"""
        import os
        from smoothsa.dataio.records import LmdbWriter
        writer = LmdbWriter({str(path)!r})
        for i in range(100):
            writer.append({{"i": i}})
        os._exit(1)  # killed: nothing is closed, nothing is cleaned up
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 1
    assert not path.exists()
    tmp = tmp_path / "train.lmdb.tmp"
    assert tmp.exists()
    env = lmdb.open(str(tmp), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(KEYS_KEY) is None
        assert env.stat()["entries"] == COMMIT_EVERY == 64
    env.close()
    with pytest.raises(RecordError, match="no __keys__ entry"):
        LmdbRecords(tmp, dataset="coco", split="train")


def test_writer_exception_removes_everything(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with LmdbWriter(tmp_path / "val.lmdb") as writer:
            for i in range(70):
                writer.append({"i": i})
            1 / 0
    assert os.listdir(tmp_path) == []


def test_rewritten_file_is_reread(tmp_path):
    path = tmp_path / "val.lmdb"
    write_records(path, [{"v": 1}])
    assert LmdbRecords(path).get(0) == {"v": 1}
    records = LmdbRecords(path)
    records.get(0)  # keeps this process's environment of the old file open
    write_records(path, [{"v": 2}, {"v": 3}])
    assert LmdbRecords(path).get(1) == {"v": 3}


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"coco/val: no LMDB file at .*nothing\.lmdb"):
        LmdbRecords(tmp_path / "nothing.lmdb", dataset="coco", split="val")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(RecordError, match="is a directory"):
        LmdbRecords(tmp_path, dataset="coco", split="val")


def test_garbage_file(tmp_path):
    path = tmp_path / "val.lmdb"
    path.write_bytes(b"definitely not lmdb" * 1000)
    with pytest.raises(RecordError, match="coco/val: .* not a readable LMDB file"):
        LmdbRecords(path, dataset="coco")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "val.lmdb"
    write_records(path, [{"x": np.zeros(3000)} for _ in range(40)])
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.truncate(int(size * keep))
    # reading past the end of a memory-mapped file would kill the process (SIGBUS); it must be refused
    with pytest.raises(RecordError, match="truncated"):
        LmdbRecords(path, dataset="clevrtex")


def test_missing_record(tmp_path):
    path = tmp_path / "val.lmdb"
    official_write(path, [{"a": 1}])
    env = lmdb.open(str(path), subdir=False, map_size=1024**3, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", pickle.dumps([b"000000", b"000007"]))
    env.close()
    records = LmdbRecords(path, dataset="voc")
    with pytest.raises(RecordError, match="voc/val key 000007: listed in __keys__ but absent"):
        records.get(1)


class Custom:
    pass


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "payload, refused",
    [
        (lambda tmp: {"image": os.system}, "system"),
        (lambda tmp: {"segment": Custom()}, "Custom"),
        (lambda tmp: {"video": [Exploit(tmp / "pwned")]}, "system"),
        (lambda tmp: {"x": np.array([Custom()], dtype=object)}, "Custom"),
        (lambda tmp: {"x": __import__("collections").Counter()}, "Counter"),
    ],
)
def test_refuses_non_array_pickles(tmp_path, payload, refused):
    path = tmp_path / "train.lmdb"
    official_write(path, [{"ok": np.zeros(2)}, payload(tmp_path)])
    records = LmdbRecords(path, dataset="movi_c")
    assert records.get(0)["ok"].shape == (2,)
    with pytest.raises(RecordError, match=rf"movi_c/train key 000001: refusing to unpickle '.*{refused}'"):
        records.get(1)
    assert not (tmp_path / "pwned").exists()


def test_refuses_unsafe_keys_list(tmp_path):
    path = tmp_path / "val.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=1024**3, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", pickle.dumps(Exploit(tmp_path / "pwned")))
    env.close()
    with pytest.raises(RecordError, match="coco/val key __keys__: refusing"):
        LmdbRecords(path, dataset="coco")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_admits_numpy_pickles_of_every_protocol(protocol):
    value = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # non-contiguous
        "b": np.array([True, False]),
        "c": np.float32(2.5),
        "d": np.int64(-3),
        "e": np.zeros((2, 2), ">u2"),
        "f": (1, 2.0, "x", b"y", None, {3}, frozenset({4}), bytearray(b"z"), 1j),
        "g": np.dtype("int16"),
    }
    data = pickle.dumps(value, protocol=protocol)
    loaded, expected = safe_loads(data, "t/t"), pickle.loads(data)
    assert loaded.keys() == value.keys()
    for key in "abde":
        assert loaded[key].dtype == expected[key].dtype and np.array_equal(loaded[key], value[key])
    assert loaded["c"] == np.float32(2.5) and type(loaded["c"]) is np.float32
    assert loaded["f"] == value["f"] and loaded["g"] == np.dtype("int16")


def test_admits_numpy1_module_names():
    """Files written with numpy 1.x reference numpy.core.multiarray (not numpy._core)."""
    data = pickle.dumps({"a": np.arange(5, dtype=np.uint8), "s": np.float32(1.0)}, protocol=2)
    assert b"numpy._core.multiarray" in data
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    loaded = safe_loads(data, "t/t")
    assert np.array_equal(loaded["a"], np.arange(5)) and loaded["s"] == 1.0


def test_corrupt_pickle_is_named(tmp_path):
    path = tmp_path / "val.lmdb"
    official_write(path, [{"a": 1}])
    env = lmdb.open(str(path), subdir=False, map_size=1024**3, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"000000", pickle.dumps({"a": np.zeros(100)})[:-30])
    env.close()
    with pytest.raises(RecordError, match="ytvis/val key 000000: the record is not a readable pickle"):
        LmdbRecords(path, dataset="ytvis").get(0)


def test_codecs_roundtrip_and_errors():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    index = rng.integers(0, 7, (9, 13), dtype=np.uint8)
    assert np.array_equal(decode_rgb(encode_png(rgb), "t"), rgb)
    assert np.array_equal(decode_rgb(encode_png(rgb).tobytes(), "t"), rgb)
    assert np.array_equal(decode_rgb(encode_png(rgb[..., ::-1]), "t", channels_reversed=True), rgb)
    assert np.array_equal(decode_index(encode_png(index), "t"), index)
    gray = decode_rgb(encode_png(index * 30), "t")  # grayscale images are replicated to RGB
    assert gray.shape == (9, 13, 3) and np.array_equal(gray[..., 1], index * 30)
    jpeg = decode_rgb(encode_jpeg(np.full((16, 16, 3), 200, np.uint8)), "t")
    assert jpeg.shape == (16, 16, 3) and np.abs(jpeg.astype(int) - 200).max() <= 2
    png = encode_png(rgb).tobytes()
    with pytest.raises(RecordError, match="coco/val key 000003 field 'image': cannot decode"):
        decode_rgb(png[: len(png) // 2], "coco/val key 000003 field 'image'")
    with pytest.raises(RecordError, match="cannot decode"):
        decode_rgb(b"\x89PNG but not really", "x")
    with pytest.raises(RecordError, match="8-bit single-channel"):
        decode_index(encode_png(rgb), "x")


def jpeg_variants():
    """JPEGs as cameras and converters write them: 4:4:4, 4:2:2 and 4:2:0, baseline, optimised, progressive
    and with restart markers, grayscale, odd and tiny sizes; smooth scenes with noise."""
    rng = np.random.default_rng(5)
    for height, width in [(480, 640), (333, 501), (17, 9), (1, 1)]:
        rows, cols = np.mgrid[0:height, 0:width]
        scene = np.stack([rows * 255 // max(height, 1), cols * 255 // max(width, 1), (rows + cols) % 256], -1)
        scene = np.clip(scene + rng.normal(0, 12, scene.shape), 0, 255).astype(np.uint8)
        for mode in ("RGB", "L"):
            image = Image.fromarray(scene if mode == "RGB" else scene[..., 0])
            for options in ({"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2, "quality": 60},
                            {"optimize": True}, {"progressive": True}, {"restart_marker_blocks": 3}):
                out = io.BytesIO()
                image.save(out, format="JPEG", **options)
                yield f"{mode} {height}x{width} {options}", out.getvalue()


def test_jpegs_decode_to_pillows_pixels():
    """simplejpeg and Pillow run the same libjpeg-turbo: the fast path returns Pillow's pixels bit for bit,
    and the header size is Pillow's; CMYK JPEGs and a missing simplejpeg go through Pillow itself."""
    for name, data in jpeg_variants():
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert records._decode_jpeg(data) is not None, name  # the fast path took it
        assert np.array_equal(decode_rgb(data, "t"), expected), name
        assert np.array_equal(decode_rgb(np.frombuffer(data, np.uint8), "t"), expected), name
        assert image_size(data, "t") == expected.shape[:2], name
    cmyk = io.BytesIO()
    Image.fromarray(np.arange(4 * 6 * 4, dtype=np.uint8).reshape(4, 6, 4), "CMYK").save(cmyk, format="JPEG")
    assert records._decode_jpeg(cmyk.getvalue()) is None
    assert np.array_equal(decode_rgb(cmyk.getvalue(), "t"), np.asarray(Image.open(cmyk).convert("RGB")))


def test_without_simplejpeg_pillow_decodes(monkeypatch):
    name, data = next(jpeg_variants())
    fast = decode_rgb(data, "t")
    monkeypatch.setattr(records, "simplejpeg", None)
    assert records._decode_jpeg(data) is None
    assert np.array_equal(decode_rgb(data, "t"), fast) and image_size(data, "t") == fast.shape[:2]


def test_a_truncated_jpeg_is_pillows_to_judge():
    """libjpeg only warns on a truncated stream; the fast path declines it and Pillow's verdict stands."""
    _, data = next(jpeg_variants())
    with pytest.raises(RecordError, match="x: cannot decode the image"):
        decode_rgb(data[: len(data) // 2], "x")


def index_map():
    segment = np.zeros((12, 16), np.uint8)
    segment[2:7, 3:9] = 1
    segment[5:11, 8:15] = 2
    segment[0] = 3
    return segment


def flips(buffer: bytes):
    for bit in range(len(buffer) * 8):
        flipped = bytearray(buffer)
        flipped[bit // 8] ^= 1 << (bit % 8)
        yield bytes(flipped)


def test_every_bit_flip_of_a_segment_png_is_refused_or_harmless():
    """libpng (the official decoder, via cv2) refuses every flip; Pillow alone decodes some to other maps."""
    segment = index_map()
    refused = 0
    for flipped in flips(encode_png(segment).tobytes()):
        try:
            decoded = decode_index(flipped, "voc/val key 000007 field 'segment'")
        except RecordError as error:
            assert str(error).startswith("voc/val key 000007 field 'segment': cannot decode")
            refused += 1
            continue
        assert decoded.shape == segment.shape and np.array_equal(decoded, segment)
    assert refused > 0


def test_png_written_corrupt_is_refused():
    """A file whose CRCs match corrupt image data (written that way) fails the zlib check of a segment."""
    import struct
    import zlib

    png = encode_png(index_map()).tobytes()
    start = png.index(b"IDAT") - 4
    length = int.from_bytes(png[start : start + 4], "big")
    data = bytearray(png[start + 8 : start + 8 + length])
    data[len(data) // 2] ^= 0x10
    chunk = struct.pack(">I", length) + b"IDAT" + bytes(data) + struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)))
    forged = png[:start] + chunk + png[start + 12 + length :]
    with pytest.raises(RecordError, match="corrupt PNG"):
        decode_index(forged, "x")
    rows = zlib.compress(b"\x07" + bytes(16))  # one row, filter type 7 (unknown)
    header = struct.pack(">IIBBBBB", 16, 1, 8, 0, 0, 0, 0)

    def chunk_of(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bad_filter = b"\x89PNG\r\n\x1a\n" + chunk_of(b"IHDR", header) + chunk_of(b"IDAT", rows) + chunk_of(b"IEND", b"")
    with pytest.raises(RecordError, match="filter type"):
        decode_index(bad_filter, "x")


def test_lmdb_opened_by_another_library_is_named(tmp_path):
    path = tmp_path / "train.lmdb"
    official_write(path, [{"a": 1}])
    other = lmdb.open(str(path), subdir=False, readonly=True, lock=False)  # e.g. a user's own reader
    try:
        with pytest.raises(RecordError, match="already open in this process") as error:
            LmdbRecords(path, dataset="coco")
        assert "corrupt" not in str(error.value)
    finally:
        other.close()
    assert len(LmdbRecords(path, dataset="coco")) == 1
