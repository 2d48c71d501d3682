"""Size rules of the library (ARCHITECTURE.md, "Size rules"): files and functions stay small.

Only code lines count: docstrings, comments and blank lines are left out, so documentation
costs nothing.  The limits: 500 code lines per module, 60 per function.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wasserstein_neurons"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str) -> set[int]:
    """Line numbers holding code (not a docstring, a comment or a blank line)."""
    doc = _docstring_lines(ast.parse(source))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in _SKIP or tok.type == tokenize.ENDMARKER:
            continue
        lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in doc)
    return lines


def test_code_lines_counts_code_only():
    src = 'def f(x):\n    """Doc\n    more."""\n\n    # note\n    return (x +\n            1)\n'
    assert code_lines(src) == {1, 6, 7}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_function_sizes(path: Path):
    source = path.read_text()
    lines = code_lines(source)
    assert len(lines) <= MAX_FILE_LINES, f"{path.name}: {len(lines)} code lines"
    long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = sum(1 for line in lines if node.lineno <= line <= node.end_lineno)
            if n > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({n})")
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} code lines: {long}"
