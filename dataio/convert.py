"""Converters from the original dataset layouts to the official LMDB files (docs/official.md §6).

    python -m smoothsa.dataio.convert clevrtex --src /data/raw/clevrtex --dst data/clevrtex
    python -m smoothsa.dataio.convert coco     --src /data/raw/coco     --dst data/coco
    python -m smoothsa.dataio.convert voc      --src /data/raw/VOCdevkit --dst data/voc
    python -m smoothsa.dataio.convert movi     --src /data/raw/tfds     --dst data/movi_c --name movi_c
    python -m smoothsa.dataio.convert ytvis    --src /data/raw/ytvis_hq --dst data/ytvis_hq --variant hq
    python -m smoothsa.dataio.convert folder   --src my_images/ --dst data/mine [--video] [--val-fraction 0.05]

Expected inputs (`--src`):
* clevrtex: `clevrtex_full/<0..49>/` (train) and `clevrtex_outd/` (val, the OOD set); per scene
  `<stem>.png` (image), `<stem>_depth_0001.png`, `<stem>_flat.png` (flat-colour instance mask).
* coco: `train2017/`, `val2017/`, `annotations/panoptic_{train,val}2017.json` with their PNG folders
  `annotations/panoptic_{train,val}2017/`, and `panoptic_coco_categories.json` at the root of `--src`.
* voc: `VOC2012/` (train) and `VOC2007/` (val), each with `JPEGImages/` and `SegmentationObject/`.
* movi: a TFDS data dir holding `<name>/256x256/1.0.0` (needs TensorFlow: pip install 'smoothsa[movi]').
* ytvis: `--variant hq`: `JPEGImages/` + `ytvis_hq-{train,val,test}.json`; `--variant 2022`:
  `{train,valid,test}/JPEGImages/` + `train/instances.json`, `valid/gt.json`, `test/test_gt.json`.
  Override with `--split NAME=ANNOTATIONS.json[:FRAMES_DIR]`. Polygon masks are rasterised by
  pycocotools, as the official converter does: pip install 'smoothsa[convert]'.
* folder: any folder of images (recursive), or with `--video` of video files and frame folders; no labels
  (see `dataio/folder.py`); train with `--set data.dataset=folder` (`folder_video`).

Every split is written to `<dst>/<split>.lmdb` atomically (see `records.LmdbWriter`). A split whose
inputs are missing is skipped with a note on stderr; finding no split at all is an error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from .records import LmdbWriter, encode_png

VOC_BOUNDARY = (224, 224, 192)


class ConversionError(ValueError):
    """The source folder does not hold what the converter expects; the message says what and where."""


def _nothing_found(dataset: str, src: Path, expected: str) -> ConversionError:
    return ConversionError(f"{dataset}: found no split under {src}; expected {expected}")


def write_split(path: Path, records: Iterable[dict], total: int | None, desc: str) -> Path:
    """Writes the records to `path` atomically, with a progress bar."""
    with LmdbWriter(path) as writer:
        for record in tqdm(records, total=total, desc=desc, unit="sample"):
            writer.append(record)
    return path


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def rank_codes(rgb: np.ndarray) -> np.ndarray:
    """Index map of a flat-colour mask: each pixel's rank among the colour codes r + 256 g + 65536 b
    present in the image (0 = smallest code, black when present).

    Shapes:
        rgb: (H, W, 3) uint8 -> (H, W) uint8
    """
    codes = rgb.astype(np.int64) @ np.array([1, 256, 65536])
    values, inverse = np.unique(codes, return_inverse=True)
    if len(values) > 256:
        raise ValueError(f"{len(values)} colours do not fit a uint8 index map")
    return inverse.reshape(codes.shape).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# ClevrTex

_CLEVRTEX_SCENE = re.compile(r"^(?P<stem>.+_\d{6})\.png$")


def _clevrtex_scenes(folder: Path) -> list[Path]:
    """Scene images under `folder` (recursively) in the official order: full paths sorted as text, so part
    folders come 0, 1, 10, 11, ..., 19, 2, 20, ... (this fixes which scene each LMDB index holds)."""
    return sorted((p for p in folder.rglob("*.png") if _CLEVRTEX_SCENE.match(p.name)), key=lambda p: str(p))


def clevrtex_record(image_path: Path) -> dict:
    """One ClevrTex scene: `image` PNG bytes, `segment` PNG index map (ranked flat colours), `depth` PNG uint8."""
    stem = _CLEVRTEX_SCENE.match(image_path.name)["stem"]
    flat = image_path.with_name(f"{stem}_flat.png")
    depth_path = image_path.with_name(f"{stem}_depth_0001.png")
    with Image.open(depth_path) as depth_image:
        depth = np.asarray(depth_image)
    if depth.dtype != np.uint8:  # 16-bit depth maps keep their high byte
        depth = (depth.astype(np.uint32) >> 8).astype(np.uint8)
    if depth.ndim == 3:
        depth = depth[..., 0]
    return dict(image=image_path.read_bytes(), segment=encode_png(rank_codes(_rgb(flat))), depth=encode_png(depth))


def convert_clevrtex(src: Path, dst: Path, limit: int | None = None) -> list[Path]:
    """train <- `clevrtex_full`, val <- `clevrtex_outd` (the OOD set, as the official configs)."""
    written = []
    for split, folder in (("train", "clevrtex_full"), ("val", "clevrtex_outd")):
        scenes = _clevrtex_scenes(src / folder)[:limit]
        if not scenes:
            print(f"clevrtex: no scenes under {src / folder}; skipping {split}", file=sys.stderr)
            continue
        records = map(clevrtex_record, scenes)
        written.append(write_split(dst / f"{split}.lmdb", records, len(scenes), f"clevrtex {split}"))
    if not written:
        raise _nothing_found("clevrtex", src, "clevrtex_full/<0..49>/*.png and clevrtex_outd/*.png")
    return written


# ------------------------------------------------------------------------------------------------
# COCO panoptic


def coco_record(image_path: Path, panoptic_path: Path, segments_info: list[dict], isthing: dict[int, bool]) -> dict:
    """One COCO image: `image` JPEG bytes, `segment` PNG (0 = unannotated, k = k-th segment by id),
    `clazz` (s,) uint8 category ids, `isthing` (s,) bool."""
    ids = _rgb(panoptic_path).astype(np.int64) @ np.array([1, 256, 65536])
    infos = sorted(segments_info, key=lambda info: info["id"])
    if len(infos) > 255:
        raise ValueError(f"{panoptic_path}: {len(infos)} segments do not fit a uint8 index map")
    segment = np.zeros(ids.shape, np.uint8)
    for k, info in enumerate(infos):
        segment[ids == info["id"]] = k + 1
    return dict(
        image=image_path.read_bytes(),
        segment=encode_png(segment),
        clazz=np.array([info["category_id"] for info in infos], np.uint8),
        isthing=np.array([isthing[info["category_id"]] for info in infos], bool),
    )


def convert_coco(src: Path, dst: Path, limit: int | None = None) -> list[Path]:
    annotations = src / "annotations"
    categories = src / "panoptic_coco_categories.json"  # the official layout keeps it at the root
    if not categories.exists():
        raise ConversionError(
            f"coco: {categories} not found; the official layout has panoptic_coco_categories.json at the root "
            "of the source folder (next to annotations/), from the panopticapi repository"
        )
    with open(categories) as file:
        isthing = {category["id"]: bool(category["isthing"]) for category in json.load(file)}
    written = []
    for split in ("train", "val"):
        index_file = annotations / f"panoptic_{split}2017.json"
        if not index_file.exists():
            print(f"coco: {index_file} not found; skipping {split}", file=sys.stderr)
            continue
        with open(index_file) as file:
            items = json.load(file)["annotations"][:limit]
        records = (
            coco_record(
                src / f"{split}2017" / Path(item["file_name"]).with_suffix(".jpg").name,
                annotations / f"panoptic_{split}2017" / item["file_name"],
                item["segments_info"],
                isthing,
            )
            for item in items
        )
        written.append(write_split(dst / f"{split}.lmdb", records, len(items), f"coco {split}"))
    if not written:
        raise _nothing_found("coco", src, "annotations/panoptic_{train,val}2017.json")
    return written


# ------------------------------------------------------------------------------------------------
# VOC


def voc_record(image_path: Path, object_path: Path) -> dict:
    """One VOC image: `image` JPEG bytes, `segment` PNG (0 = boundary colour, other colours by code -> 1..)."""
    rgb = _rgb(object_path)
    boundary = np.all(rgb == VOC_BOUNDARY, axis=-1)
    codes = rgb.astype(np.int64) @ np.array([1, 256, 65536])
    values, inverse = np.unique(codes[~boundary], return_inverse=True)
    segment = np.zeros(codes.shape, np.uint8)
    segment[~boundary] = inverse.reshape(-1) + 1
    if len(values) > 255:
        raise ValueError(f"{object_path}: too many colours")
    return dict(image=image_path.read_bytes(), segment=encode_png(segment))


def convert_voc(src: Path, dst: Path, limit: int | None = None) -> list[Path]:
    """train <- VOC2012 `SegmentationObject`, val <- VOC2007 `SegmentationObject` (every PNG listed)."""
    written = []
    for split, year in (("train", "VOC2012"), ("val", "VOC2007")):
        masks = sorted((src / year / "SegmentationObject").glob("*.png"))[:limit]
        if not masks:
            print(f"voc: no masks under {src / year / 'SegmentationObject'}; skipping {split}", file=sys.stderr)
            continue
        records = (voc_record(src / year / "JPEGImages" / f"{mask.stem}.jpg", mask) for mask in masks)
        written.append(write_split(dst / f"{split}.lmdb", records, len(masks), f"voc {split}"))
    if not written:
        raise _nothing_found("voc", src, "VOC2012/SegmentationObject/*.png and VOC2007/SegmentationObject/*.png")
    return written


# ------------------------------------------------------------------------------------------------
# MOVi (TFDS)


def movi_record(sample: dict) -> dict:
    """One MOVi video from a TFDS sample converted to numpy.

    Args:
        sample: `video` (T, H, W, 3) uint8, `segmentations` (T, H, W, 1) uint8, `bbox_frames` list of
            per-instance frame indices, `bboxes` list of per-instance (k, 4) ymin, xmin, ymax, xmax,
            `backward_flow` (T, H, W, 2) uint16, `flow_range` (2,), `depth` (T, H, W, 1) uint16,
            `depth_range` (2,).
    """
    video, segment = sample["video"], sample["segmentations"][..., 0]
    count = len(sample["bboxes"])
    bbox = np.zeros((len(video), count, 4), np.float32)  # 0 where an instance is not tracked
    for i, (frames, boxes) in enumerate(zip(sample["bbox_frames"], sample["bboxes"])):
        bbox[np.asarray(frames, np.int64), i] = np.asarray(boxes, np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]]
    flow, depth = sample["backward_flow"], sample["depth"][..., 0]
    return dict(
        # cv2.imencode of the RGB array: the official files hold R and B swapped
        video=[encode_png(frame[..., ::-1]) for frame in video],
        segment=[encode_png(frame) for frame in segment],
        s=count,
        bbox=bbox,
        flow=dict(
            data=[[encode_png(frame, 9) for frame in flow[..., c]] for c in range(flow.shape[-1])],
            min=float(sample["flow_range"][0]),
            max=float(sample["flow_range"][1]),
        ),
        depth=dict(
            data=[encode_png(frame, 9) for frame in depth],
            min=float(sample["depth_range"][0]),
            max=float(sample["depth_range"][1]),
        ),
    )


def _tfds_samples(src: Path, tfds_name: str, split: str) -> tuple[Iterator[dict], int]:
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError:
        raise SystemExit(
            "MOVi conversion reads the TFDS TFRecords with TensorFlow, which is not installed.\n"
            "Install it (ideally in a separate environment): pip install 'smoothsa[movi]'\n"
            "(= tensorflow tensorflow-datasets), then download the data, e.g.\n"
            "  gsutil -m cp -r gs://kubric-public/tfds/movi_c/256x256/1.0.0 <src>/movi_c/256x256/"
        ) from None
    tf.config.set_visible_devices([], "GPU")  # decoding only: keep TensorFlow off the GPUs
    builder = tfds.builder(tfds_name, data_dir=str(src))
    dataset = builder.as_dataset(split=split, shuffle_files=False)

    def samples() -> Iterator[dict]:
        for item in dataset:
            instances = item["instances"]
            yield dict(
                video=item["video"].numpy(),
                segmentations=item["segmentations"].numpy(),
                bbox_frames=[f.numpy() for f in instances["bbox_frames"]],
                bboxes=[b.numpy() for b in instances["bboxes"]],
                backward_flow=item["backward_flow"].numpy(),
                flow_range=item["metadata"]["backward_flow_range"].numpy(),
                depth=item["depth"].numpy(),
                depth_range=item["metadata"]["depth_range"].numpy(),
            )

    return samples(), builder.info.splits[split].num_examples


def convert_movi(src: Path, dst: Path, name: str = "movi_c", limit: int | None = None) -> list[Path]:
    written = []
    for split, tfds_split in (("train", "train"), ("val", "validation")):
        samples, total = _tfds_samples(src, f"{name}/256x256:1.0.0", tfds_split)
        if limit is not None:
            samples, total = (s for _, s in zip(range(limit), samples)), min(total, limit)
        written.append(write_split(dst / f"{split}.lmdb", map(movi_record, samples), total, f"{name} {split}"))
    return written


# ------------------------------------------------------------------------------------------------
# YTVIS: RLE / polygon masks


def rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`)."""
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    values: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            char = data[position] - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)  # sign extension
        if len(values) > 2:
            value += values[-2]  # counts after the second are stored as differences
        values.append(value)
    return values


