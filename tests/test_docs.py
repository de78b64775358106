"""Every `docs/official.md` section cited anywhere in the repository exists as a heading there."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "official.md"
CITED = "docs/official.md"  # how code cites it
# "## 7. Metrics", "### 2.9b SPOT distillation", "### 10.13 …" → "7", "2.9b", "10.13"
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+[a-z]?)?)\.?\s")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+[a-z]?)?)")
SUFFIXES = {".py", ".md", ".txt", ".cfg", ".toml", ".ini", ".sh"}
SKIPPED_DIRS = {"runs", "build", "dist", "__pycache__", "node_modules"}


def headings(text: str) -> set[str]:
    return {m.group(1) for line in text.splitlines() if (m := HEADING.match(line))}


def citations(text: str) -> list[tuple[int, str]]:
    """(line number, section) for every § after a `docs/official.md` on the same line."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        _, cited, rest = line.partition(CITED)
        if cited:
            found += [(number, section) for section in SECTION.findall(rest)]
    return found


def repository_files():
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and path.suffix in SUFFIXES:
            yield path


def test_parsers_on_a_hand_made_case():
    doc = "# Title\n## 1. Overview\n### 2.9b SPOT\n### 10.13 Channels\n#### not a section\n"
    assert headings(doc) == {"1", "2.9b", "10.13"}
    code = f'x = 1  # {CITED} §10.1, §10.2 and §2.9b.\n"""see §3 (not a citation)"""\n'
    assert citations(code) == [(1, "10.1"), (1, "10.2"), (1, "2.9b")]


def test_the_doc_keeps_the_numbered_sections():
    sections = headings(DOC.read_text())
    expected = {str(i) for i in range(1, 11)} | {f"2.{i}" for i in range(1, 14)} | {"2.9b", "5.1", "5.2"}
    expected |= {"7.1", "7.2", "7.3"} | {f"10.{i}" for i in range(1, 19)}
    assert expected <= sections, sorted(expected - sections)


def test_every_citation_names_an_existing_section():
    sections = headings(DOC.read_text())
    cited, missing = 0, []
    for path in repository_files():
        for number, section in citations(path.read_text(errors="replace")):
            cited += 1
            if section not in sections:
                missing.append(f"{path.relative_to(ROOT)}:{number}: §{section}")
    assert cited >= 50, f"only {cited} citations found: is the scan looking in the right place?"
    assert not missing, "cited sections missing from docs/official.md:\n" + "\n".join(missing)
