"""The length cap of ``make lint``: no function or method longer than :data:`MAX_LINES` lines
(decorators and docstring included) in fastcert/, experiments/, tests/ or hydra_plugins/. ruff
(the rest of ``make lint``, configured in pyproject.toml) caps complexity and statements but has
no line count."""
from __future__ import annotations

import ast

import pytest

from conftest import ROOT

MAX_LINES = 80
FOLDERS = ("fastcert", "experiments", "tests", "hydra_plugins")


def function_lengths(path) -> list[tuple[str, int, int]]:
    """(name, first line, lines) of every function and method defined in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out.append((node.name, first, node.end_lineno - first + 1))
    return out


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_function_is_longer_than_the_cap(folder):
    long = [f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)"
            for path in sorted((ROOT / folder).rglob("*.py"))
            for name, line, n in function_lengths(path) if n > MAX_LINES]
    assert not long, (f"split these into named steps (at most {MAX_LINES} lines each):\n"
                      + "\n".join(long))


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"@staticmethod\ndef f():\n{body}\n")
    assert function_lengths(path) == [("f", 1, MAX_LINES + 2)]