def rle_string(counts: list[int]) -> str:
    """Inverse of `rle_counts` (pycocotools' `rleToString`)."""
    chars = []
    for i, value in enumerate(counts):
        if i > 2:
            value -= counts[i - 2]
        more = True
        while more:
            char = value & 0x1F
            value >>= 5
            more = value != -1 if char & 0x10 else value != 0
            chars.append(chr(char + 48 + (0x20 if more else 0)))
    return "".join(chars)


def rle_decode(rle: dict, height: int, width: int) -> np.ndarray:
    """Mask of a COCO RLE (compressed string or list of counts; column-major runs starting with 0s).

    Shapes:
        -> (H, W) uint8 in {0, 1}
    """
    counts = rle["counts"]
    counts = rle_counts(counts) if isinstance(counts, (str, bytes)) else list(counts)
    height, width = rle.get("size", (height, width))
    if sum(counts) != height * width:
        raise ValueError(f"RLE covers {sum(counts)} pixels, expected {height}x{width}")
    flat = np.repeat((np.arange(len(counts)) % 2).astype(np.uint8), counts)
    return flat.reshape(width, height).T  # column-major


def rle_encode(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a binary (H, W) mask (for tests and tools)."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": rle_string(counts)}


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterises COCO polygons [x0, y0, x1, y1, ...] (merged into one mask) with pycocotools, as the
    official converter does (other rasterisers disagree on boundary pixels).

    Shapes:
        -> (H, W) uint8 in {0, 1}
    """
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise ConversionError(
            "this annotation file has polygon masks, which are rasterised with pycocotools (as the official "
            "converter does); install it: pip install 'smoothsa[convert]' (or pip install pycocotools)"
        ) from None
    with warnings.catch_warnings():  # pycocotools' decode calls np.array(copy=False) on numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, height, width)))


def track_masks(track: dict, frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W) uint8 masks of one track; frames where it is not visible (None) are empty."""
    masks = np.zeros((frames, height, width), np.uint8)
    for t, segmentation in enumerate(track["segmentations"]):
        if segmentation is None:
            continue
        if isinstance(segmentation, list):
            masks[t] = polygons_to_mask(segmentation, height, width)
        else:
            masks[t] = rle_decode(segmentation, height, width)
    return masks


