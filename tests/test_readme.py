"""README.md is the entry point: short, and every relative link in it points to a file (and a
heading) that exists. The pages under docs/ are checked by the strict docs build (``make docs``)."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT

README = ROOT / "README.md"
MAX_LINES = 150
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$")


def slug(heading: str) -> str:
    """The anchor GitHub and MyST give a heading: lowercase, punctuation dropped but ``-`` and
    ``_``, spaces as ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path) -> set[str]:
    """Anchors of the headings of a Markdown file (outside code blocks)."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            found.add(slug(m.group(1)))
    return found


def relative_links(path) -> list[str]:
    return [t for t in LINK.findall(path.read_text())
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]   # http:, https:, mailto: ...


def test_slug_matches_github():
    assert slug("The auto_LiRPA 0.3 pin") == "the-auto_lirpa-03-pin"
    assert slug("Certify and export") == "certify-and-export"
    assert slug("`fastcert.run` (`config.yaml`)") == "fastcertrun-configyaml"


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize("link", sorted(set(relative_links(README))))
def test_every_relative_link_of_the_readme_exists(link):
    path, _, anchor = link.partition("#")
    target = (README.parent / path).resolve() if path else README
    assert target.exists(), f"README.md links to {path}, which does not exist"
    if anchor:
        assert target.suffix == ".md", link
        assert anchor in anchors(target), f"README.md links to {link}: no such heading"
