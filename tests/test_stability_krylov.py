"""specfast.stability.krylov: eigsh (thick-restart Lanczos), hutchpp (Hutch++) and slq (stochastic
Lanczos quadrature) against float64 references on matrices with KNOWN spectra.

Every operator is built as A = Q diag(λ) Qᵀ (Q from the QR of a seeded float64 Gaussian) and applied
densely; the reference is ``torch.linalg.eigvalsh`` of the operator exactly as it is applied (A rounded
to the solver's dtype, then widened to float64).

Tolerances come from the solver's own certificate, not from guesses:

* a unit Ritz vector y with residual r = ‖A y − θ y‖ has an eigenvalue within r of θ (symmetric A),
  and within r²/gap when the other eigenvalues are at least `gap` away from θ;
* on top of that we allow ``SLACK·eps(dtype)·‖A‖·√n`` for the floating-point rounding of the basis,
  of the products and of our own float64 re-measurement (length-n sums): measured up to ~0.3·eps·‖A‖·√n
  at n = 150, so SLACK = 4 leaves room without hiding a real error (a wrong eigenvalue is off by a
  gap, i.e. orders of magnitude more).

eigsh's default ``verify=True`` deflation rounds (which find further copies of a repeated eigenvalue)
are exercised by the default calls; ``verify=False`` is used only where the test is about the plain
Lanczos run (the product count of a batch member that converges late).

Statistical estimators (hutchpp, slq) are checked against their own reported standard errors
(``STDERRS`` of them, as in conftest's ``slq_stderrs``) with fixed seeds, so the tests are
deterministic.

Cases that found bugs of krylov.py while this file was written (all fixed) stay as regression tests.
"""
from __future__ import annotations

import math

import pytest
import torch

from specfast.stability.krylov import EigResult, eigsh, hutchpp, slq

SLACK = 4.0           # multiples of eps(dtype)·‖A‖·√n allowed for rounding (see module docstring)
STDERRS = 4.0         # two-sided, ~1e-4 false-alarm chance for a Gaussian error (conftest: slq_stderrs)
# Hutch++'s stderr comes from s = 10 Hutchinson samples, so (value − tr)/stderr is Student-t with 9
# degrees of freedom: the same 1e-4 two-sided level is t_9 quantile 0.99995 = 6.59 (scipy.stats.t.ppf).
T9_STDERRS = 6.59
DTYPES = [pytest.param(torch.float64, id="dtype=fp64"), pytest.param(torch.float32, id="dtype=fp32")]
# Tolerances the solver can reach in each dtype (relative residual, see eigsh's docstring).
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


# ---------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every problem here is tiny (n <= 300, or elementwise): one intra-op thread is fastest and keeps
    the file's runtime stable when other processes load the machine (OpenMP threads spinning on a
    busy core made single products take milliseconds)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(n: int, seed: int, batch=()) -> torch.Tensor:
    G = torch.randn((*batch, n, n), generator=gen(1000 + seed), dtype=torch.float64)
    return torch.linalg.qr(G).Q


