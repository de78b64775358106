"""bench/plot.py: speedups, images/s and the Markdown table from a small hand-made pytest-benchmark JSON."""
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

PLOT = Path(__file__).resolve().parents[2] / "bench" / "plot.py"


@pytest.fixture(scope="module")
def plot():
    spec = importlib.util.spec_from_file_location("bench_plot", PLOT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(name, group, median, **extra_info):
    return {
        "name": name,
        "fullname": f"bench/test_x.py::{name}",
        "group": group,
        "param": name.partition("[")[2].rstrip("]") or None,
        "stats": {"median": median, "mean": median * 1.1},
        "extra_info": extra_info,
    }


DOCUMENT = {
    "machine_info": {"cpu": {"brand_raw": "Test CPU"}},
    "benchmarks": [
        # 32 images per step: 0.4 s → 80 images/s, 0.2 s → 160, 0.1 s → 320
        result("test_step[a]", "train_step coco", 0.4, variant="eager-fp32", images_per_round=32,
               peak_memory_mib=2000.0, device="NVIDIA H200"),
        result("test_step[b]", "train_step coco", 0.2, variant="eager-fp16", images_per_round=32,
               peak_memory_mib=1500.0, device="NVIDIA H200"),
        result("test_step[c]", "train_step coco", 0.1, variant="fused-fp16", images_per_round=32,
               peak_memory_mib=1234.0, device="NVIDIA H200", achieved_tflops=12.5, peak_fraction=0.0126),
        # 48 frames per step, only an fp32 baseline in the group
        result("test_step[v1]", "train_step movi", 0.6, variant="eager-fp32", images_per_round=48, unit="frames"),
        result("test_step[v2]", "train_step movi", 0.5, variant="fused-fp16", images_per_round=48, unit="frames"),
        # no group, no image count, no variant: grouped by test name, labelled by parameter, charted in calls/s
        result("test_loader[torch-2]", None, 0.25),
        result("test_loader[dali-2]", None, 0.125, images_per_s=512.0),
    ],
}  # fmt: skip


def test_speedups_are_ratios_of_group_medians(plot):
    ratios = plot.speedups(DOCUMENT["benchmarks"])
    fused = ratios["bench/test_x.py::test_step[c]"]
    assert fused["speedup_vs_eager_fp32"] == pytest.approx(4.0)
    assert fused["speedup_vs_eager_fp16"] == pytest.approx(2.0)
    assert ratios["bench/test_x.py::test_step[a]"]["speedup_vs_eager_fp16"] == pytest.approx(0.5)
    assert ratios["bench/test_x.py::test_step[v2]"] == {"speedup_vs_eager_fp32": pytest.approx(1.2)}
    assert ratios["bench/test_x.py::test_loader[dali-2]"] == {}  # no baseline in its group


def test_rows(plot):
    rows = {(row.group, row.variant): row for row in plot.rows_of(DOCUMENT, "h200")}
    assert rows["train_step coco", "fused-fp16"].images_per_s == pytest.approx(320.0)
    assert rows["train_step coco", "eager-fp16"].images_per_s == pytest.approx(160.0)
    assert rows["train_step movi", "fused-fp16"].images_per_s == pytest.approx(96.0)
    assert rows["train_step movi", "fused-fp16"].unit == "frames"
    assert rows["test_loader", "dali-2"].images_per_s == 512.0  # recorded rate, no images_per_round
    assert rows["test_loader", "torch-2"].images_per_s is None
    assert rows["test_loader", "torch-2"].device == "Test CPU"  # from machine_info when extra_info has no device
    assert rows["train_step coco", "fused-fp16"].notes == "12.5 TFLOP/s, 1.3% of peak"


def test_markdown_table(plot):
    table = plot.markdown_table(plot.rows_of(DOCUMENT))
    lines = table.splitlines()
    assert lines[0].startswith("| benchmark | variant | median | images/s | vs eager fp32 | vs eager fp16 | peak")
    assert "| train_step coco | fused-fp16 | 100.0 ms | 320.0 | 4.00× | 2.00× | 1234 MiB | NVIDIA H200 |" in table
    assert "| train_step movi | fused-fp16 | 500.0 ms | 96.0 frames | 1.20× | – | – |" in table
    assert "| test_loader | torch-2 | 250.0 ms | – | – | – | – | Test CPU |" in table
    assert len(lines) == 2 + len(DOCUMENT["benchmarks"])


def test_main_writes_table_and_chart(plot, tmp_path):
    source = tmp_path / "run.json"
    source.write_text(json.dumps(DOCUMENT))
    plot.main([str(source), "--out", str(tmp_path / "out" / "summary"), "--backend", "pillow"])
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| train_step coco | eager-fp32 | 400.0 ms | 80.0 | 1.00× | 0.50× |" in table
    with Image.open(tmp_path / "out" / "summary.png") as chart:
        assert chart.size[0] > 0 and chart.size[1] > 0
