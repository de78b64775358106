"""From presets to batches: the official ground truth of every COCO preset, the one reader registry, keys,
empty splits, and the data layer's import structure."""

import ast
import pickle
from pathlib import Path

import lmdb
import pytest
import torch

from smoothsa.data import LoaderOptions, build_loader
from smoothsa.dataio import DATASETS, write_synthetic
from smoothsa.presets import PRESETS, get_preset

DATAIO = Path(__file__).resolve().parents[2] / "dataio"


def write_official(path, samples):
    env = lmdb.open(str(path), map_size=1 << 30, subdir=False, meminit=False)
    keys = [f"{i:06d}".encode() for i in range(len(samples))]
    with env.begin(write=True) as txn:
        for key, sample in zip(keys, samples):
            txn.put(key, pickle.dumps(sample))
        txn.put(b"__keys__", pickle.dumps(keys))
    env.close()


@pytest.fixture(scope="module")
def coco(tmp_path_factory, coco_record):
    """The shared COCO record as the validation split, beside an empty training split."""
    record, segment = coco_record
    root = tmp_path_factory.mktemp("coco")
    write_official(root / "val.lmdb", [record])
    write_official(root / "train.lmdb", [])
    return root, segment


COCO_PRESETS = sorted(name for name, preset in PRESETS.items() if preset.data.dataset == "coco")


def test_every_coco_preset_is_listed():
    assert {"smoothsa_r-coco", "spot_r-coco", "smoothsa_r_recogn-coco", "spot_r_recogn-coco"} <= set(COCO_PRESETS)


@pytest.mark.parametrize("name", COCO_PRESETS)
def test_coco_presets_use_the_official_instance_ground_truth(coco, name):
    """Every official COCO config reads `MSCOCO(mode="instance")`: stuff merged into channel 0, then the things."""
    root, segment = coco
    batch = next(iter(build_loader(get_preset(name), root, "val", LoaderOptions(batch_size=1))))
    masks = batch["segment"][0]  # (256, 256, C)
    assert masks.shape == (256, 256, 3)
    assert torch.equal(masks[..., 0], torch.from_numpy((segment == 1) | (segment == 3)))
    assert torch.equal(masks[..., 1], torch.from_numpy(segment == 2))
    assert torch.equal(masks[..., 2], torch.from_numpy(segment == 4))
    assert not masks[torch.from_numpy(segment == 0)].any()
    if "recogn" in name:
        assert batch["clazz"][0].tolist() == [1, 3] and batch["bbox"].shape == (1, 2, 4)


def test_empty_validation_split_fails_with_a_message(coco):
    root, _ = coco
    preset = get_preset("smoothsa_r-coco")
    with pytest.raises(ValueError, match=r"coco/train: the split holds no samples"):
        build_loader(preset, root, "train", LoaderOptions())
    empty = root.parent / "empty_val"
    empty.mkdir(exist_ok=True)
    write_official(empty / "val.lmdb", [])
    from smoothsa.build import build_model
    from smoothsa.eval import evaluate_model

    demo = get_preset("demo")
    with pytest.raises(ValueError, match=r"synthetic/val: the split holds no samples"):
        evaluate_model(build_model(demo.model), demo, empty)


def test_every_preset_dataset_has_a_reader():
    assert {preset.data.dataset for preset in PRESETS.values()} <= set(DATASETS)


def test_keys_decide_what_training_batches_carry(tmp_path):
    write_synthetic(tmp_path, "train", num=4, video=True, height=32, width=32, num_frames=8)
    preset = get_preset("smoothsav_c-movi_c")
    options = LoaderOptions(batch_size=2, keys=("video", "bbox"))
    batch = next(iter(build_loader(preset, tmp_path, "train", options)))
    assert list(batch) == ["video", "bbox"] and batch["video"].shape[:2] == (2, 6)  # training clips of 6
    reader = build_loader(preset, tmp_path, "train", LoaderOptions(keys=("video",))).dataset
    assert not reader.with_segment and not reader.with_bbox  # nothing decoded that no key needs
    with pytest.raises(ValueError, match="asked for 'clazz'"):
        build_loader(preset, tmp_path, "train", LoaderOptions(keys=("video", "clazz")))
    val = build_loader(preset, tmp_path, "train", LoaderOptions(batch_size=3), is_training=False)
    assert not val.shuffle and not val.drop_last and len(val) == 2
    gpu = build_loader(preset, tmp_path, "train", LoaderOptions(batch_size=2, keys=("video",), backend="torch-gpu"))
    assert list(next(iter(gpu))) == ["video"] and gpu.device == torch.device("cpu")


def _relative_imports(path: Path) -> tuple[set[str], set[str]]:
    """Modules of the package a file imports (anywhere in it), and the absolute imports naming smoothsa."""
    local, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            local.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "smoothsa":
            outside.add(node.module)
        elif isinstance(node, ast.Import):
            outside |= {alias.name for alias in node.names if alias.name.split(".")[0] == "smoothsa"}
    return local, outside


def test_dataio_has_no_import_cycle_and_imports_nothing_from_smoothsa():
    graph = {}
    for path in DATAIO.glob("*.py"):
        local, outside = _relative_imports(path)
        assert not outside, f"{path.name} imports {outside}"
        if path.stem != "__init__":
            graph[path.stem] = local
    assert "loader" not in graph["dali"]

    def visit(module, trail):
        assert module not in trail, f"import cycle: {' -> '.join(trail + [module])}"
        for target in graph.get(module, ()):
            visit(target, trail + [module])

    for module in graph:
        visit(module, [])