def with_spectrum(lam, seed: int = 0) -> torch.Tensor:
    """Symmetric float64 Q diag(lam) Qᵀ; lam [n] or [B, n] (then [B, n, n])."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    Q = orthogonal(lam.shape[-1], seed, lam.shape[:-1])
    A = (Q * lam.unsqueeze(-2)) @ Q.mT
    return (A + A.mT) / 2


class Op:
    """Dense symmetric operator as a batched mat-vec [B, n] -> [B, n], counting its calls and the
    largest storage its inputs live in (the solver's basis, when it hands us views of it)."""

    def __init__(self, A: torch.Tensor, dtype: torch.dtype):
        self.A = A.to(dtype)
        self.calls = 0
        self.max_input_storage = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.max_input_storage = max(self.max_input_storage, x.untyped_storage().nbytes())
        if self.A.dim() == 2:
            return x @ self.A.mT
        return torch.einsum("bij,bj->bi", self.A, x)

    def reference(self) -> torch.Tensor:
        """Ascending float64 eigenvalues of the operator as applied."""
        return torch.linalg.eigvalsh(self.A.to(torch.float64))

    def norm(self) -> float:
        return float(self.reference().abs().max())


def expected(ref: torch.Tensor, which: str, k: int) -> torch.Tensor:
    """The k eigenvalues eigsh should return, in its order (ref ascending, [..., n])."""
    if which == "LA":
        return ref.flip(-1)[..., :k]
    if which == "SA":
        return ref[..., :k]
    idx = ref.abs().argsort(dim=-1, descending=True)[..., :k]
    return ref.gather(-1, idx)


def slack(dtype: torch.dtype, norm: float, n: int) -> float:
    return SLACK * torch.finfo(dtype).eps * max(norm, 1e-300) * math.sqrt(n)


def assert_certified(res: EigResult, ref: torch.Tensor, which: str, dtype: torch.dtype, *, gap_bound=True):
    """values vs the reference within the residual certificate (and the gap bound r²/gap).

    ref: [B, n] ascending (or [n] for B = 1)."""
    ref = ref.reshape(res.values.shape[0], -1)
    k = res.values.shape[1]
    want = expected(ref, which, k)
    assert res.values.dtype == torch.float64 and res.residuals.shape == res.values.shape
    assert torch.isfinite(res.values).all() and torch.isfinite(res.residuals).all()
    assert (res.residuals >= 0).all()
    for b in range(ref.shape[0]):
        s = slack(dtype, float(ref[b].abs().max()), ref.shape[-1])
        th, r, w = res.values[b], res.residuals[b], want[b]
        err = (th - w).abs()
        assert (err <= r + s).all(), \
            f"row {b}: |θ-λ|={err.tolist()} > residual {r.tolist()} (+{s:.1e}); θ={th.tolist()} λ={w.tolist()}"
        if gap_bound:
            # distance from θ to the nearest OTHER eigenvalue (the matched one excluded by value)
            others = (ref[b][None, :] - th[:, None]).abs()
            others = torch.where((ref[b][None, :] - w[:, None]).abs() <= s, torch.full_like(others, math.inf), others)
            gap = others.min(1).values
            bound = r**2 / gap + s
            assert (err <= bound).all(), f"row {b}: |θ-λ|={err.tolist()} > r²/gap={bound.tolist()}"


def assert_order(values: torch.Tensor, which: str):
    v = values if which != "LM" else values.abs()
    if which == "SA":
        assert (v[:, 1:] >= v[:, :-1]).all(), v
    else:
        assert (v[:, 1:] <= v[:, :-1]).all(), v


def assert_orthonormal(V: torch.Tensor, dtype: torch.dtype):
    """V [B, k, n]."""
    Vd = V.to(torch.float64)
    eye = torch.eye(V.shape[1], dtype=torch.float64)
    err = float((Vd @ Vd.mT - eye).abs().max())
    assert err <= 100 * torch.finfo(dtype).eps * math.sqrt(V.shape[2]), err


def assert_vectors_certify(res: EigResult, op: Op, dtype: torch.dtype):
    """Returned vectors orthonormal and ‖A v − θ v‖ (measured in float64) <= reported residual + slack."""
    assert res.vectors is not None
    assert torch.isfinite(res.vectors).all()
    assert_orthonormal(res.vectors, dtype)
    A = op.A.to(torch.float64)
    n = A.shape[-1]
    for b in range(res.values.shape[0]):
        V = res.vectors[b].to(torch.float64)
        Ab = A if A.dim() == 2 else A[b]
        measured = (V @ Ab - res.values[b][:, None] * V).norm(dim=1)
        s = slack(dtype, float(torch.linalg.eigvalsh(Ab).abs().max()), n)
        assert (measured <= res.residuals[b] + s).all(), (b, measured, res.residuals[b])


# Spectrum with distinct, well-separated extremes on both sides and an indefinite bulk: the largest
# magnitudes alternate in sign (|-2.8| between 3.0 and 2.5) so LM differs from LA and SA.
N_MAIN = 150


def main_spectrum() -> torch.Tensor:
    bulk = torch.linspace(-1.5, 1.5, N_MAIN - 6, dtype=torch.float64)
    return torch.cat([torch.tensor([3.0, 2.5, 2.2, -2.8, -2.4, -2.0], dtype=torch.float64), bulk])


# ---------------------------------------------------------------------------------------- 1. eigsh accuracy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_known_spectrum(which, dtype):
    op = Op(with_spectrum(main_spectrum(), seed=1), dtype)
    tol = TOL[dtype]
    res = eigsh(op, N_MAIN, 3, which=which, tol=tol, dtype=dtype, generator=gen(0))
    assert res.values.shape == res.residuals.shape == res.converged.shape == (1, 3)
    assert res.converged.all(), res
    assert_order(res.values, which)
    assert_certified(res, op.reference(), which, dtype)
    # converged means a small residual relative to the spectrum's scale (true |λ|max >= any Ritz value;
    # factor 2 here, the exact documented criterion is test_eigsh_converged_means_documented_tolerance)
    assert (res.residuals <= 2 * tol * op.norm()).all()
    # the values are what the docstring says they are, to an absolute level that rules out a wrong
    # eigenvalue (the closest neighbours are >= 0.3 apart)
    want = {"LA": [3.0, 2.5, 2.2], "SA": [-2.8, -2.4, -2.0], "LM": [3.0, -2.8, 2.5]}[which]
    assert torch.allclose(res.values[0], torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_vectors_orthonormal_and_eigen(dtype):
    """return_vectors: orthonormal Ritz vectors whose measured residual ‖A v − θ v‖ matches the
    reported residual (that is what certifies the values)."""
    op = Op(with_spectrum(main_spectrum(), seed=2), dtype)
    for which in ("LA", "SA", "LM"):
        res = eigsh(op, N_MAIN, 4, which=which, tol=TOL[dtype], dtype=dtype, generator=gen(3), return_vectors=True)
        assert res.vectors is not None and res.vectors.shape == (1, 4, N_MAIN)
        assert res.vectors.dtype == dtype
        assert_vectors_certify(res, op, dtype)
        # and the vectors are eigenvectors: A v ≈ θ v relative to ‖A‖
        V = res.vectors[0].to(torch.float64)
        measured = (V @ op.A.to(torch.float64) - res.values[0][:, None] * V).norm(dim=1)
        assert float(measured.max()) <= 2 * TOL[dtype] * op.norm() + slack(dtype, op.norm(), N_MAIN)
    res = eigsh(op, N_MAIN, 2, dtype=dtype, generator=gen(3))
    assert res.vectors is None


# ---------------------------------------------------------------------------------------- 2. hard cases
@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_repeated_top_eigenvalue(dtype):
    """Top eigenvalue of multiplicity 3 well above the bulk: k=3 returns all three copies (plain
    single-vector Lanczos sees one copy per start vector; eigsh's default verify=True deflation rounds
    must find the others). The vectors of merged pairs: test_eigsh_merged_pairs_residuals_certify."""
    n = 120
    lam = torch.cat([torch.full((3,), 2.0, dtype=torch.float64), torch.linspace(0, 1, n - 3, dtype=torch.float64)])
    for seed in range(6):
        op = Op(with_spectrum(lam, seed=seed), dtype)
        res = eigsh(op, n, 3, dtype=dtype, tol=1e-4, generator=gen(seed))
        assert res.converged.all() and res.verified
        assert res.matvecs == op.calls
        assert_certified(res, op.reference(), "LA", dtype, gap_bound=False)
        assert torch.allclose(res.values[0], torch.full((3,), 2.0, dtype=torch.float64), atol=1e-3, rtol=0), (seed, res.values)


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float64, id="dtype=fp64"),
    pytest.param(torch.float32, id="dtype=fp32"),
])
def test_eigsh_merged_pairs_residuals_certify(dtype):
    """Every returned pair, including those merged in by the verify rounds, has orthonormal vectors and
    a reported residual that is (up to rounding) the measured ‖A y − θ y‖."""
    n = 120
    lam = torch.cat([torch.full((3,), 2.0, dtype=torch.float64), torch.linspace(0, 1, n - 3, dtype=torch.float64)])
    for seed in range(6):
        op = Op(with_spectrum(lam, seed=seed), dtype)
        res = eigsh(op, n, 3, dtype=dtype, tol=1e-4, generator=gen(seed), return_vectors=True)
        assert res.verified
        assert_vectors_certify(res, op, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_clustered_top(dtype):
    """Top pair 1 and 1 − 1e-6 (relative gap 1e-6), then a gap to 0.5: both members of the pair are
    returned, in order, each within its residual certificate."""
    n = 120
    lam = torch.cat([torch.tensor([1.0, 1.0 - 1e-6], dtype=torch.float64), torch.linspace(0, 0.5, n - 2, dtype=torch.float64)])
    op = Op(with_spectrum(lam, seed=2), dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    res = eigsh(op, n, 2, dtype=dtype, tol=tol, generator=gen(0))
    assert res.converged.all()
    assert_order(res.values, "LA")
    assert_certified(res, op.reference(), "LA", dtype, gap_bound=dtype == torch.float64)
    if dtype == torch.float64:   # resolved far below the 1e-6 splitting
        assert float((res.values[0] - torch.tensor([1.0, 1.0 - 1e-6], dtype=torch.float64)).abs().max()) <= 1e-11
    else:                        # fp32 can only certify to ~eps32; still both near 1, not 0.5
        assert float((res.values[0] - 1.0).abs().max()) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_rank_deficient_smallest_is_zero(dtype):
    """PSD of rank 50 in n=120 (70 zeros): SA k=1 finds 0 (to the operator's rounding), LA is unaffected."""
    n = 120
    lam = torch.cat([torch.zeros(70, dtype=torch.float64), torch.linspace(1, 2, n - 70, dtype=torch.float64)])
    op = Op(with_spectrum(lam, seed=3), dtype)
    res = eigsh(op, n, 1, which="SA", dtype=dtype, tol=1e-4, generator=gen(0))
    assert res.converged.all()
    assert_certified(res, op.reference(), "SA", dtype, gap_bound=False)
    assert abs(float(res.values[0, 0])) <= 1e-4 * 2 + slack(dtype, 2.0, n)
    res = eigsh(op, n, 2, which="LA", dtype=dtype, tol=TOL[dtype], generator=gen(0))
    assert res.converged.all()
    assert_certified(res, op.reference(), "LA", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_rank_deficient_many_zeros(dtype):
    """70-fold zero eigenvalue below [1, 2]: SA k=3 returns three zeros (values only; the vectors are
    the subject of test_eigsh_null_space_vectors below)."""
    n = 120
    lam = torch.cat([torch.zeros(70, dtype=torch.float64), torch.linspace(1, 2, n - 70, dtype=torch.float64)])
    for seed in range(6):
        op = Op(with_spectrum(lam, seed=seed), dtype)
        res = eigsh(op, n, 3, which="SA", dtype=dtype, tol=1e-4, generator=gen(seed))
        assert res.converged.all()
        assert_certified(res, op.reference(), "SA", dtype, gap_bound=False)
        assert float(res.values.abs().max()) <= 1e-3, (seed, res.values)
    # fewer zeros than k: exactly as many zeros as there are, then the next eigenvalues
    lam = torch.cat([torch.zeros(3, dtype=torch.float64), torch.linspace(1, 2, n - 3, dtype=torch.float64)])
    op = Op(with_spectrum(lam, seed=9), dtype)
    res = eigsh(op, n, 5, which="SA", dtype=dtype, tol=TOL[dtype], generator=gen(0), return_vectors=True)
    assert res.converged.all()
    assert_certified(res, op.reference(), "SA", dtype, gap_bound=False)
    assert torch.allclose(res.values[0], expected(op.reference(), "SA", 5), atol=1e-4, rtol=0), res.values
    assert_vectors_certify(res, op, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_null_space_vectors(dtype):
    n = 120
    lam = torch.cat([torch.zeros(70, dtype=torch.float64), torch.linspace(1, 2, n - 70, dtype=torch.float64)])
    for seed in range(6):
        op = Op(with_spectrum(lam, seed=seed), dtype)
        res = eigsh(op, n, 4, which="SA", dtype=dtype, tol=TOL[dtype], generator=gen(seed), return_vectors=True)
        assert float(res.values.abs().max()) <= 1e-6
        assert_vectors_certify(res, op, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_zero_operator(which, dtype):
    for n, k in ((1, 1), (8, 3), (8, 8), (40, 3)):
        res = eigsh(lambda x: torch.zeros_like(x), n, k, which=which, dtype=dtype, generator=gen(0),
                    return_vectors=True)
        # (exact zeros, up to a denormal: the verify round's shift is ±1e-300 here)
        assert float(res.values.abs().max()) <= 1e-290, (n, k, res.values)
        assert torch.isfinite(res.residuals).all() and (res.residuals == 0).all()
        assert res.converged.all()
        assert torch.isfinite(res.vectors).all()
        assert_orthonormal(res.vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_n_equals_one(dtype):
    for which in ("LA", "SA", "LM"):
        op = Op(torch.tensor([[-2.5]], dtype=torch.float64), dtype)
        res = eigsh(op, 1, 1, which=which, dtype=dtype, generator=gen(0), return_vectors=True)
        assert res.values.tolist() == [[-2.5]]
        assert res.converged.all() and float(res.residuals) == 0.0
        assert res.matvecs == op.calls == 1
        assert res.basis_size == 1
        assert abs(float(res.vectors.abs().squeeze())) == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_k_equals_n(dtype):
    """k = n: the whole spectrum, in either order, after at most n products."""
    n = 10
    lam = torch.linspace(-3, 5, n, dtype=torch.float64)
    op = Op(with_spectrum(lam, seed=4), dtype)
    for which in ("LA", "SA"):
        op.calls = 0
        res = eigsh(op, n, n, which=which, dtype=dtype, generator=gen(0))
        assert res.values.shape == (1, n) and res.converged.all()
        assert res.basis_size == n and res.matvecs == op.calls <= n
        assert_order(res.values, which)
        assert_certified(res, op.reference(), which, dtype, gap_bound=False)
        assert float((res.values[0] - expected(op.reference(), which, n)).abs().max()) <= slack(dtype, 5.0, n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_indefinite_hessian_smallest(dtype):
    """Hessian-like spectrum: a few negative eigenvalues below a positive bulk. SA returns the most
    negative ones, ascending; LM the largest magnitudes whatever their sign."""
    n = 200
    lam = torch.cat([torch.tensor([-0.5, -0.2, -0.1, 8.0, -6.0], dtype=torch.float64),
                     torch.linspace(0.05, 4.0, n - 5, dtype=torch.float64)])
    op = Op(with_spectrum(lam, seed=5), dtype)
    res = eigsh(op, n, 3, which="SA", dtype=dtype, tol=TOL[dtype], max_matvecs=600, generator=gen(0))
    assert res.converged.all()
    assert_order(res.values, "SA")
    assert_certified(res, op.reference(), "SA", dtype)
    assert torch.allclose(res.values[0], torch.tensor([-6.0, -0.5, -0.2], dtype=torch.float64), atol=1e-4, rtol=0)
    res = eigsh(op, n, 2, which="LM", dtype=dtype, tol=TOL[dtype], generator=gen(0))
    assert res.converged.all()
    assert_certified(res, op.reference(), "LM", dtype)
    assert torch.allclose(res.values[0], torch.tensor([8.0, -6.0], dtype=torch.float64), atol=1e-4, rtol=0)


def _batch_spectra(n: int) -> torch.Tensor:
    return torch.stack([
        torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.linspace(0, 1, n - 3)]),              # PSD, big gaps
        torch.cat([torch.tensor([1.0, 0.9, 0.8]), torch.linspace(-0.5, 0.5, n - 3)]),          # indefinite
        torch.cat([torch.tensor([-3.0, 2.0, 1.5]), torch.linspace(-1, 1, n - 3)]),             # top < |bottom|
    ]).to(torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_batch_of_different_operators(which, dtype):
    """B=3 operators with different spectra in one call: each row matches ITS OWN reference (a mix-up
    of rows, or a row solved with another row's operator, fails the certificate check)."""
    n = 80
    lam = _batch_spectra(n)
    op = Op(with_spectrum(lam, seed=6), dtype)
    res = eigsh(op, n, 3, batch=3, which=which, dtype=dtype, tol=TOL[dtype], max_matvecs=600, generator=gen(0))
    assert res.values.shape == (3, 3)
    assert res.converged.all()
    assert res.matvecs == op.calls
    assert_order(res.values, which)
    assert_certified(res, op.reference(), which, dtype)
    # the rows really are different problems
    assert not torch.allclose(res.values[0], res.values[1], atol=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_batch_member_converging_late(dtype):
    """One member with a slow top pair (gap 1e-3 relative) next to members that converge at once,
    including a rank-2 operator and the zero operator (both break down and keep breaking down while
    the slow one iterates): every member stays right, finite and converged."""
    n = 100
    lam = torch.stack([
        torch.cat([torch.tensor([10.0, 5.0]), torch.linspace(0, 1, n - 2)]),
        torch.cat([torch.tensor([1.0, 0.999]), torch.linspace(0, 0.99, n - 2)]),
        torch.cat([torch.tensor([3.0, 2.0]), torch.zeros(n - 2)]),
        torch.zeros(n),
    ]).to(torch.float64)
    op = Op(with_spectrum(lam, seed=7), dtype)
    tol = TOL[dtype]
    res = eigsh(op, n, 2, batch=4, dtype=dtype, tol=tol, max_matvecs=2000, generator=gen(1), return_vectors=True)
    assert res.converged.all(), res.converged
    assert torch.isfinite(res.vectors).all()
    assert_certified(res, op.reference(), "LA", dtype)
    assert float(res.values[3].abs().max()) <= 1e-290          # the zero operator (up to a denormal)
    for b in range(4):
        assert_orthonormal(res.vectors[b:b + 1], dtype)
    assert res.matvecs == op.calls
    # without the verify rounds: the easy member alone is done after one basis, in the batch it rides
    # along for several times as many products (and stays right)
    easy = Op(with_spectrum(lam, seed=7)[0], dtype)
    alone = eigsh(easy, n, 2, dtype=dtype, tol=tol, generator=gen(1), verify=False)
    together = eigsh(op, n, 2, batch=4, dtype=dtype, tol=tol, max_matvecs=2000, generator=gen(1), verify=False)
    assert alone.converged.all() and together.converged.all()
    assert together.matvecs >= 2 * alone.matvecs, (together.matvecs, alone.matvecs)
    assert together.restarts >= 1
    assert_certified(together, op.reference(), "LA", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigsh_stops_inside_the_first_basis(which, dtype):
    """A well-separated end (λ₁ = 10 against a bulk in [-1, 1]) converges in a handful of steps: the
    solver notices before filling its basis (Ritz residuals are checked every step) and the early
    answer still carries a valid certificate."""
    n = 300
    lam = torch.cat([torch.tensor([10.0, -10.0]), torch.linspace(-1, 1, n - 2)]).to(torch.float64)
    op = Op(with_spectrum(lam, seed=21), dtype)
    res = eigsh(op, n, 1, which=which, dtype=dtype, tol=1e-3, basis_size=40, generator=gen(2),
                verify=False, return_vectors=True)
    assert res.converged.all()
    assert res.matvecs < 40, res.matvecs            # a full basis would be 40 products
    assert res.matvecs == op.calls and res.restarts == 0 and res.basis_size == 40
    assert_certified(res, op.reference(), which, dtype)
    assert_vectors_certify(res, op, dtype)
    # a tighter tolerance needs more steps from the same start, never fewer
    tight = eigsh(Op(op.A, dtype), n, 1, which=which, dtype=dtype, tol=TOL[dtype], basis_size=40, generator=gen(2),
                  verify=False)
    assert tight.matvecs >= res.matvecs and tight.converged.all()
    assert_certified(tight, op.reference(), which, dtype)


# ---------------------------------------------------------------------------------------- 3. budget honesty
def _hard_problem(n=200):
    # top five within 1e-5 of each other: far from resolvable with 40 products at tol 1e-10
    lam = torch.cat([1.0 - 1e-6 * torch.arange(5, dtype=torch.float64), torch.linspace(-1, 0.99, n - 5, dtype=torch.float64)])
    return with_spectrum(lam, seed=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigsh_budget_exhausted(which, dtype):
    n = 200
    op = Op(_hard_problem(n) if which == "LA" else -_hard_problem(n), dtype)
    budget = 40                                   # >= the default basis (16)
    res = eigsh(op, n, 3, which=which, tol=1e-10 if dtype == torch.float64 else 1e-6, max_matvecs=budget,
                dtype=dtype, generator=gen(0))
    assert not res.converged.all(), res
    assert not res.verified
    assert res.matvecs == op.calls, (res.matvecs, op.calls)
    assert res.matvecs <= budget
    ref = op.reference()
    s = slack(dtype, op.norm(), n)
    # Ritz values are interlaced: inside [λmin, λmax], and θ_i <= λ_i (LA) / θ_i >= λ_(i) (SA)
    assert (res.values >= ref[0] - s).all() and (res.values <= ref[-1] + s).all()
    want = expected(ref, which, 3)
    if which == "LA":
        assert (res.values[0] <= want + s).all()
    else:
        assert (res.values[0] >= want - s).all()
    # unconverged values are still certified: an eigenvalue lies within the residual of each
    dist = (ref[None, :] - res.values[0][:, None]).abs().min(1).values
    assert (dist <= res.residuals[0] + s).all()
    assert_order(res.values, which)


def test_eigsh_budget_smaller_than_basis():
    n = 100
    op = Op(with_spectrum(torch.linspace(0, 1, n, dtype=torch.float64), seed=9), torch.float64)
    res = eigsh(op, n, 1, max_matvecs=5, dtype=torch.float64, generator=gen(0))
    assert res.matvecs == op.calls
    assert res.matvecs <= 5, res.matvecs


@pytest.mark.parametrize("batch", [1, 3])
def test_eigsh_matvecs_counts_calls(batch):
    """matvecs is the number of calls (each on the whole batch), whether or not it converged early."""
    n = 90
    lam = torch.linspace(0, 1, n, dtype=torch.float64).expand(batch, n) ** torch.arange(1, batch + 1)[:, None]
    op = Op(with_spectrum(lam, seed=10), torch.float64)
    for tol, budget in ((1e-3, 300), (1e-12, 120)):
        op.calls = 0
        res = eigsh(op, n, 2, batch=batch, tol=tol, max_matvecs=budget, dtype=torch.float64, generator=gen(0))
        assert res.matvecs == op.calls and res.matvecs <= budget
        assert res.restarts >= 0


def test_eigsh_converged_means_documented_tolerance():
    """converged ⇒ residual <= tol·max|θ| <= tol·‖A‖ (every Ritz value lies inside the spectrum)."""
    n, tol = 80, 1e-3
    worst = 0.0
    for seed in range(4):
        lam = torch.rand(n, generator=gen(seed), dtype=torch.float64) ** 3
        op = Op(with_spectrum(lam, seed=seed), torch.float64)
        for which in ("LA", "SA"):
            for k in (1, 3):
                res = eigsh(op, n, k, which=which, tol=tol, dtype=torch.float64, generator=gen(seed))
                ratio = res.residuals / (tol * op.norm())
                worst = max(worst, float(ratio[res.converged].max()) if res.converged.any() else 0.0)
    assert worst <= 1.0 + 1e-9, f"a pair was flagged converged at residual {worst:.3f}·tol·‖A‖"


def test_eigsh_verified_flag():
    """verified: True when the deflation check ran and found nothing more (or the basis is the whole
    space), False when it was switched off, when the budget left no room for it, or when unconverged."""
    n = 60
    lam = torch.cat([torch.tensor([3.0, 2.5], dtype=torch.float64), torch.linspace(0, 1, n - 2, dtype=torch.float64)])
    op = Op(with_spectrum(lam, seed=25), torch.float64)
    on = eigsh(op, n, 2, dtype=torch.float64, tol=1e-8, generator=gen(0))
    off = eigsh(op, n, 2, dtype=torch.float64, tol=1e-8, generator=gen(0), verify=False)
    assert on.converged.all() and off.converged.all()
    assert on.verified is True and off.verified is False
    assert on.matvecs > off.matvecs                      # the check costs products, and they are counted
    assert_certified(on, op.reference(), "LA", torch.float64)
    assert_certified(off, op.reference(), "LA", torch.float64)
    tight = eigsh(op, n, 2, dtype=torch.float64, tol=1e-8, generator=gen(0), max_matvecs=off.matvecs)
    assert tight.converged.all() and tight.verified is False and tight.matvecs <= off.matvecs
    small = Op(with_spectrum(torch.linspace(-1, 1, 10, dtype=torch.float64), seed=26), torch.float64)
    assert eigsh(small, 10, 2, dtype=torch.float64, generator=gen(0)).verified is True   # basis = whole space


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_relative_to_value(dtype):
    """relative_to="value": each residual <= tol·|θ|, so a small λ_min of a PSD operator comes out to
    relative accuracy tol (relative_to="spectrum" only promises tol·max|θ|)."""
    n = 100
    lam_min = 1e-3
    lam = torch.cat([torch.tensor([lam_min], dtype=torch.float64), torch.linspace(0.5, 1.0, n - 1, dtype=torch.float64)])
    op = Op(with_spectrum(lam, seed=27), dtype)
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    res = eigsh(op, n, 1, which="SA", dtype=dtype, tol=tol, relative_to="value", max_matvecs=1000, generator=gen(0))
    assert res.converged.all()
    assert (res.residuals <= tol * res.values.abs() * (1 + 1e-12)).all()
    assert_certified(res, op.reference(), "SA", dtype)
    ref = float(op.reference()[0])
    assert abs(float(res.values[0, 0]) - ref) <= tol * ref + slack(dtype, 1.0, n)


# ---------------------------------------------------------------------------------------- 4. memory
def test_eigsh_basis_size_default_and_cap():
    def run(n, k, **kw):
        op = Op(torch.diag(torch.linspace(1, 2, n, dtype=torch.float64)), torch.float64)
        return eigsh(op, n, k, dtype=torch.float64, generator=gen(0), **kw).basis_size

    assert run(100, 1) == 16              # max(2k+6, 16)
    assert run(100, 5) == 16
    assert run(100, 10) == 26             # 2k + 6
    assert run(10, 3) == 10               # capped at n
    assert run(100, 2, basis_size=20) == 20
    assert run(12, 2, basis_size=40) == 12
    assert run(100, 4, basis_size=5) == 5  # k + 1 is allowed
    with pytest.raises(ValueError, match="basis_size"):
        run(100, 4, basis_size=4)


def test_eigsh_large_n_memory():
    """n = 200 000 diagonal operator as an elementwise product, k=2: finds the top values, and the
    vectors the operator is handed live in storage of at most basis_size + 1 vectors."""
    n = 200_000
    d = torch.rand(n, generator=gen(11))                # bulk in [0, 1)
    d[:2] = torch.tensor([3.0, 2.5])
    calls = {"n": 0, "storage": 0}

    def matvec(x):
        calls["n"] += 1
        calls["storage"] = max(calls["storage"], x.untyped_storage().nbytes())
        return x * d

    res = eigsh(matvec, n, 2, generator=gen(0))          # float32 default
    assert res.converged.all()
    assert res.basis_size == 16
    assert res.matvecs == calls["n"]
    assert torch.allclose(res.values[0], torch.tensor([3.0, 2.5], dtype=torch.float64), atol=1e-5, rtol=0)
    assert (res.residuals <= 1e-4 * 3.0 * 1.01).all()
    assert calls["storage"] <= (res.basis_size + 1) * n * 4, calls["storage"]


# ---------------------------------------------------------------------------------------- 6. reproducibility
def test_eigsh_generator_reproducible():
    op = Op(with_spectrum(main_spectrum(), seed=12), torch.float32)
    a = eigsh(op, N_MAIN, 3, generator=gen(5), return_vectors=True, tol=1e-5)
    b = eigsh(op, N_MAIN, 3, generator=gen(5), return_vectors=True, tol=1e-5)
    c = eigsh(op, N_MAIN, 3, generator=gen(6), return_vectors=True, tol=1e-5)
    for name in ("values", "residuals", "converged", "vectors"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.matvecs, a.restarts, a.basis_size) == (b.matvecs, b.restarts, b.basis_size)
    assert not torch.equal(a.residuals, c.residuals)       # the seed is really used
    # the global generator is used when none is given
    torch.manual_seed(3)
    d = eigsh(op, N_MAIN, 3, tol=1e-5)
    torch.manual_seed(3)
    e = eigsh(op, N_MAIN, 3, tol=1e-5)
    assert torch.equal(d.values, e.values) and torch.equal(d.residuals, e.residuals)


# ---------------------------------------------------------------------------------------- eigsh bugs
def test_eigsh_identity_matvec_returning_input():
    res = eigsh(lambda x: x, 50, 2, dtype=torch.float64, generator=gen(0), return_vectors=True)
    assert torch.allclose(res.values, torch.ones(1, 2, dtype=torch.float64))
    assert_orthonormal(res.vectors, torch.float64)


@pytest.mark.parametrize("scale", [
    pytest.param(1e-12, id="scale=1e-12"),
    pytest.param(1e12, id="scale=1e12"),
    pytest.param(1e-25, id="scale=1e-25"),
    pytest.param(1e20, id="scale=1e20"),
])
def test_eigsh_fp32_scale_invariant(scale):
    """Scaling the operator by c scales the eigenvalues and residuals by c (float32 operator)."""
    n = 50
    d = torch.linspace(0, 1, n, dtype=torch.float64)
    res = eigsh(lambda x: x * (d * scale).to(torch.float32), n, 2, generator=gen(0))
    assert res.converged.all()
    want = torch.tensor([1.0, 48 / 49], dtype=torch.float64) * scale
    err = (res.values[0] - want).abs()
    assert (err <= res.residuals[0] + slack(torch.float32, scale, n)).all(), (res.values / scale, res.residuals / scale)
    assert float((err / scale).max()) <= 1e-4


# ---------------------------------------------------------------------------------------- 7. hutchpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_hutchpp_exact_when_n_small(dtype):
    n = 20
    lam = torch.stack([torch.linspace(-1, 3, n), torch.logspace(-3, 1, n)]).to(torch.float64)
    op = Op(with_spectrum(lam, seed=13), dtype)
    est = hutchpp(op, n, batch=2, num_matvecs=30, dtype=dtype, generator=gen(0))
    exact = op.A.to(torch.float64).diagonal(dim1=-2, dim2=-1).sum(-1)
    assert est.value.shape == est.stderr.shape == (2,)
    assert torch.allclose(est.value, exact, rtol=0, atol=50 * torch.finfo(dtype).eps * float(lam.abs().sum(-1).max()))
    assert torch.equal(est.stderr, torch.zeros(2, dtype=torch.float64))
    assert est.matvecs == op.calls == n
    # n == num_matvecs is still the exact path
    op.calls = 0
    est = hutchpp(op, n, batch=2, num_matvecs=n, dtype=dtype, generator=gen(0))
    assert op.calls == n and torch.equal(est.stderr, torch.zeros(2, dtype=torch.float64))


def _hutchinson_std(A: torch.Tensor, probes: int) -> float:
    """Exact standard deviation of plain Rademacher Hutchinson with `probes` probes."""
    off = float((A**2).sum() - (A.diagonal() ** 2).sum())
    return math.sqrt(2 * off / probes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hutchpp_fast_decay_beats_hutchinson(dtype):
    """500×500 PSD with λ_i = 1/(1+i)²: 16 independent Hutch++ estimates (one batched call) are each
    within STDERRS reported standard errors of tr(A), and their RMS error is far below the standard
    deviation of plain Hutchinson with the same 30 products."""
    n, B, m = 500, 16, 30
    lam = 1.0 / (1.0 + torch.arange(n, dtype=torch.float64)) ** 2
    A = with_spectrum(lam, seed=14)
    op = Op(A, dtype)                                     # one operator, B independent estimates
    est = hutchpp(op, n, batch=B, num_matvecs=m, dtype=dtype, generator=gen(1))
    exact = float(op.A.to(torch.float64).trace())
    assert est.matvecs == op.calls == m
    # memory: the sketch is s = m/3 vectors per operator; nothing larger is handed to the operator
    assert op.max_input_storage <= (m // 3) * B * n * op.A.element_size()
    assert (est.stderr > 0).all() and torch.isfinite(est.stderr).all()
    err = est.value - exact
    assert (err.abs() <= T9_STDERRS * est.stderr + 1e-6 * exact).all(), (err, est.stderr)
    rms = float(err.pow(2).mean().sqrt())
    h = _hutchinson_std(A, m)
    assert rms <= 0.2 * h, (rms, h)
    # and the reported stderr is of the right size (not inflated to pass the check above)
    assert float(est.stderr.mean()) <= 0.2 * h


def test_hutchpp_low_rank_captured_by_sketch():
    """Rank 4 <= s = 10: the sketch holds all of A, the estimate is exact and its stderr ~0."""
    n = 100
    lam = torch.zeros(n, dtype=torch.float64)
    lam[:4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    op = Op(with_spectrum(lam, seed=15), torch.float64)
    est = hutchpp(op, n, num_matvecs=30, dtype=torch.float64, generator=gen(0))
    assert abs(float(est.value) - 10.0) <= 1e-10
    assert float(est.stderr) <= 1e-10


def test_hutchpp_reproducible():
    n = 60
    op = Op(with_spectrum(torch.linspace(0, 1, n, dtype=torch.float64), seed=16), torch.float32)
    a = hutchpp(op, n, num_matvecs=30, generator=gen(2))
    b = hutchpp(op, n, num_matvecs=30, generator=gen(2))
    c = hutchpp(op, n, num_matvecs=30, generator=gen(3))
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    assert not torch.equal(a.value, c.value)


# ---------------------------------------------------------------------------------------- 8. slq
N_SLQ = 300


def _slq_spectra() -> torch.Tensor:
    return torch.stack([torch.linspace(0.5, 2.0, N_SLQ), torch.logspace(-2, 1, N_SLQ)]).to(torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slq_traces_known_spectrum(dtype):
    """tr(A), tr(log A), tr(A²) of two 300×300 operators (batch=2, condition 4 and 1000) within
    STDERRS reported standard errors (+ a small quadrature bias allowance)."""
    lam = _slq_spectra()
    op = Op(with_spectrum(lam, seed=17), dtype)
    q = slq(op, N_SLQ, batch=2, num_probes=16, steps=20, dtype=dtype, generator=gen(0))
    assert q.matvecs == op.calls == 16 * 20
    assert q.nodes.shape == q.weights.shape == (2, 16, 20)
    assert torch.allclose(q.weights.sum(-1), torch.ones(2, 16, dtype=torch.float64), atol=1e-12, rtol=0)
    lam_op = op.reference()                                 # as applied (fp32 rounding included)
    for f in (lambda x: x, lambda x: torch.log(x.clamp_min(1e-300)), lambda x: x**2):
        est, se = q.trace(f)
        exact = f(lam_op).sum(-1)
        assert est.shape == se.shape == (2,)
        assert (se > 0).all()
        assert ((est - exact).abs() <= STDERRS * se + 1e-3 * exact.abs().clamp_min(1.0)).all(), (est, exact, se)
    # the standard error of tr(A) is the sample version of the exact Hutchinson one,
    # sqrt(2 Σ_{i≠j} A_ij² / P): within a factor 2 (16 probes: the sample std is good to ~20%)
    _, se = q.trace(lambda x: x)
    A = op.A.to(torch.float64)
    exact_se = torch.sqrt(2 * ((A**2).sum((-2, -1)) - (A.diagonal(dim1=-2, dim2=-1) ** 2).sum(-1)) / 16)
    assert ((se / exact_se > 0.5) & (se / exact_se < 2.0)).all(), (se, exact_se)


def test_slq_single_probe_stderr_infinite():
    op = Op(with_spectrum(torch.linspace(1, 2, 30, dtype=torch.float64), seed=18), torch.float64)
    q = slq(op, 30, num_probes=1, steps=5, dtype=torch.float64, generator=gen(0))
    est, se = q.trace(lambda x: x)
    assert torch.isfinite(est).all() and torch.isinf(se).all()
    H, se = q.entropy()
    assert torch.isfinite(H).all() and torch.isinf(se).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_slq_entropy_flat_spectrum_is_log_n(dtype):
    """Flat spectrum (A = c·I): every probe sees one node, H = log n exactly, stderr 0."""
    n = N_SLQ
    op = Op(with_spectrum(torch.full((n,), 3.0, dtype=torch.float64), seed=19), dtype)
    q = slq(op, n, num_probes=4, steps=10, dtype=dtype, generator=gen(0))
    H, se = q.entropy()
    assert abs(float(H) - math.log(n)) <= 1e-5
    assert float(se) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_slq_entropy_known_spectrum(dtype):
    lam = _slq_spectra()
    op = Op(with_spectrum(lam, seed=20), dtype)
    q = slq(op, N_SLQ, batch=2, num_probes=16, steps=20, dtype=dtype, generator=gen(1))
    H, se = q.entropy()
    p = lam / lam.sum(-1, keepdim=True)
    exact = -(p * p.log()).sum(-1)
    assert (se > 0).all()
    assert ((H - exact).abs() <= STDERRS * se + 1e-4).all(), (H, exact, se)
    # scale invariance of the normalised spectrum
    op2 = Op(with_spectrum(lam * 1e3, seed=20), dtype)
    H2, _ = slq(op2, N_SLQ, batch=2, num_probes=16, steps=20, dtype=dtype, generator=gen(1)).entropy()
    assert torch.allclose(H2, H, atol=1e-5, rtol=0)


def test_slq_entropy_rank_deficient():
    """Rank 4 PSD (96 zeros; the Lanczos recurrence breaks down): zeros contribute nothing to H."""
    n = 100
    lam = torch.zeros(n, dtype=torch.float64)
    lam[:4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    op = Op(with_spectrum(lam, seed=21), torch.float64)
    q = slq(op, n, num_probes=32, steps=20, dtype=torch.float64, generator=gen(0))
    assert torch.isfinite(q.nodes).all() and torch.isfinite(q.weights).all()
    p = lam[:4] / 10
    exact = float(-(p * p.log()).sum())
    H, se = q.entropy()
    assert abs(float(H) - exact) <= STDERRS * float(se) + 1e-6, (float(H), exact, float(se))
    est, se = q.trace(lambda x: x**2)
    assert abs(float(est) - 30.0) <= STDERRS * float(se)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slq_density(dtype):
    """density integrates to n (its docstring's normalisation) and puts the right mass on each of two
    well-separated groups of eigenvalues (100 in [0.1, 0.2], 200 in [1.0, 1.2])."""
    n = N_SLQ
    lam = torch.cat([torch.linspace(0.1, 0.2, 100), torch.linspace(1.0, 1.2, 200)]).to(torch.float64)
    op = Op(with_spectrum(lam, seed=22), dtype)
    q = slq(op, n, num_probes=16, steps=20, dtype=dtype, generator=gen(0))
    grid = torch.linspace(-1.0, 2.5, 3501, dtype=torch.float64)
    rho = q.density(grid, 0.05)
    assert rho.shape == (1, grid.numel())
    assert (rho >= 0).all()
    total = float(torch.trapezoid(rho[0], grid))
    assert abs(total - n) <= 1e-6 * n, total
    low = float(torch.trapezoid(rho[0][grid <= 0.6], grid[grid <= 0.6]))
    # Hutchinson noise of the count of a rank-100 projector: std sqrt(2(100 − 100²/300)/16) ≈ 2.9
    assert abs(low - 100) <= 15, low
    # the smoothed density peaks inside the groups, not between them
    assert float(rho[0][(grid > 0.5) & (grid < 0.8)].max()) < 0.1 * float(rho[0].max())


def test_slq_reproducible_and_steps_capped_at_n():
    n = 12
    op = Op(with_spectrum(torch.linspace(1, 2, n, dtype=torch.float64), seed=23), torch.float64)
    a = slq(op, n, num_probes=3, steps=50, dtype=torch.float64, generator=gen(4))
    assert a.nodes.shape == (1, 3, n) and a.matvecs == op.calls == 3 * n
    b = slq(op, n, num_probes=3, steps=50, dtype=torch.float64, generator=gen(4))
    c = slq(op, n, num_probes=3, steps=50, dtype=torch.float64, generator=gen(5))
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)


def test_slq_fp32_entropy_scale_invariant():
    n = 200
    lam = torch.linspace(0.1, 1, n, dtype=torch.float64)
    p = lam / lam.sum()
    exact = float(-(p * p.log()).sum())
    A = with_spectrum(lam, seed=24)
    for c in (1.0, 1e-22):
        q = slq(Op(A * c, torch.float32), n, generator=gen(0))
        H, se = q.entropy()
        assert abs(float(H) - exact) <= STDERRS * float(se) + 1e-4, (c, float(H), exact, float(se))


# ---------------------------------------------------------------------------------------- 9. validation
def _id(x):
    return 2.0 * x


@pytest.mark.parametrize("kwargs,arg", [
    (dict(k=0), "k"), (dict(k=11), "k"), (dict(k=2.0), "k"), (dict(k=True), "k"),
    (dict(k=1, which="la"), "which"), (dict(k=1, which="BE"), "which"),
    (dict(k=1, tol=0.0), "tol"), (dict(k=1, tol=1.0), "tol"), (dict(k=1, tol=-1e-3), "tol"),
    (dict(k=1, tol=float("nan")), "tol"), (dict(k=1, tol="1e-4"), "tol"),
    (dict(k=1, max_matvecs=0), "max_matvecs"), (dict(k=1, batch=0), "batch"),
    (dict(k=3, basis_size=3), "basis_size"), (dict(k=1, relative_to="abs"), "relative_to"),
], ids=lambda v: "-".join(f"{a}={b!r}" for a, b in v.items()) if isinstance(v, dict) else v)
def test_eigsh_rejects_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=rf"eigsh: {arg}\b"):
        eigsh(_id, 10, **kwargs)


def test_eigsh_rejects_bad_n():
    with pytest.raises(ValueError, match=r"eigsh: n\b"):
        eigsh(_id, 0, 1)


@pytest.mark.parametrize("batch,bad", [
    (1, lambda x: 2.0 * x[0]),                            # unbatched [n]
    (1, lambda x: 2.0 * x[:, :-1]),                       # [B, n-1]
    (2, lambda x: 2.0 * x[:1]),                           # [1, n] for B=2
    (2, lambda x: torch.cat([x, x[:, :1]], 1)),           # [B, n+1]
])
def test_eigsh_rejects_wrong_matvec_shape(batch, bad):
    with pytest.raises(ValueError, match=r"eigsh: matvec\b.*shape"):
        eigsh(bad, 10, 1, batch=batch, generator=gen(0))
    # positive control: the right shape works
    res = eigsh(_id, 10, 1, batch=batch, generator=gen(0))
    assert torch.allclose(res.values, torch.full((batch, 1), 2.0, dtype=torch.float64))


def test_hutchpp_slq_reject_bad_counts():
    with pytest.raises(ValueError, match=r"hutchpp: num_matvecs\b"):
        hutchpp(_id, 10, num_matvecs=2)
    with pytest.raises(ValueError, match=r"hutchpp: n\b"):
        hutchpp(_id, 0)
    with pytest.raises(ValueError, match=r"slq: num_probes\b"):
        slq(_id, 10, num_probes=0)
    with pytest.raises(ValueError, match=r"slq: steps\b"):
        slq(_id, 10, steps=0)
    with pytest.raises(ValueError, match=r"slq: n\b"):
        slq(_id, 0)


@pytest.mark.parametrize("fn", ["hutchpp_exact", "hutchpp", "slq"])
@pytest.mark.parametrize("bad", [
    pytest.param(lambda x: 2.0 * x[0], id="unbatched"),
    pytest.param(lambda x: torch.cat([x, x[:, :1]], 1), id="n+1"),
    pytest.param(lambda x: 2.0 * x[:, :-1], id="n-1"),
    pytest.param(lambda x: (2.0 * x).tolist(), id="list"),
])
def test_hutchpp_slq_reject_wrong_matvec_shape(fn, bad):
    call = {
        "hutchpp_exact": lambda mv: hutchpp(mv, 20, num_matvecs=30),
        "hutchpp": lambda mv: hutchpp(mv, 40, num_matvecs=30, generator=gen(0)),
        "slq": lambda mv: slq(mv, 40, generator=gen(0)),
    }[fn]
    with pytest.raises(ValueError, match=rf"{fn.split('_')[0]}: matvec\b.*shape"):
        call(bad)
    out = call(_id)                                       # positive control
    if fn == "slq":
        est, _ = out.trace(lambda x: x)
        assert abs(float(est) - 80.0) <= 1e-3
    elif fn == "hutchpp_exact":
        assert float(out.value) == 40.0


@pytest.mark.parametrize("fn", ["eigsh", "hutchpp_exact", "hutchpp", "slq"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_product_rejected(fn, poison):
    """A NaN/Inf product is reported as such (not propagated into eigh or a NaN estimate)."""
    def bad(x):
        y = 2.0 * x
        y[:, 3] = poison
        return y

    call = {
        "eigsh": lambda: eigsh(bad, 40, 1, generator=gen(0)),
        "hutchpp_exact": lambda: hutchpp(bad, 20, num_matvecs=30),
        "hutchpp": lambda: hutchpp(bad, 40, num_matvecs=30, generator=gen(0)),
        "slq": lambda: slq(bad, 40, generator=gen(0)),
    }[fn]
    with pytest.raises(ValueError, match=r"matvec.*(NaN|Inf)"):
        call()


def test_hutchpp_slq_reject_bad_batch():
    with pytest.raises(ValueError, match=r"hutchpp: batch\b"):
        hutchpp(_id, 40, batch=0)
    with pytest.raises(ValueError, match=r"slq: batch\b"):
        slq(_id, 40, batch=0)
