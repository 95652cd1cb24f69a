"""Shared test infrastructure: devices, tolerances, seeding, matrices with known spectra, ids.

Run the suite with plain ``pytest`` from the repository root (not ``python -m pytest``, which puts
the source tree first on sys.path and imports ``specfast`` without its compiled ``_C`` module).
There is deliberately no ``tests/__init__.py``: with one, pytest would put the repository root on
sys.path and shadow the installed package in the same way.
"""
from __future__ import annotations

import os
import random
from typing import Sequence

import numpy as np
import pytest
import torch

import specfast
from specfast import _native

# ------------------------------------------------------------------------------------ tolerances
# One table, every entry with its reason. Relative tolerances unless the name says otherwise.
TOLERANCES = {
    # Acceptance: fp32 input, default tol=1e-6 -> sigma_1 to 1e-6 relative (certified by the solver).
    "sigma1_fp32": 1e-6,
    # Acceptance: top-16 values of fp32 input to 1e-5 relative when neighbouring gaps are >= 1e-3.
    "topk_fp32": 1e-5,
    # Acceptance: bf16/fp16 input vs the float64 spectrum of the rounded matrix, 1e-5 relative.
    "lowp_vs_rounded": 1e-5,
    # float64 input at default tol: the certificate promises tol=1e-6; nothing tighter is claimed.
    "sigma_fp64": 1e-6,
    # Slack for the float64 reference (LAPACK svdvals) itself, relative to sigma_1: it is backward
    # stable, so its singular values are off by ~ few * eps64 * sqrt(dim) * sigma_1 << 1e-13 sigma_1.
    "ref_rounding": 1e-13,
    # Designed spectrum vs the float64 SVD of the fp32-rounded matrix: rounding W to fp32 perturbs
    # sigma_i by ~ eps32 * ||W||_F / sqrt(mn) (first order), well under 1e-6 * sigma_1.
    "fp32_rounding_of_W": 1e-6,
    # gram_matvec: the kernel accumulates in float64, so it matches a float64 Wᵀ(W v) to a few
    # eps64 times a modest growth factor, measured in norm relative to ||W||² ||v||.
    "gram_fp64": 1e-12,
    # Reproducibility across thread counts: the kernels use a fixed reduction order; allow float64
    # rounding only.
    "threads": 1e-12,
    # Batched vs looped: the same solver on the same data (different matrix index only changes the
    # start vector stream), so results agree to the convergence tolerance.
    "batched_vs_looped": 2e-6,
    # U and V orthonormality of svd_lowrank (returned in fp32 for fp32 input: eps32 * sqrt(n)).
    "orthonormal_fp32": 1e-5,
    "orthonormal_fp64": 1e-10,
    # Reconstruction A ≈ U diag(S) Vᵀ for an exactly rank-q matrix, relative to ||A||_2 (fp32 output).
    "reconstruct_fp32": 1e-5,
    # Gradient u1 v1ᵀ vs torch.linalg.matrix_norm's gradient (Frobenius norm of the difference;
    # ‖u1 v1ᵀ‖_F = 1), relative gap >= 0.5. A Ritz vector with eigenvalue error δ = tol·λ has an
    # angle error ~ sqrt(δ / gap), so at the default tol=1e-6 the vectors (hence the gradient) are
    # good to ~sqrt(tol) = 1e-3; at tol=1e-12 to ~1e-6 (allow 1e-5).
    "grad_default_tol": 1e-3,
    "grad_tight": 1e-5,
    # Exact metrics (float64 SVD path) vs numpy on the designed spectrum.
    "exact_metric": 1e-10,
    # condition_number via Krylov on well-conditioned matrices (cond <= 1e3): sigma_min is resolved
    # to ~ tol * sigma_1 / sigma_min relative, so cond to ~1e-3 relative at worst; ask for 1e-4.
    "cond_krylov": 1e-4,
    # SLQ entropy: within this many reported standard errors of the truth (two-sided, ~1e-4 chance
    # of a false alarm per check for a Gaussian error; the quadrature bias must be inside it too).
    "slq_stderrs": 4.0,
    # sym_eig (Householder + QL, float64) vs torch.linalg.eigh, relative to max |lambda|.
    "sym_eig": 1e-12,
    # Compiled vs eager: same kernels, same seeds, must be bit-identical up to float64 rounding.
    "compile": 1e-12,
}

