"""The report of one `bench/gpu.sh` run: its phases, the rows it asked for and what became of each, the
environment, and the benchmark results, as one JSON document and one Markdown file.

    python bench/gpu_report.py RUN_FOLDER OUT_FOLDER [--dry-run 1] [--seconds 512]

RUN_FOLDER is what gpu.sh wrote (env.json, nvidia-smi.txt, wheels.txt, phases.jsonl, rows.jsonl, and per phase
its log, `<phase>.xml` (JUnit) and `<phase>.bench.json` (pytest-benchmark)). The JSON keeps pytest-benchmark's
layout (`benchmarks`: every result of every phase, so bench/plot.py reads it) and adds `gpu_run`. It is named
`<gpu>-<date>.json` (`cpu-dry-run-<date>.json` for a dry run), the Markdown beside it. A GPU run also rewrites
`README.md` in OUT_FOLDER (the README's Benchmarks section links it): every recorded run, newest first, and the
newest one's tables.
"""
import argparse
import datetime
import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plot  # noqa: E402


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def junit_cases(path: Path) -> list[dict]:
    """name, status (passed, skipped, failed) and reason of every test case in a JUnit XML file."""
    if not path.exists():
        return []
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        status, reason = "passed", ""
        for tag in ("skipped", "failure", "error"):
            element = case.find(tag)
            if element is not None:
                status = "skipped" if tag == "skipped" else "failed"
                reason = (element.get("message") or element.text or "").strip().splitlines()[0][:200]
                break
        cases.append({"name": case.get("name"), "status": status, "reason": reason,
                      "seconds": float(case.get("time") or 0.0)})  # fmt: skip
    return cases


def row_statuses(run: Path, phases: dict[str, dict]) -> list[dict]:
    """One line per benchmark row asked for: what pytest did with each case the phase's -k selected; a phase that
    selected nothing, or did not run, gets one line saying so."""
    lines = []
    for request in _json_lines(run / "rows.jsonl"):
        phase = request["phase"]
        cases = junit_cases(run / f"{phase}.xml")
        for case in cases:
            lines.append({"phase": phase, "row": case["name"], "status": case["status"], "reason": case["reason"],
                          "seconds": case["seconds"]})  # fmt: skip
        if not cases:
            state = phases.get(phase, {})
            if state.get("status") == "ok":
                status, reason = "not collected", f"no case of {request['function']} matches -k '{request['k']}'"
            else:
                status, reason = state.get("status", "not run"), state.get("reason", "")
            lines.append({"phase": phase, "row": request["k"], "status": status, "reason": reason, "seconds": 0.0})
    return lines


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def build_report(run: Path, dry_run: bool, seconds: int | None, today: datetime.date) -> tuple[str, dict, str]:
    """(file stem, JSON document, Markdown) of a run folder."""
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
    phases = {p["phase"]: p for p in _json_lines(run / "phases.jsonl")}
    for name, state in phases.items():
        if state["status"] in ("failed", "timed out"):
            state["log_tail"] = _log_tail(run / f"{name}.log")
    benchmarks, machine_info = [], {}
    for path in sorted(run.glob("*.bench.json")):
        data = json.loads(path.read_text())
        machine_info = machine_info or data.get("machine_info", {})
        for entry in data.get("benchmarks", []):
            info = entry.setdefault("extra_info", {})
            info["gpu_sh_phase"] = path.name.split(".")[0]
            if info.get("batch") is not None and entry.get("group"):
                entry["group"] += f" B={info['batch']}"  # the phases time the same rows at two batch sizes
            benchmarks.append(entry)
    rows = row_statuses(run, phases)
    cuda_tests = junit_cases(run / "cuda_tests.xml")
    gpu_run = {
        "dry_run": dry_run,
        "date": today.isoformat(),
        "seconds": seconds,
        "environment": env,
        "wheels": (run / "wheels.txt").read_text().split() if (run / "wheels.txt").exists() else [],
        "nvidia_smi": (run / "nvidia-smi.txt").read_text() if (run / "nvidia-smi.txt").exists() else "",
        "phases": list(phases.values()),
        "rows": rows,
        "cuda_tests": {status: sum(c["status"] == status for c in cuda_tests) for status in ("passed", "skipped", "failed")},
        "cuda_test_failures": [f"{c['name']}: {c['reason']}" for c in cuda_tests if c["status"] == "failed"],
    }
    document = {"machine_info": machine_info, "benchmarks": benchmarks, "gpu_run": gpu_run}
    stem = f"cpu-dry-run-{today.isoformat()}" if dry_run else f"{slug(env.get('gpu') or 'no-gpu')}-{today.isoformat()}"
    return stem, document, markdown(document)


