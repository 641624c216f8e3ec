"""Every relative link in the repository's Markdown resolves: the file exists, and a #anchor names a
heading of its target under GitHub's slug rules. Documents move between files; a link left behind
should fail here, not in a reader's browser."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Folders that hold no documentation of this repository (tool caches, environments, run output).
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "runs", "build", "dist"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) or [text](target "title"); images too. The text may hold inline code.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> List[Path]:
    found = []
    for path in sorted(ROOT.rglob("*.md")):
        parts = path.relative_to(ROOT).parts[:-1]
        if any(p in SKIP_DIRS or p.startswith(".") for p in parts):
            continue
        found.append(path)
    return found


def _prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation other than '-'
    and '_' removed, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: Dict[str, int] = {}
    result: Set[str] = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> Iterator[Tuple[int, str]]:
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        # A link's target is never inside inline code; blank code spans so that `[x](y)` in code
        # is not read as a link.
        prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        for m in LINK.finditer(prose):
            yield number, m.group(1)


def dead_links(path: Path, root: Path = ROOT) -> List[str]:
    problems = []
    cache: Dict[Path, Set[str]] = {}
    for number, target in links(path):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto: not checked here
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and dest.suffix == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest)
            if anchor not in cache[dest]:
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


def test_slug_follows_github():
    assert slug("Watching and steering a running job") == "watching-and-steering-a-running-job"
    assert slug("Reading `metrics.jsonl`") == "reading-metricsjsonl"
    assert slug("`ma-ray plan --search`: the best layouts") == "ma-ray-plan---search-the-best-layouts"
    assert slug("The planner's picks (2026-12-07)") == "the-planners-picks-2026-12-07"
    assert slug("snake_case and 1.5 x") == "snake_case-and-15-x"


def test_repeated_headings_are_numbered(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Notes\n\n## Notes\n\n```\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"notes", "notes-1"}


def test_the_check_finds_dead_links(tmp_path):
    (tmp_path / "b.md").write_text("## Here\n", encoding="utf-8")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#here) [gone](c.md) [bad](b.md#there) `[code](nowhere.md)`\n"
                    "[self](#top)\n# Top\n[web](https://example.com/x#y)\n", encoding="utf-8")
    problems = dead_links(page, root=tmp_path)
    assert len(problems) == 2
    assert "c.md: no such file" in problems[0]
    assert "#there" in problems[1]


def test_the_repository_has_markdown():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "docs/configuration.md", "bench/RESULTS.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_dead_relative_links(path):
    problems = dead_links(path)
    assert not problems, "dead links:\n" + "\n".join(problems)