# ------------------------------------------------------------------------------------ devices
STRICT = _native.strict()


def _has_cuda_kernels() -> bool:
    if hasattr(_native, "has_native_cuda"):
        return bool(_native.has_native_cuda())
    return bool(specfast.build_info().get("cuda", False))


CUDA_VISIBLE = torch.cuda.is_available()
CUDA_KERNELS = _has_cuda_kernels()

DEVICES = ["cpu"] + (["cuda"] if CUDA_VISIBLE else [])
DEVICE_PARAMS = [pytest.param("cpu", id="device=cpu")] + [
    pytest.param("cuda", id="device=cuda", marks=pytest.mark.cuda) for _ in DEVICES[1:]
]


def require_device(device: str) -> None:
    """Skip (or, with SPECFAST_STRICT=1 and a GPU but no CUDA kernels, fail) a CUDA test."""
    if device != "cuda":
        return
    if not CUDA_VISIBLE:
        pytest.skip("no CUDA GPU visible")
    if not CUDA_KERNELS:
        msg = "a CUDA GPU is visible but specfast has no CUDA kernels (specfast._native.has_native_cuda())"
        if STRICT:
            pytest.fail(msg + " [SPECFAST_STRICT=1]")
        pytest.skip(msg)


@pytest.fixture(params=DEVICE_PARAMS)
def device(request):
    require_device(request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    # Default `pytest` stays fast: tests marked slow run only when a -m expression names them
    # (`pytest -m slow`, `pytest -m "slow or not slow"`).
    if "slow" not in (config.getoption("markexpr", "") or ""):
        keep = [it for it in items if it.get_closest_marker("slow") is None]
        if len(keep) != len(items):
            config.hook.pytest_deselected(items=[it for it in items if it.get_closest_marker("slow") is not None])
            items[:] = keep
    # Tests marked cuda skip without a GPU; with SPECFAST_STRICT=1, a GPU and no kernels they fail
    # (the require_device check runs at setup in the autouse fixture below).
    if CUDA_VISIBLE:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------ guard & seed
_NATIVE = specfast.build_info().get("native", False)
_NATIVE_MSG = (
    "specfast's compiled module (specfast._C) was not imported: "
    f"{specfast.build_info().get('error')!s}; specfast was imported from {os.path.dirname(specfast.__file__)}. "
    "This is probably `python -m pytest` run from the repository root, which puts the source tree "
    "(without the compiled module) ahead of the installed package on sys.path. Install with "
    "`pip install --no-build-isolation .` and run plain `pytest`."
)


def pytest_report_header(config):
    info = specfast.build_info()
    head = f"specfast {specfast.__version__} from {os.path.dirname(specfast.__file__)}; native={info.get('native')}"
    if not _NATIVE:
        return [head, "ERROR: " + _NATIVE_MSG]
    return [head + f", openmp={info.get('openmp')}, cuda build={info.get('cuda')}, cuda visible={CUDA_VISIBLE}, "
                   f"cuda kernels={CUDA_KERNELS}, strict={STRICT}"]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Fail every test when the native module is missing (the reference fallback would otherwise
    make the suite test the oracle against itself). Runs in the call phase, so each test is
    reported as FAILED with the reason."""
    if not _NATIVE:
        pytest.fail(_NATIVE_MSG, pytrace=False)
    return None


@pytest.fixture(autouse=True)
def _cuda_guard(request):
    if request.node.get_closest_marker("cuda") is not None:
        require_device("cuda")
    yield


@pytest.fixture(autouse=True)
def seed_torch():
    """Seed torch, numpy and random before every test; the seed is returned for reuse."""
    seed = 20240531
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    return seed


# ------------------------------------------------------------------------------------ ids
DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
LOWP = (torch.float16, torch.bfloat16)


def shape_id(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def case_id(**kw) -> str:
    """``case_id(dtype=torch.bfloat16, shape=(41, 401, 1271))`` -> ``dtype=bf16-shape=41x401x1271``."""
    parts = []
    for key, val in kw.items():
        if isinstance(val, torch.dtype):
            val = DTYPE_NAMES.get(val, str(val).replace("torch.", ""))
        elif isinstance(val, (tuple, list)) and all(isinstance(d, int) for d in val):
            val = shape_id(val)
        parts.append(f"{key}={val}")
    return "-".join(parts)


def params(argnames: str, rows, **extra):
    """pytest.param list with readable ids built from the argument names and values."""
    names = [a.strip() for a in argnames.split(",")]
    out = []
    for row in rows:
        row = row if isinstance(row, tuple) else (row,)
        out.append(pytest.param(*row, id=case_id(**dict(zip(names, row)))))
    return out


# ------------------------------------------------------------------------------------ matrices
def random_orthonormal(rows: int, cols: int, generator: torch.Generator, batch=()) -> torch.Tensor:
    """[*batch, rows, cols] with orthonormal columns: Q of a float64 Gaussian (sign-fixed)."""
    G = torch.randn((*batch, rows, cols), generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    d = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Q * d.unsqueeze(-2)


def known_spectrum(m: int, n: int, s, dtype=torch.float32, batch=(), seed: int = 0, device="cpu"):
    """W = U diag(s) Vᵀ with random orthonormal U [m, p], V [n, p] (p = min(m, n)).

    ``s``: a sequence or tensor of up to p non-negative values (missing ones are 0), or a tensor
    [*batch, len] for per-matrix spectra. Returns ``(W, s_true)`` with W of ``dtype`` (built in
    float64, then rounded once) and ``s_true`` float64 [*batch, p] sorted descending: the exact
    spectrum of the float64 matrix (rounding to ``dtype`` perturbs it; see ``rounded_truth``).
    """
    batch = tuple(batch)
    p = min(m, n)
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    if s.ndim == 0:
        s = s.reshape(1)
    s = s.expand(*batch, s.shape[-1]) if s.ndim == 1 else s
    assert s.shape[-1] <= p, "more singular values than min(m, n)"
    full = torch.zeros((*batch, p), dtype=torch.float64)
    full[..., : s.shape[-1]] = s
    s_true = torch.sort(full, dim=-1, descending=True).values
    if p == 0:
        return torch.zeros((*batch, m, n), dtype=dtype, device=device), s_true
    U = random_orthonormal(m, p, g, batch)
    V = random_orthonormal(n, p, g, batch)
    W64 = (U * full.unsqueeze(-2)) @ V.mT
    return W64.to(dtype).to(device), s_true


@pytest.fixture(name="known_spectrum")
def _known_spectrum_fixture():
    return known_spectrum


def rounded_truth(W: torch.Tensor) -> torch.Tensor:
    """Singular values of W exactly as stored (W.to(float64)), from LAPACK in float64."""
    return torch.linalg.svdvals(W.detach().cpu().to(torch.float64))


def geometric_spectrum(p: int, top: float = 1.0, ratio: float = 0.97, floor: float = 0.0):
    """Descending spectrum with relative gaps 1 - ratio between neighbours."""
    return torch.tensor([max(top * ratio**i, floor) for i in range(p)], dtype=torch.float64)


def rel_err(a, b, scale=None) -> float:
    a = torch.as_tensor(a, dtype=torch.float64).detach().cpu()
    b = torch.as_tensor(b, dtype=torch.float64).detach().cpu()
    sc = b.abs() if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    err = (a - b).abs() / sc.clamp_min(1e-300)
    err = torch.where((a - b).abs() == 0, torch.zeros_like(err), err)
    return float(err.max()) if err.numel() else 0.0