def ytvis_record(frame_paths: list[Path], tracks: list[dict], height: int, width: int) -> dict:
    """One video: `video` list of JPEG bytes, `segment` list of PNG (0 = bg, j + 1 = track j, later
    tracks drawn over earlier ones), `s`, `clazz` (T, s) uint8."""
    frames = len(frame_paths)
    if any(len(track["segmentations"]) != frames for track in tracks):
        raise ValueError(f"{frame_paths[0].parent}: tracks and frames disagree in length")
    if len(tracks) > 255:
        raise ValueError(f"{frame_paths[0].parent}: {len(tracks)} tracks do not fit a uint8 index map")
    segment = np.zeros((frames, height, width), np.uint8)
    for j, track in enumerate(tracks):
        segment[track_masks(track, frames, height, width).astype(bool)] = j + 1
    clazz = np.tile(np.array([track["category_id"] for track in tracks], np.uint8), (frames, 1))
    return dict(
        video=[path.read_bytes() for path in frame_paths],
        segment=[encode_png(frame) for frame in segment],
        s=len(tracks),
        clazz=clazz,
    )


def _ytvis_splits(src: Path, variant: str) -> dict[str, tuple[Path, Path]]:
    if variant == "hq":
        return {s: (src / f"ytvis_hq-{s}.json", src / "JPEGImages") for s in ("train", "val", "test")}
    if variant == "2022":
        return {
            "train": (src / "train" / "instances.json", src / "train" / "JPEGImages"),
            "val": (src / "valid" / "gt.json", src / "valid" / "JPEGImages"),
            "test": (src / "test" / "test_gt.json", src / "test" / "JPEGImages"),
        }
    raise ValueError(f"unknown YTVIS variant {variant!r} (hq or 2022)")