def markdown(document: dict) -> str:
    run = document["gpu_run"]
    env = run["environment"]
    lines = [
        f"# bench/gpu.sh{' --dry-run' if run['dry_run'] else ''}, {run['date']}",
        "",
        f"GPU {env.get('gpu') or 'none'} (capability {env.get('capability', '–')}, {env.get('sms', '–')} SMs, "
        f"{env.get('gpu_memory_gib', '–')} GiB); torch {env.get('torch')}, CUDA {env.get('cuda')}, Triton "
        f"{env.get('triton')}, Python {env.get('python')}, {env.get('cpu_count')} CPUs; lmdb {env.get('lmdb')}, "
        f"DALI {'yes' if env.get('dali') else 'no'}; wheels handed: {', '.join(run['wheels']) or 'none'}; "
        f"{run['seconds']} s in all.",
        "",
        f"CUDA tests: {run['cuda_tests']['passed']} passed, {run['cuda_tests']['skipped']} skipped, "
        f"{run['cuda_tests']['failed']} failed.",
        "",
        "| phase | status | seconds | reason |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {p['phase']} | {p['status']} | {p['seconds']} | {p.get('reason', '')} |" for p in run["phases"]]
    lines += ["", "| phase | row | status | seconds | reason |", "|---|---|---|---:|---|"]
    lines += [f"| {r['phase']} | {r['row']} | {r['status']} | {r['seconds']:.1f} | {r['reason']} |" for r in run["rows"]]
    results = plot.rows_of(document, "gpu.sh")
    if results:
        lines += ["", plot.markdown_table(results).rstrip()]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    tmp.replace(path)


def results_index(out: Path) -> str:
    """README.md of a results folder: its `<gpu>-<date>.md` runs, newest first, the kernels' ahead-of-time
    tables (`aot-*.md`, `bench/aot_table.py`), then the newest run in full."""
    runs = sorted((p for p in out.glob("*-????-??-??.md") if not p.name.startswith("cpu-dry-run")),
                  key=lambda p: (p.stem[-10:], p.stem), reverse=True)  # fmt: skip
    lines = ["# Recorded GPU runs", "", "Written by `bench/gpu.sh` (see `bench/README.md`), newest first:", ""]
    lines += [f"- [{p.stem}]({p.name}) ([JSON]({p.stem}.json))" for p in runs] or ["(none recorded yet)"]
    tables = sorted(out.glob("aot-*.md"))
    if tables:
        lines += ["", "Without a GPU, the fused kernels compiled ahead of time (registers, spills and shared memory per "
                  "config, `bench/aot_table.py`):", ""]
        lines += [f"- [{p.stem}]({p.name})" for p in tables]
    if runs:
        newest = runs[0].read_text().split("\n", 1)[1]  # without its title
        lines += ["", f"## {runs[0].stem}", newest.rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the folder bench/gpu.sh wrote")
    parser.add_argument("out", type=Path, help="where the JSON and the Markdown go")
    parser.add_argument("--dry-run", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=None)
    args = parser.parse_args(argv)
    stem, document, text = build_report(args.run, bool(args.dry_run), args.seconds, datetime.date.today())
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    for path, content in ((json_path, json.dumps(document, indent=1)), (markdown_path, text)):
        write_atomically(path, content)
    if not args.dry_run:
        write_atomically(args.out / "README.md", results_index(args.out))
    print(text)
    print(f"wrote {json_path} and {markdown_path}")


if __name__ == "__main__":
    main()
