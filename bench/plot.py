"""Recorded pytest-benchmark JSON files → a Markdown table and a PNG bar chart (images/s per variant, one panel
per benchmark group and device).

    python bench/plot.py bench/results/*.json --out bench/results/summary     # summary.md, summary.png
    python bench/plot.py /tmp/cpu.json --out /tmp/summary --backend pillow   # without matplotlib

Speedups are ratios of medians within one group of one file: median(baseline) / median(variant), with the
baselines "eager-fp32" and "eager-fp16" (`speedups`, also used by bench/conftest.py when a run writes its JSON).
Images/s is `extra_info["images_per_round"]` / median (frames/s for video groups); results that record no image
count are charted in calls/s. The chart uses matplotlib when it is installed and draws with Pillow otherwise.
"""
import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

BASELINES = {"speedup_vs_eager_fp32": "eager-fp32", "speedup_vs_eager_fp16": "eager-fp16"}


def variant_of(entry: dict) -> str:
    """The row label of a result: `extra_info["variant"]` (or `"path"`), else its parameter id, else its name."""
    info = entry.get("extra_info", {})
    return info.get("variant") or info.get("path") or entry.get("param") or entry["name"]


def group_of(entry: dict) -> str:
    """The benchmark group, else the test function's name (its parametrizations become the rows)."""
    return entry.get("group") or entry["name"].split("[")[0]


def speedups(benchmarks: list[dict]) -> dict[str, dict[str, float]]:
    """fullname → {"speedup_vs_eager_fp32": x, "speedup_vs_eager_fp16": y} for each result of a group that
    holds that baseline; x = median(eager-fp32) / median(result) (> 1: faster than the baseline)."""
    groups = defaultdict(list)
    for entry in benchmarks:
        groups[group_of(entry)].append(entry)
    result = {}
    for entries in groups.values():
        medians = {variant_of(entry): entry["stats"]["median"] for entry in entries}
        for entry in entries:
            result[entry["fullname"]] = {
                key: medians[base] / entry["stats"]["median"] for key, base in BASELINES.items() if base in medians
            }
    return result


@dataclass
class Row:
    """One result: a variant of a benchmark group, measured on one device."""

    source: str
    device: str
    group: str
    variant: str
    median_s: float
    images_per_s: float | None
    unit: str
    speedup_vs_eager_fp32: float | None
    speedup_vs_eager_fp16: float | None
    peak_memory_mib: float | None
    notes: str


def rows_of(data: dict, source: str = "") -> list[Row]:
    """The rows of one pytest-benchmark JSON document (speedups recomputed from its medians)."""
    benchmarks = data.get("benchmarks", [])
    ratios = speedups(benchmarks)
    rows = []
    for entry in benchmarks:
        info = entry.get("extra_info", {})
        median = entry["stats"]["median"]
        per_round = info.get("images_per_round")
        rate = per_round / median if per_round and median else info.get("images_per_s")
        ratio = ratios.get(entry["fullname"], {})
        rows.append(
            Row(
                source=source,
                device=info.get("device") or data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?"),
                group=group_of(entry),
                variant=variant_of(entry),
                median_s=median,
                images_per_s=rate,
                unit=info.get("unit", "images"),
                speedup_vs_eager_fp32=ratio.get("speedup_vs_eager_fp32"),
                speedup_vs_eager_fp16=ratio.get("speedup_vs_eager_fp16"),
                peak_memory_mib=info.get("peak_memory_mib"),
                notes=_notes(info),
            )
        )
    return rows


