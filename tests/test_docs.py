"""The README and docs/: every relative link names a file that exists (and a heading there, where it names one),
and the README's map of the docs names every file in docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's ids for a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    titles = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles}


def local_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [link for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    for link in local_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} names no file"
        if anchor:
            assert anchor in anchors(target), f"{page.name}: {link} names no heading of {target.name}"


def test_the_readme_maps_every_doc():
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert len(docs) >= 8
    linked = {Path(link.split("#")[0]).name for link in local_links(ROOT / "README.md") if link.startswith("docs/")}
    assert linked == docs


def test_anchors_follow_github():
    page = ROOT / "docs" / "tasks.md"
    assert "your-own-task-a-spec-file" in anchors(page) and "tasks-built-in-and-your-own" in anchors(page)
