"""bench/gpu.sh --dry-run: the prepared GPU run, on the CPU at the benchmarks' tiny sizes, writes its JSON and its
Markdown, with every phase and every row it asked for accounted for."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_sh_dry_run_writes_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHON": sys.executable}
    result = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (json_path,) = tmp_path.glob("cpu-dry-run-*.json")
    markdown = json_path.with_suffix(".md").read_text()
    document = json.loads(json_path.read_text())
    run = document["gpu_run"]
    assert run["dry_run"] is True and run["environment"]["torch"]
    phases = {p["phase"]: p["status"] for p in run["phases"]}
    assert phases == {"install": "skipped", "environment": "ok", "cuda_tests": "ok", "train_step_b1": "ok",
                      "train_step_b4": "ok", "end_to_end": "ok"}, run["phases"]  # fmt: skip
    assert run["cuda_tests"]["skipped"] > 0 and run["cuda_tests"]["failed"] == 0  # no GPU: every cuda test skips
    rows = {(r["phase"], r["row"]): r for r in run["rows"]}
    for phase in ("train_step_b1", "train_step_b4"):
        for preset in ("smoothsa_r-coco", "smoothsav_c-movi_c"):
            assert rows[(phase, f"test_bench_train_step[{preset}-eager-fp32]")]["status"] == "passed"
            assert rows[(phase, f"test_bench_train_step[{preset}-eager-fp16]")]["status"] == "passed"
            compiled = rows[(phase, f"test_bench_train_step[{preset}-fused-bf16-compile]")]
            assert compiled["status"] == "skipped" and "CUDA only" in compiled["reason"]
    for loader in ("torch", "torch-gpu"):
        assert rows[("end_to_end", f"test_bench_end_to_end[{loader}]")]["status"] == "passed"
    assert "after the first batch" in markdown  # the loader stall fraction
    # The two batch sizes are separate groups; each result carries its phase and throughput.
    groups = {entry["group"] for entry in document["benchmarks"]}
    assert {"train_step smoothsa_r-coco B=2", "train_step smoothsa_r-coco B=4"} <= groups
    assert all(entry["extra_info"]["images_per_s"] > 0 for entry in document["benchmarks"])
    assert "| train_step_b4 | ok |" in markdown and "| benchmark | variant | median |" in markdown


def test_results_index_lists_gpu_runs_newest_first_and_shows_the_newest(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    for stem, body in [("nvidia-h200-2026-11-02", "old table"), ("nvidia-h100-80gb-hbm3-2026-12-01", "new table"),
                       ("cpu-dry-run-2026-12-02", "dry table")]:  # fmt: skip
        (tmp_path / f"{stem}.md").write_text(f"# bench/gpu.sh, {stem}\n\n{body}\n")
    assert "ahead of time" not in gpu_report.results_index(tmp_path)
    (tmp_path / "aot-sm_90-triton-3.9.0.md").write_text("# Fused kernels compiled ahead of time\n")
    index = gpu_report.results_index(tmp_path)
    assert index.index("nvidia-h100-80gb-hbm3-2026-12-01.md") < index.index("nvidia-h200-2026-11-02.md")
    assert "new table" in index and "old table" not in index and "dry" not in index
    assert "- [aot-sm_90-triton-3.9.0](aot-sm_90-triton-3.9.0.md)" in index
