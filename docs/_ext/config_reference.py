"""The configuration reference, generated from ``fastcert/conf`` at every docs build.

Each YAML file is read line by line, so the page shows what the file says: every key (nested keys
as dotted paths) with its value as written and the comment beside it (comment-only lines continue
the comment of the key above), the file's header comment as its description, its ``defaults``
list, and its ``_target_`` as a link into the API reference (a ``_target_`` that names no
documented object fails the strict build).

Pages (under ``docs/_generated/config/``): ``index`` (the groups and the top-level keys),
one per group (``data``, ``method``, ``hydra/launcher`` ...), ``presets-<suite>`` per family of
``experiment/`` presets with the ``setting/`` files they include, and ``entry-<name>`` for the
configs of ``fastcert.certify`` and ``fastcert.export``. ``option/<group>/<option>.md`` holds one
option's block without a heading, for pages that include it (the method pages).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PRESET_GROUPS = ("experiment", "setting")
ENTRY_POINTS = {"config": "fastcert.run", "certify": "fastcert.certify",
                "export": "fastcert.export"}
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[\w@/.\-]+):(?P<rest>.*)$")
_ITEM = re.compile(r"^(?P<indent>\s*)- (?P<item>.*)$")


@dataclass
class Row:
    key: str
    value: str
    comment: str = ""


@dataclass
class YamlFile:
    """One config file as its author wrote it."""

    path: Path
    header: list[str] = field(default_factory=list)
    package: str | None = None
    defaults: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    @property
    def target(self) -> str | None:
        return next((r.value for r in self.rows if r.key == "_target_"), None)


def split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of the text after ``key:``; a ``#`` inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def _comment(out: YamlFile, stripped: str) -> None:
    """A comment-only line: ``@package``, the header, or the comment of the key above."""
    text = stripped.lstrip("#").strip()
    if text.startswith("@package"):
        out.package = text.split(None, 1)[1]
    elif out.rows:
        out.rows[-1].comment = f"{out.rows[-1].comment} {text}".strip()
    elif not out.defaults:
        out.header.append(stripped[1:].removeprefix(" "))


@dataclass
class _Cursor:
    stack: list[tuple[int, str]] = field(default_factory=list)   # open mappings: (indent, key)
    block_indent: int | None = None   # inside a block scalar (key: |) deeper than this
    in_defaults: bool = False


def _key(out: YamlFile, cur: _Cursor, line: str) -> None:
    """A ``key: value`` line (or a defaults-list item)."""
    item = _ITEM.match(line)
    if item and cur.in_defaults:
        value, comment = split_comment(item["item"])
        out.defaults.append(value + (f"  ({comment})" if comment else ""))
        return
    match = _KEY.match(line)
    if not match:
        return
    indent = len(match["indent"])
    while cur.stack and cur.stack[-1][0] >= indent:
        cur.stack.pop()
    key = ".".join([k for _, k in cur.stack] + [match["key"]])
    value, comment = split_comment(match["rest"])
    cur.in_defaults = key == "defaults"
    if cur.in_defaults:
        return
    if value in ("|", "|-", ">", ">-"):
        cur.block_indent, value = indent, "(text)"
    if not value:
        cur.stack.append((indent, match["key"]))
    out.rows.append(Row(key, value, comment))


def parse(path: Path) -> YamlFile:
    """Rows, header, ``@package`` and defaults list of one YAML file."""
    out, cur = YamlFile(path), _Cursor()
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if cur.block_indent is not None:
            if not stripped or len(line) - len(line.lstrip()) > cur.block_indent:
                continue
            cur.block_indent = None
        if stripped.startswith("#"):
            _comment(out, stripped)
        elif stripped:
            _key(out, cur, line)
    return out


# ----------------------------------------------------------------------------- rendering

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def md_text(text: str) -> str:
    """Plain text safe in a Markdown table cell (no emphasis, HTML or cell breaks)."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_code(text: str) -> str:
    return f"`{text.replace('|', chr(92) + '|')}`" if text else ""


def target_link(target: str) -> str:
    """A cross-reference for project targets (checked by the build), code for the rest."""
    if target.split(".")[0] in ("fastcert", "experiments"):
        return f"{{py:obj}}`{target}`"
    return md_code(target)


def describe(yaml: YamlFile) -> list[str]:
    """The header comment as prose, its command lines as a code block."""
    prose, commands = [], []
    for line in yaml.header:
        text = line.strip()
        if re.match(r"^(python|-m |fastcert-)", text):
            commands.append(text)
        elif text:
            prose.append(text)
    out = [md_text(" ".join(prose)), ""] if prose else []
    if commands:
        out += ["```bash", *commands, "```", ""]
    return out


def table(yaml: YamlFile, skip: tuple[str, ...] = ("name", "_target_")) -> list[str]:
    rows = [r for r in yaml.rows if r.key not in skip]
    if not rows:
        return []
    out = ["| key | value | comment |", "|---|---|---|"]
    for r in rows:
        out.append(f"| `{r.key}` | {md_code(r.value)} | {md_text(r.comment)} |")
    return out + [""]


def block(yaml: YamlFile, conf: Path) -> list[str]:
    """One option: description, file, target, defaults and keys."""
    rel = yaml.path.relative_to(conf.parent.parent)
    out = describe(yaml)
    facts = [f"file `{rel}`"]
    if yaml.target:
        facts.append(f"builds {target_link(yaml.target)}")
    if yaml.package:
        facts.append(f"package `{yaml.package}`")
    sentence = "; ".join(facts)
    out += [sentence[0].upper() + sentence[1:] + ".", ""]
    if yaml.defaults:
        out += ["Defaults list: " + ", ".join(md_code(d) for d in yaml.defaults) + ".", ""]
    return out + table(yaml)


