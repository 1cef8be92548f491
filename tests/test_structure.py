"""The size limits the codebase keeps: modules of at most 400 lines, functions of at most 60
(scripts/check_structure.py prints the offenders)."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def test_no_module_or_function_over_its_limit():
    spec = importlib.util.spec_from_file_location("check_structure",
                                                  ROOT / "scripts" / "check_structure.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.offenders() == []
