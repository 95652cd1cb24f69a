"""torch.library integration: opcheck on every registered op, torch.compile of the public API."""
from __future__ import annotations

import pytest
import torch

import specfast
from specfast import ops
from conftest import TOLERANCES, geometric_spectrum, known_spectrum, rel_err


def _W(m=12, n=9, dtype=torch.float64, batch=(), seed=0, requires_grad=False):
    W, _ = known_spectrum(m, n, geometric_spectrum(min(m, n), 2.0, 0.7), dtype, batch=batch, seed=seed)
    return W.requires_grad_(requires_grad) if requires_grad else W


def _samples(name, device):
    """(args, kwargs) samples per op: several dtypes, a stack, and autograd-enabled inputs."""
    f64 = dict(dtype=torch.float64)
    if name == "gram_matvec":
        return [((_W(), torch.randn(9, 3, **f64)), {}),
                ((_W(dtype=torch.float32, batch=(2,)), torch.randn(2, 9, 1)), {}),
                ((_W(dtype=torch.bfloat16, batch=(2, 1)), torch.randn(2, 1, 9, 2)), {})]
    if name == "gram_matvec_grouped":
        return [(([_W(), _W(5, 7, seed=1)], [torch.randn(9, 2, **f64), torch.randn(7, 2, **f64)]), {}),
                (([_W(dtype=torch.float32)], [torch.randn(9, 1)]), {})]
    krylov = (2, 2, 32, 1000, 1e-10, True)
    if name == "krylov_svd":
        return [((_W(), *krylov, False, 0), {}),
                ((_W(dtype=torch.float32, batch=(3,)), *krylov, False, 1), {}),
                ((_W(dtype=torch.float64, requires_grad=True), *krylov, True, 0), {}),
                ((_W(dtype=torch.float64, batch=(2,), requires_grad=True), *krylov, True, 3), {}),
                ((_W(10, 8), 1, 1, 32, 1000, 1e-8, False, False, 0), {})]
    if name == "krylov_svd_grouped":
        return [(([_W(), _W(6, 11, seed=2)], *krylov, False, 0), {}),
                (([_W(requires_grad=True), _W(6, 11, seed=2, requires_grad=True)], *krylov, True, 0), {})]
    if name == "frobenius_scan":
        return [((_W(),), {}), ((_W(dtype=torch.float16, batch=(2, 2)),), {})]
    if name == "frobenius_scan_grouped":
        return [(([_W(), _W(4, 3, seed=5)],), {}), (([_W(dtype=torch.bfloat16)],), {})]
    if name == "slq_gram":
        return [((_W(), 4, 5, 0), {}), ((_W(dtype=torch.float32, batch=(2,)), 3, 4, 7), {})]
    if name == "slq_gram_grouped":
        return [(([_W(), _W(7, 5, seed=3)], 4, 5, 0), {})]
    raise KeyError(name)


def test_every_op_has_samples():
    for name in ops.ALL_OPS:
        assert _samples(name, "cpu"), name


@pytest.mark.parametrize("name", list(ops.ALL_OPS), ids=lambda n: f"op={n}")
def test_opcheck(name, device):
    op = ops.ALL_OPS[name]
    for args, kwargs in _samples(name, device):
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else
                     ([x.to(device) for x in a] if isinstance(a, list) else a) for a in args)
        torch.library.opcheck(op, args, kwargs)


def test_ops_agree_with_reference_oracle():
    """The native kernels against the pure-torch reference (itself a float64 dense SVD)."""
    from specfast import reference
    W = _W(20, 14, seed=9)
    S, bound, *_ = ops.krylov_svd_op(W, 3, 3, 32, 1000, 1e-12, True, False, 0)
    Sr, *_ = reference.krylov_svd(W, 3, True, False)
    assert rel_err(S, Sr) <= 1e-11
    X = torch.randn(14, 2, dtype=torch.float64)
    assert rel_err(ops.gram_matvec_op(W, X), reference.gram_matvec(W, X), scale=reference.gram_matvec(W, X).abs().max()) <= 1e-13


# ------------------------------------------------------------------------------------ torch.compile
def _f(W):
    return specfast.spectral_norm(W) * 2 + specfast.svdvals(W, 3).sum(-1)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_matches_eager(backend):
    torch._dynamo.reset()
    W = _W(30, 20, dtype=torch.float32, batch=(2,))
    eager = _f(W)
    compiled = torch.compile(_f, backend=backend)(W)
    assert rel_err(compiled, eager) <= TOLERANCES["compile"]


def test_compile_inductor_not_fullgraph():
    torch._dynamo.reset()
    W = _W(30, 20, dtype=torch.float32)
    eager = _f(W)
    compiled = torch.compile(_f, fullgraph=False)(W)
    assert rel_err(compiled, eager) <= TOLERANCES["compile"]


def test_compile_op_level_fullgraph():
    """The registered ops themselves trace into a single graph (fake kernels are consistent)."""
    torch._dynamo.reset()

    def g(W, X):
        S = ops.krylov_svd_op(W, 2, 2, 32, 1000, 1e-10, True, False, 0)[0]
        return S.sum() + ops.gram_matvec_op(W, X).sum() + ops.frobenius_scan_op(W)[0]

    W = _W(16, 10)
    X = torch.randn(10, 2, dtype=torch.float64)
    out = torch.compile(g, backend="aot_eager", fullgraph=True)(W, X)
    assert rel_err(out, g(W, X)) <= TOLERANCES["compile"]


def test_compile_backward():
    torch._dynamo.reset()
    W = _W(12, 8)

    def loss(A):
        return specfast.spectral_norm(A, tol=1e-12)

    X1 = W.clone().requires_grad_(True)
    loss(X1).backward()
    X2 = W.clone().requires_grad_(True)
    torch.compile(loss, backend="aot_eager")(X2).backward()
    assert rel_err(X2.grad, X1.grad, scale=1.0) <= 1e-10