def convert_ytvis(
    src: Path,
    dst: Path,
    variant: str = "hq",
    splits: dict[str, tuple[Path, Path]] | None = None,
    limit: int | None = None,
) -> list[Path]:
    written = []
    for split, (annotation_file, frames_dir) in (splits or _ytvis_splits(src, variant)).items():
        if not annotation_file.exists():
            print(f"ytvis: {annotation_file} not found; skipping {split}", file=sys.stderr)
            continue
        with open(annotation_file) as file:
            annotation = json.load(file)
        videos = {video["id"]: video for video in annotation["videos"]}
        tracks = defaultdict(list)
        for track in annotation.get("annotations") or []:
            tracks[track["video_id"]].append(track)
        ids = [vid for vid in videos if tracks[vid]][:limit]  # videos without tracks are skipped
        if not ids:
            print(f"ytvis: {annotation_file} has no annotated videos; skipping {split}", file=sys.stderr)
            continue
        records = (
            ytvis_record(
                [frames_dir / name for name in videos[vid]["file_names"]],
                tracks[vid],
                videos[vid]["height"],
                videos[vid]["width"],
            )
            for vid in ids
        )
        written.append(write_split(dst / f"{split}.lmdb", records, len(ids), f"ytvis {split}"))
    if not written:
        names = ", ".join(str(annotation_file) for annotation_file, _ in (splits or _ytvis_splits(src, variant)).values())
        raise ConversionError(f"ytvis: found no annotated split; looked for {names}")
    return written


