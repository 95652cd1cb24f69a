"""The session guard: run from the source tree with `python -m pytest`, the package is imported
without its compiled module, and every test must fail with a message that says so."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "specfast" / "__init__.py").exists(), reason="needs the source tree")
def test_python_m_pytest_from_root_fails_loudly():
    compiled = list((ROOT / "specfast").glob("_C*.so")) + list((ROOT / "specfast").glob("_C*.pyd"))
    if compiled:
        pytest.skip("the source tree holds a compiled _C (editable/in-place build): no shadowing to detect")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "SPECFAST_STRICT")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_native.py::test_choose_side", "tests/test_native.py::test_build_info"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "2 failed" in out, out
    assert "compiled module" in out and "python -m pytest" in out, out
