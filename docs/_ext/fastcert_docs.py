"""Pages generated at every docs build, so they cannot drift from the code, and the two
docstring conventions the build understands.

- ``_generated/api/<module>.md``: one autodoc page per module of ``fastcert`` and ``experiments``.
- Docstrings write ``|x|`` for an absolute value, which reStructuredText reads as a substitution:
  :func:`escape_bars` escapes the bars outside literals and roles.
- A role's target is resolved as Python resolves the name in the docstring's module (an
  unqualified ``:class:`Ramp``` where ``Ramp`` is imported, a re-export such as
  ``fastcert.methods.FastIBP``) and linked to the object's documented entry
  (:func:`resolve_as_python`); a name Python cannot resolve stays a broken reference, which
  fails the strict build.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

import config_reference
from sphinx.util.nodes import make_refnode

DOCS = Path(__file__).resolve().parents[1]
OUT = DOCS / "_generated"
PACKAGES = ("fastcert", "experiments")
_MISSING = object()


def modules(package: str) -> list[str]:
    """Every module of ``package`` (sub-packages included), sorted."""
    pkg = importlib.import_module(package)
    return [package] + sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, package + "."))


def write(path: Path, text: str) -> None:
    """Write ``text`` unless the file already holds it (Sphinx re-reads only changed sources)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def api_pages() -> None:
    for package in PACKAGES:
        for name in modules(package):
            write(OUT / "api" / f"{name}.md",
                  f"# `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n```\n")
    lines = ["# API reference", "", "Generated from the docstrings of every module.", ""]
    for package in PACKAGES:
        lines += [f"## `{package}`", "", "```{toctree}", ":maxdepth: 1", ""]
        lines += [f"api/{name}" for name in modules(package)]
        lines += ["```", ""]
    write(OUT / "api.md", "\n".join(lines))


# ----------------------------------------------------------------------------- docstrings

_LITERAL = re.compile(r"(``.+?``|:[\w:]+:`[^`]*`|`[^`]*`_?)")


def escape_bars(line: str) -> str:
    """``|x|`` → ``\\|x\\|`` outside inline literals, roles and interpreted text."""
    parts = _LITERAL.split(line)
    return "".join(p if i % 2 else p.replace("|", r"\|") for i, p in enumerate(parts))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def escape_docstring(lines: list[str]) -> list[str]:
    """:func:`escape_bars` on every line but those of literal blocks (after a ``::``)."""
    out, literal_at = [], None
    for line in lines:
        if literal_at is not None and line.strip() and _indent(line) <= literal_at:
            literal_at = None
        out.append(line if literal_at is not None else escape_bars(line))
        if literal_at is None and line.rstrip().endswith("::"):
            literal_at = _indent(line)
    return out


def process_docstring(app, what, name, obj, options, lines) -> None:
    """Escape bars; drop the docstring a dataclass without one gets (its ``__init__`` signature)."""
    if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and lines
            and lines[0].startswith(f"{obj.__name__}(")):
        lines[:] = []
    lines[:] = escape_docstring(lines)


# ----------------------------------------------------------------------------- references

def _lookup(dotted: str, namespaces: list) -> object:
    """The object ``dotted`` names, its first part looked up in ``namespaces`` (then imported)."""
    head, *rest = dotted.split(".")
    obj = _MISSING
    for space in namespaces:
        obj = getattr(space, head, _MISSING)
        if obj is not _MISSING:
            break
    if obj is _MISSING:
        try:
            obj = importlib.import_module(head)
        except ImportError:
            return _MISSING
    prefix = head
    for part in rest:
        prefix = f"{prefix}.{part}"
        nxt = getattr(obj, part, _MISSING)
        if nxt is _MISSING:
            try:
                nxt = importlib.import_module(prefix)
            except ImportError:
                return _MISSING
        obj = nxt
    return obj


def _object_of(fullname: str) -> object:
    """The object a documented name stands for: its longest importable prefix, then attributes
    (a module's attribute may shadow a submodule: ``fastcert.models.two_layer``)."""
    parts = fullname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, _MISSING)
            if obj is _MISSING:
                break
        return obj
    return _MISSING


def resolve_as_python(app, env, node, contnode):
    """Link a Python-domain reference that Sphinx's own lookup missed to the documented object
    that Python's name resolution in the docstring's module gives, if exactly one exists."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    namespaces = []
    if node.get("py:module"):
        module = _lookup(node["py:module"], [])
        if node.get("py:class") and module is not _MISSING:
            cls = _lookup(node["py:class"], [module])
            if cls is not _MISSING:
                namespaces.append(cls)
        if module is not _MISSING:
            namespaces.append(module)
    obj = _lookup(target, namespaces)
    if obj is _MISSING:
        return None
    domain = env.domains["py"] if hasattr(env.domains, "__getitem__") else env.get_domain("py")
    last = target.rsplit(".", 1)[-1]
    found = sorted({name for name, entry in domain.objects.items()
                    if name.rsplit(".", 1)[-1] == last and not entry.aliased
                    and _object_of(name) is obj})
    if len(found) != 1:
        return None
    entry = domain.objects[found[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id,
                        contnode, found[0])


def csv_table(path: Path) -> list[str]:
    """A CSV file as a Markdown table."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    cell = config_reference.md_text
    out = ["| " + " | ".join(cell(c) for c in rows[0]) + " |",
           "|" + "---|" * len(rows[0])]
    return out + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows[1:]]


def bench_tables() -> None:
    """``_generated/include/bench_data.md``: every CSV under ``docs/data/`` (what ``make bench``
    commits) as a table, for the performance page to include."""
    csvs = sorted((DOCS / "data").glob("*.csv"))
    lines = []
    for path in csvs:
        lines += [f"**`docs/data/{path.name}`**", "", *csv_table(path), ""]
    if not csvs:
        lines = ["No benchmark CSVs are committed yet: `make bench` writes them to "
                 "`docs/data/`.", ""]
    write(OUT / "include" / "bench_data.md", "\n".join(lines))


def drop_absent_pages(app, docname, source) -> None:
    """Remove from the root page's toctrees the pages of ``fastcert_optional_pages`` that do not
    exist yet (pages that other branches add); any other missing page still fails the build."""
    if docname != app.config.root_doc:
        return
    absent = {p for p in app.config.fastcert_optional_pages if not (DOCS / f"{p}.md").is_file()}
    source[0] = "\n".join(line for line in source[0].split("\n") if line.strip() not in absent)


def reread_root(app, env, added, changed, removed) -> list[str]:
    """Read the root page at every build: which optional pages exist may have changed."""
    return [app.config.root_doc]


def generate(app) -> None:
    api_pages()
    config_reference.generate(DOCS.parent / "fastcert" / "conf", OUT / "config", write)
    bench_tables()


def setup(app):
    app.add_config_value("fastcert_optional_pages", [], "env")
    app.connect("builder-inited", generate)
    app.connect("source-read", drop_absent_pages)
    app.connect("env-get-outdated", reread_root)
    app.connect("autodoc-process-docstring", process_docstring)
    app.connect("missing-reference", resolve_as_python)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
