"""Sphinx configuration of the fastcert docs (``make docs``: a strict build, every warning an
error).

Pages are Markdown (MyST); the API reference is autodoc over every module of ``fastcert`` and
``experiments``, so the docstrings' Sphinx roles (:func:, :class:, :mod:, :data:) are resolved
cross-references, and nitpicky mode (``-n``) fails the build on a broken one. The generated pages
(API reference, configuration reference, benchmark tables) are written by ``_ext/fastcert_docs.py``
into ``docs/_generated/`` at every build.
"""
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
sys.path.insert(0, str(DOCS / "_ext"))

project = "fastcert"
author = "fastcert authors"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "fastcert_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# blocks that other pages {include}, not pages of their own
exclude_patterns = ["_build", "_generated/config/option", "_generated/include"]
templates_path = []

# Markdown: $…$ maths is not enabled (the pages write formulas in Unicode); headings up to level 3
# get anchors, so [text](page.md#heading) links are checked by the build.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "undoc-members": True, "private-members": True,
                           "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
# Signatures without annotations: many name TYPE_CHECKING-only or third-party types; the
# docstrings state what each argument is.
autodoc_typehints = "none"
autodoc_docstring_signature = False
# torch's own docstrings (nn.Module.forward, Function.backward) are not ours
autodoc_inherit_docstrings = False

nitpicky = True
# Targets outside fastcert and experiments (no intersphinx: the build runs offline).
nitpick_ignore_regex = [(r"py:.*", r"(torch|numpy|np|enum|collections|typing|types|omegaconf|hydra|"
                                   r"auto_LiRPA|pathlib|dataclasses|abc|argparse|logging)(\..*)?")]

# Pages that other work adds; left out of the navigation until they exist (fastcert_docs).
fastcert_optional_pages = ["running", "search", "papers/ctbench"]

html_theme = "furo"
html_title = "fastcert"
html_static_path = []
