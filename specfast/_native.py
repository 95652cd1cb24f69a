"""Loading the native module, and the one place that decides what happens when it is missing.

A missing or broken native module is never silent: the pure-torch reference takes over with a
warning that names the reason, and ``SPECFAST_STRICT=1`` turns that warning into an error.
"""
from __future__ import annotations

import os
import warnings

try:  # pragma: no cover - exercised by the build, not by unit tests
    from . import _C  # type: ignore[attr-defined]

    NATIVE_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover
    _C = None
    NATIVE_ERROR = f"{type(exc).__name__}: {exc}"

_warned: set[str] = set()


def strict() -> bool:
    """True when ``SPECFAST_STRICT=1``: every fallback raises instead of warning."""
    return os.environ.get("SPECFAST_STRICT", "0").strip() not in ("", "0", "false", "False")


def fallback(op: str, device: str, reason: str) -> None:
    """Announce (once per op and device) that the pure-torch reference runs instead of a kernel."""
    msg = (f"specfast.{op}: no native kernel for device '{device}' ({reason}); "
           f"using the pure-torch reference implementation")
    if strict():
        raise RuntimeError(msg + " [SPECFAST_STRICT=1]")
    key = f"{op}:{device}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def has_native_cpu() -> bool:
    return _C is not None


def has_native_cuda() -> bool:
    # The CUDA kernels of the ops land with the CUDA issue; the build can already carry the
    # CUDA runtime (build_info()['cuda']), but no op kernel is registered for it yet.
    return False


def build_info() -> dict:
    """Facts about the native build: version, compiler, OpenMP, CUDA, CPU dispatch."""
    if _C is None:
        return {"native": False, "error": NATIVE_ERROR}
    info = dict(_C.build_info())
    info["native"] = True
    return info