def option_name(path: Path, group_dir: Path) -> str:
    return str(path.relative_to(group_dir).with_suffix(""))


# ----------------------------------------------------------------------------- pages

def groups(conf: Path) -> list[str]:
    """Config groups: folders of ``conf`` holding YAML files, presets aside."""
    found = {str(p.parent.relative_to(conf)) for p in conf.rglob("*.yaml") if p.parent != conf}
    return sorted(g for g in found if g.split("/")[0] not in PRESET_GROUPS)


def group_page(conf: Path, group: str) -> tuple[str, dict[str, str]]:
    """The page of one group and the blocks of its options."""
    selector = group
    key = group.replace("/", ".")
    out = [f"# `{group}`", "",
           f"Choose an option with `{selector}=<option>`; change one of its keys with "
           f"`{key}.<key>=<value>` (or the key path shown, for options that write elsewhere).", ""]
    blocks = {}
    for path in sorted((conf / group).glob("*.yaml")):
        name = option_name(path, conf / group)
        blocks[name] = "\n".join(block(parse(path), conf))
        out += [f"## `{name}`", "", blocks[name], ""]
    return "\n".join(out), blocks


def suites(conf: Path) -> list[str]:
    experiment = conf / "experiment"
    return sorted(p.name for p in experiment.iterdir() if p.is_dir())


def presets_page(conf: Path, suite: str) -> str:
    """Settings and presets of one family, with the commands that run them."""
    out = [f"# Presets: `{suite}`", "",
           f"Run one with `python -m fastcert.run experiment={suite}/<folder>/<preset>`; "
           "a folder's "
           f"row set with `python -m fastcert.run -m '+experiment/{suite}/<folder>=glob(*)'` "
           "(Hydra's `glob` lists one folder level, so the folder goes into the override's group).",
           ""]
    settings = sorted((conf / "setting" / suite).glob("*.yaml"))
    if settings:
        out += ["## Settings", "",
                f"The shared part of a row set, `fastcert/conf/setting/{suite}/<setting>.yaml`, "
                "which each preset of the setting includes.", ""]
        for path in settings:
            out += [f"### `setting/{suite}/{path.stem}`", "", *block(parse(path), conf)]
    for folder in sorted(p for p in (conf / "experiment" / suite).iterdir() if p.is_dir()):
        rel = f"{suite}/{folder.name}"
        out += [f"## `{rel}`", "", "```bash",
                f"python -m fastcert.run -m '+experiment/{rel}=glob(*)'", "```", ""]
        for path in sorted(folder.glob("*.yaml")):
            out += [f"### `{rel}/{path.stem}`", "", *block(parse(path), conf)]
    return "\n".join(out)


def loose_presets_page(conf: Path) -> str:
    out = ["# Presets: single files", "",
           "Presets that are one file, not a row set: "
           "`python -m fastcert.run experiment=<name>`.", ""]
    for path in sorted((conf / "experiment").glob("*.yaml")):
        out += [f"## `{path.stem}`", "", *block(parse(path), conf)]
    return "\n".join(out)


def index_page(conf: Path, group_names: list[str], suite_names: list[str]) -> str:
    out = ["# Configuration reference", "",
           "Generated from `fastcert/conf/` at every docs build: every option of every config "
           "group "
           "with its keys, values and comments as the YAML files hold them. How the groups fit "
           "together: [Configuration](../../configuration.md).", "",
           "| group | options |", "|---|---|"]
    for g in group_names:
        names = [option_name(p, conf / g) for p in sorted((conf / g).glob("*.yaml"))]
        out.append(f"| [`{g}`]({g.replace('/', '_')}.md) | {', '.join(names)} |")
    out += ["", "Presets (`experiment=`), one page per family: "
            + ", ".join(f"[`{s}`](presets-{s}.md)" for s in suite_names)
            + ", [single files](presets-single.md).", ""]
    for entry, module in ENTRY_POINTS.items():
        yaml = parse(conf / f"{entry}.yaml")
        out += [f"## `{module}` (`{entry}.yaml`)", "", *describe(yaml)]
        if yaml.defaults:
            out += ["Defaults list: " + ", ".join(md_code(d) for d in yaml.defaults) + ".", ""]
        out += table(yaml, skip=())
    pages = [g.replace("/", "_") for g in group_names]
    pages += [f"presets-{s}" for s in suite_names] + ["presets-single"]
    out += ["```{toctree}", ":hidden:", "", *pages, "```", ""]
    return "\n".join(out)


def generate(conf: Path, out: Path, write) -> None:
    """Write every page of the reference through ``write(path, text)``."""
    group_names, suite_names = groups(conf), suites(conf)
    for g in group_names:
        page, blocks = group_page(conf, g)
        write(out / f"{g.replace('/', '_')}.md", page)
        for name, text in blocks.items():
            write(out / "option" / g / f"{name}.md", text + "\n")
    for s in suite_names:
        write(out / f"presets-{s}.md", presets_page(conf, s))
    write(out / "presets-single.md", loose_presets_page(conf))
    write(out / "index.md", index_page(conf, group_names, suite_names))
    for entry in ("certify", "export"):
        yaml = parse(conf / f"{entry}.yaml")
        write(out / "option" / "entry" / f"{entry}.md", "\n".join(table(yaml, skip=())))
