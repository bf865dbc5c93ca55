"""Functions stay short enough to read in one screen: a body over MAX_BODY_LINES lines (its
docstring and signature not counted: a typer command's options live in its signature) fails
here, so a step that grows gets a name instead (issue 9 split the ones that had grown to 65-107)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("devices", "gateway", "simulator")
MAX_BODY_LINES = 60


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if docstring and len(node.body) > 1:
        first = node.body[1]
    return (node.end_lineno or first.lineno) - first.lineno + 1


def long_functions(max_lines: int) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = body_lines(node)
                    if n > max_lines:
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        found.append(f"{where} {node.name}: {n} lines")
    return found


def test_no_function_body_is_over_the_limit() -> None:
    assert long_functions(MAX_BODY_LINES) == []


def test_the_measure_sees_long_functions() -> None:
    assert long_functions(20), "some function of the code base has a body over 20 lines"