# ------------------------------------------------------------------------------------------------
# command line


def _split_override(text: str) -> tuple[str, tuple[Path, Path]]:
    name, _, rest = text.partition("=")
    annotation, _, frames = rest.partition(":")
    if not name or not annotation:
        raise argparse.ArgumentTypeError("expected NAME=ANNOTATIONS.json[:FRAMES_DIR]")
    annotation_path = Path(annotation)
    return name, (annotation_path, Path(frames) if frames else annotation_path.parent / "JPEGImages")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m smoothsa.dataio.convert",
        description="Convert an original dataset layout to the official LMDB files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("dataset", choices=["clevrtex", "coco", "voc", "movi", "ytvis", "folder"])
    parser.add_argument("--src", type=Path, required=True, help="folder of the original dataset")
    parser.add_argument("--dst", type=Path, required=True, help="output folder; writes <dst>/<split>.lmdb")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N samples per split")
    parser.add_argument("--name", default="movi_c", help="movi: TFDS dataset name (movi_c, movi_d, movi_e)")
    parser.add_argument("--variant", default="hq", choices=["hq", "2022"], help="ytvis: annotation layout")
    parser.add_argument(
        "--split", type=_split_override, action="append", help="ytvis: NAME=ANNOTATIONS.json[:FRAMES_DIR]"
    )
    parser.add_argument("--val-fraction", type=float, default=0.05, help="folder: share of the inputs put in val")
    parser.add_argument("--video", action="store_true", help="folder: videos (files or frame folders), not images")
    args = parser.parse_args(argv)
    if not args.src.exists():
        parser.error(f"--src {args.src} does not exist")
    converters: dict[str, Callable[[], list[Path]]] = {
        "clevrtex": lambda: convert_clevrtex(args.src, args.dst, args.limit),
        "coco": lambda: convert_coco(args.src, args.dst, args.limit),
        "voc": lambda: convert_voc(args.src, args.dst, args.limit),
        "movi": lambda: convert_movi(args.src, args.dst, args.name, args.limit),
        "ytvis": lambda: convert_ytvis(
            args.src, args.dst, args.variant, dict(args.split) if args.split else None, args.limit
        ),
        "folder": lambda: _convert_folder(parser, args),
    }
    try:
        written = converters[args.dataset]()
    except ConversionError as error:
        parser.exit(2, f"error: {error}\n")
    for path in written:
        print(path)
    return written


def _convert_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Path]:
    from .folder import convert_folder

    try:
        return convert_folder(args.src, args.dst, args.val_fraction, args.video)
    except (ValueError, ImportError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