def _notes(info: dict) -> str:
    notes = []
    tflops = info.get("achieved_tflops")
    if tflops is not None:
        notes.append(f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{1e3 * tflops:.1f} GFLOP/s")
    if info.get("peak_fraction") is not None:
        notes.append(f"{100 * info['peak_fraction']:.1f}% of peak")
    if info.get("loader_wait_fraction") is not None:
        steady = info.get("steady_loader_wait_fraction")
        notes.append(f"waits on loader {100 * info['loader_wait_fraction']:.0f}%"
                     + (f" ({100 * steady:.1f}% after the first batch)" if steady is not None else ""))
    if info.get("graph_breaks"):
        notes.append(f"{info['graph_breaks']} graph breaks")
    if info.get("cudagraph_skips"):
        notes.append("CUDA graphs skipped")
    return ", ".join(notes)


def load_rows(paths: list[str | Path]) -> list[Row]:
    rows = []
    for path in paths:
        path = Path(path)
        rows += rows_of(json.loads(path.read_text()), path.stem)
    return rows


def _number(value: float | None, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def markdown_table(rows: list[Row]) -> str:
    """One line per result, grouped by benchmark group and device in their order of appearance."""
    lines = [
        "| benchmark | variant | median | images/s | vs eager fp32 | vs eager fp16 | peak memory | device | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in _grouped(rows):
        rate = _number(row.images_per_s, ".1f") + ("" if row.unit == "images" else f" {row.unit}")
        lines.append(
            f"| {row.group} | {row.variant} | {1e3 * row.median_s:.1f} ms | {rate} "
            f"| {_number(row.speedup_vs_eager_fp32, '.2f', '×')} | {_number(row.speedup_vs_eager_fp16, '.2f', '×')} "
            f"| {_number(row.peak_memory_mib, '.0f', ' MiB')} | {row.device} | {row.notes} |"
        )
    return "\n".join(lines) + "\n"


def _grouped(rows: list[Row]) -> list[Row]:
    order = {}
    for row in rows:
        order.setdefault((row.group, row.device, row.source), len(order))
    return sorted(rows, key=lambda row: order[(row.group, row.device, row.source)])


def _panels(rows: list[Row]) -> dict[str, list[Row]]:
    panels = defaultdict(list)
    for row in _grouped(rows):
        panels[f"{row.group}\n{row.device}"].append(row)
    return panels


def _bar_value(row: Row) -> tuple[float, str]:
    """What a bar shows: images/s (frames/s), or calls/s for results that record no image count."""
    if row.images_per_s is not None:
        return row.images_per_s, f"{row.unit}/s"
    return 1.0 / row.median_s, "calls/s"


def _bar_label(row: Row) -> str:
    rate = f"{_bar_value(row)[0]:.1f}"
    return rate if row.speedup_vs_eager_fp32 is None else f"{rate}\n{row.speedup_vs_eager_fp32:.2f}×"


def bar_chart_matplotlib(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    columns = min(2, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(6.5 * columns, 4.2 * lines), squeeze=False)
    for axis, (title, panel) in zip(axes.flat, panels.items()):
        values = [_bar_value(row)[0] for row in panel]
        bars = axis.bar(range(len(panel)), values, color=[f"C{i}" for i in range(len(panel))])
        axis.bar_label(bars, labels=[_bar_label(row) for row in panel], fontsize=8)
        axis.set_xticks(range(len(panel)), [row.variant for row in panel], rotation=20, ha="right", fontsize=8)
        axis.set_ylabel(_bar_value(panel[0])[1])
        axis.set_title(title, fontsize=9)
        axis.margins(y=0.25)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def bar_chart_pillow(rows: list[Row], path: Path) -> None:
    from PIL import Image, ImageDraw

    width, height, margin = 520, 340, 40
    panels = _panels(rows)
    columns = min(2, len(panels))
    lines = math.ceil(len(panels) / columns)
    image = Image.new("RGB", (columns * width, lines * height), "white")
    draw = ImageDraw.Draw(image)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for k, (title, panel) in enumerate(panels.items()):
        left, top = (k % columns) * width, (k // columns) * height
        draw.multiline_text((left + margin, top + 6), f"{title} ({_bar_value(panel[0])[1]})", fill="black")
        base, plot_top = top + height - 3 * margin, top + 2 * margin
        draw.line([(left + margin, base), (left + width - margin, base)], fill="black")
        largest = max(_bar_value(row)[0] for row in panel) or 1.0
        slot = (width - 2 * margin) / len(panel)
        for i, row in enumerate(panel):
            x0 = left + margin + i * slot + slot * 0.15
            x1 = x0 + slot * 0.7
            y = base - (base - plot_top) * _bar_value(row)[0] / largest
            draw.rectangle([x0, y, x1, base], fill=colours[i % len(colours)])
            draw.multiline_text((x0, y - 24), _bar_label(row).replace("×", "x"), fill="black")  # bitmap font: ASCII
            draw.text((x0, base + 6 + 12 * (i % 2)), row.variant, fill="black")
    image.save(path)


def bar_chart(rows: list[Row], path: Path, backend: str = "auto") -> str:
    """Draws the chart; returns the backend used ("matplotlib" or "pillow")."""
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401

            backend = "matplotlib"
        except ImportError:
            backend = "pillow"
    {"matplotlib": bar_chart_matplotlib, "pillow": bar_chart_pillow}[backend](rows, path)
    return backend


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files (pytest --benchmark-json)")
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.md and <out>.png")
    parser.add_argument("--backend", default="auto", choices=["auto", "matplotlib", "pillow"])
    args = parser.parse_args(argv)
    rows = load_rows(args.files)
    if not rows:
        parser.error(f"no benchmark results in {', '.join(args.files)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = out.with_name(out.name + ".md")
    chart = out.with_name(out.name + ".png")
    table.write_text(markdown_table(rows))
    used = bar_chart(rows, chart, args.backend)
    print(f"wrote {table} and {chart} ({used}), {len(rows)} results")


if __name__ == "__main__":
    main()
