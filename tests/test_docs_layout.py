"""The layout in docs/development.md names every module and sub-package of fastcert, so a new
module cannot be left out of the map (the API reference is generated and cannot drift)."""
from __future__ import annotations

import re

from conftest import ROOT

PAGE = ROOT / "docs" / "development.md"


def layout_block() -> str:
    text = PAGE.read_text()
    start = text.index("## Layout")
    return text[start:text.index("```", text.index("```", start) + 3)]


def test_the_layout_names_every_module():
    block = layout_block()
    package = ROOT / "fastcert"
    names = sorted({p.stem for p in package.glob("*.py") if p.stem != "__init__"}
                   | {p.name for p in package.iterdir() if (p / "__init__.py").is_file()})
    missing = [n for n in names if not re.search(rf"\b{re.escape(n)}(\.py|/)", block)]
    assert not missing, f"docs/development.md's layout does not name: {missing}"
