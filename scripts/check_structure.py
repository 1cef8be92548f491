#!/usr/bin/env python3
"""The size limits the codebase keeps (issue #27): no module in trainer/ or export/ over
400 lines and no function over 60. Prints every offender; exit 1 if there is one.

    python scripts/check_structure.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def offenders(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted([*root.glob("trainer/**/*.py"), *root.glob("export/**/*.py")]):
        text = path.read_text()
        name = path.relative_to(root)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno}: {node.name}() is {length} lines "
                                 f"(at most {MAX_FUNCTION_LINES})")
    return found


if __name__ == "__main__":
    bad = offenders()
    print("\n".join(bad) if bad else "structure: every module and function within its limit")
    sys.exit(1 if bad else 0)
