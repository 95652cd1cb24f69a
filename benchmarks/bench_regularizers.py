"""Benchmark of specfast.nn: what each spectral regulariser adds to a training step, and
specfast.nn.spectral_norm against torch.nn.utils.parametrizations.spectral_norm.

Part 1 — training-step overhead. One SGD step (forward, cross-entropy, backward, optimizer step) of
  (a) an MLP 784-256-256-10 and (b) a small CNN (conv 1→16, pool, conv 16→32, pool, linear 1568→10)
  on 28×28 inputs, batch 128, unregularised and with each regulariser added to the loss:
  WeightSpectralPenalty (block 4 and block 1), SpectralEntropyPenalty, jacobian_spectral_penalty
  (2 power steps), jacobian_frobenius_penalty (1 projection), and with every Linear/Conv layer
  spectrally normalised by torch's parametrization or by specfast's. Ratio = step time / unregularised
  step time, measured in the same run.
Part 2 — spectral_norm parametrization: forward + backward of the parametrized weight in training
  mode (one power iteration, the normalised weight, its gradient), torch's vs specfast's, for fp32
  matrices of several sizes, a bf16 matrix, and [E, m, n] expert stacks (specfast: batch_dims=1, one
  σ per expert in one module; torch: one parametrized weight per expert, stacked).

Every row is checked before it is timed: each penalty's value against its exact value on the same
model and batch (σ₁ from float64 SVDs, per-sample Jacobians from vmap(jacrev)), and specfast's
spectral_norm against torch's from the same start vectors.

Run: `cd /tmp && python /work/main/benchmarks/bench_regularizers.py` (`--smoke`: tiny sizes, used
by the tests). Results are appended to bench_results/regularizers.jsonl (regularizers_smoke.jsonl).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402


# ----------------------------------------------------------------------------------- models
def make_mlp(smoke):
    from torch import nn

    d = (64, 32, 32, 10) if smoke else (784, 256, 256, 10)
    return nn.Sequential(nn.Flatten(), nn.Linear(d[0], d[1]), nn.ReLU(), nn.Linear(d[1], d[2]), nn.ReLU(),
                         nn.Linear(d[2], d[3]))


def make_cnn(smoke):
    from torch import nn

    c1, c2, side = (4, 8, 8) if smoke else (16, 32, 28)
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(c2 * (side // 4) ** 2, 10))


def apply_sn(model, fn):
    from torch import nn

    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            fn(mod)
    return model


# ----------------------------------------------------------------------------------- part 1
def exact_weight_penalty(model):
    import torch

    tot = 0.0
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            tot += float(torch.linalg.matrix_norm(p.detach().double().flatten(1), 2) ** 2)
    return tot


def exact_entropy_penalty(model):
    import math

    import torch

    tot = 0.0
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            W = p.detach().double().flatten(1)
            s2 = torch.linalg.svdvals(W) ** 2
            pr = s2 / s2.sum()
            H = float(-(pr * torch.log(torch.where(pr > 0, pr, torch.ones_like(pr)))).sum())
            tot += 1 - H / math.log(min(W.shape))
    return tot


def exact_jacobians(model, x):
    import torch
    from torch.func import jacrev, vmap

    with torch.no_grad():
        J = vmap(jacrev(lambda xi: model(xi[None])[0]))(x)
    return J.reshape(x.shape[0], -1, x[0].numel()).double()


def training_rows(name, make, x, y, args, writer):
    import torch
    from torch import nn

    import specfast.nn as snn

    torch.manual_seed(0)
    base = make(args.smoke)
    J = exact_jacobians(base, x)
    sig2_exact = float(torch.linalg.matrix_norm(J, 2).square().mean())
    fro_exact = float(J.square().sum((1, 2)).mean())
    lam = {"weight": 1e-3, "entropy": 1e-2, "jac": 1e-2, "fro": 1e-3}

    def setup(variant):
        """(step function, check record) for one variant on a fresh copy of the model."""
        torch.manual_seed(1)
        if variant == "sn_torch":
            model = apply_sn(copy.deepcopy(base), torch.nn.utils.parametrizations.spectral_norm)
        elif variant == "sn_specfast":
            model = apply_sn(copy.deepcopy(base), snn.spectral_norm)
        else:
            model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        reg, check = None, {}
        g = torch.Generator().manual_seed(2)
        if variant in ("weight4", "weight1"):
            pen = snn.WeightSpectralPenalty(model, block_size=4 if variant == "weight4" else 1)
            reg = lambda: lam["weight"] * pen()  # noqa: E731
            check = {"value": float(pen().detach()), "exact": exact_weight_penalty(model), "rtol": 1e-4}
        elif variant == "entropy":
            pen = snn.SpectralEntropyPenalty(model)
            reg = lambda: lam["entropy"] * pen()  # noqa: E731
            check = {"value": float(pen().detach()), "exact": exact_entropy_penalty(model), "rtol": 1e-4}
        elif variant == "jac_spectral":
            def reg():
                return lam["jac"] * snn.jacobian_spectral_penalty(model, x, n_power_iterations=2, generator=g)
            val2 = float(snn.jacobian_spectral_penalty(model, x, n_power_iterations=2, generator=g).detach())
            val30 = float(snn.jacobian_spectral_penalty(model, x, n_power_iterations=150, generator=g).detach())
            if not val2 <= sig2_exact * (1 + 1e-5):
                raise harness.CheckError(f"{name}/jac_spectral: estimate {val2} above the exact {sig2_exact}")
            check = {"value": val30, "exact": sig2_exact, "rtol": 1e-3, "value_2_steps": val2,
                     "rel_err_2_steps": (sig2_exact - val2) / sig2_exact}
        elif variant == "jac_frobenius":
            reg = lambda: lam["fro"] * snn.jacobian_frobenius_penalty(model, x, generator=g)  # noqa: E731
            val = float(snn.jacobian_frobenius_penalty(model, x, num_projections=64, generator=g).detach())
            check = {"value": val, "exact": fro_exact, "rtol": 0.05}
        elif variant == "sn_specfast":
            torch.manual_seed(1)   # the same start vectors as `model`
            ref = apply_sn(copy.deepcopy(base), torch.nn.utils.parametrizations.spectral_norm)
            with torch.no_grad():
                check = {"value": 0.0, "exact": 0.0, "rtol": 1e-4,
                         "rel_err_vs_torch": float((model(x) - ref(x)).norm() / ref(x).norm())}
            if not check["rel_err_vs_torch"] <= 1e-4:
                raise harness.CheckError(f"{name}/sn_specfast differs from torch's: {check['rel_err_vs_torch']:.2e}")
        if check.get("exact"):
            err = abs(check["value"] - check["exact"]) / abs(check["exact"])
            check["rel_err"] = err
            if not err <= check["rtol"]:
                raise harness.CheckError(f"check failed for {name}/{variant}: relative error {err:.3e} > "
                                         f"{check['rtol']:.0e}")

        def step():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            if reg is not None:
                loss = loss + reg()
            loss.backward()
            opt.step()
        return step, check

    variants = [("base", "unregularised"), ("weight4", "WeightSpectralPenalty (block 4)"),
                ("weight1", "WeightSpectralPenalty (block 1)"), ("entropy", "SpectralEntropyPenalty"),
                ("jac_spectral", "jacobian_spectral_penalty (2 steps)"),
                ("jac_frobenius", "jacobian_frobenius_penalty (1 proj.)"),
                ("sn_torch", "torch spectral_norm on all layers"),
                ("sn_specfast", "specfast spectral_norm on all layers")]
    fns, checks = [], []
    for key, _ in variants:
        f, c = setup(key)
        fns.append(f)
        checks.append(c)
    # interleaved rounds: on a shared machine the load drifts during a run, and the ratios to the
    # unregularised step are the point of this table
    timings = harness.measure_interleaved(fns, repeat=args.repeat, min_repeat=3, budget_s=args.budget,
                                          interleave=True)
    t0 = timings[0].median
    rows = []
    for (key, label), t, c in zip(variants, timings, checks):
        rec = {"part": "training_step", "model": name, "variant": key, "label": label, "timing": t.as_dict(),
               "ratio_to_unregularised": t.median / t0, "overhead_s": t.median - t0, "check": c}
        writer.write(rec)
        acc = "-"
        if "rel_err" in c:
            acc = harness.fmt_err(c["rel_err"])
        if key == "jac_spectral":
            acc = f"{harness.fmt_err(c['rel_err'])} (150 st.), {harness.fmt_err(c['rel_err_2_steps'])} (2 st.)"
        if key == "sn_specfast":
            acc = f"{harness.fmt_err(c['rel_err_vs_torch'])} vs torch"
        rows.append({"_group": name, "model": name, "reg": label, "t": harness.fmt_time(t.median),
                     "spread": f"[{harness.fmt_time(t.min)}, {harness.fmt_time(t.max)}] ({t.n})",
                     "ratio": f"{t.median / t0:.2f}x",
                     "over": harness.fmt_time(max(t.median - t0, 0.0)) if key != "base" else "-",
                     "acc": acc})
    return rows


# ----------------------------------------------------------------------------------- part 2
def sn_rows(args, writer):
    import torch
    from torch import nn

    import specfast.nn as snn

    def holder(w):
        m = nn.Module()
        m.weight = nn.Parameter(w.clone())
        return m

    if args.smoke:
        cases = [("64x96", (64, 96), torch.float32), ("128x128", (128, 128), torch.float32),
                 ("128x128", (128, 128), torch.bfloat16), ("experts 3x32x48", (3, 32, 48), torch.float32),
                 ("experts 3x32x48", (3, 32, 48), torch.bfloat16)]
    else:
        cases = [("256x784", (256, 784), torch.float32), ("1024x1024", (1024, 1024), torch.float32),
                 ("4096x4096", (4096, 4096), torch.float32), ("4096x4096", (4096, 4096), torch.bfloat16),
                 ("experts 8x1024x4096", (8, 1024, 4096), torch.float32),
                 ("experts 8x1024x4096", (8, 1024, 4096), torch.bfloat16)]
    rows = []
    for label, shape, dtype in cases:
        g = torch.Generator().manual_seed(0)
        W = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype)
        G = torch.randn(shape, generator=g).to(dtype)
        stack = len(shape) == 3
        torch.manual_seed(0)
        ours = snn.spectral_norm(holder(W), batch_dims=1 if stack else 0)
        if stack:
            theirs = []
            for e in range(shape[0]):
                t = torch.nn.utils.parametrizations.spectral_norm(holder(W[e]))
                with torch.no_grad():   # the same start vectors as ours
                    t.parametrizations.weight[0]._u.copy_(ours.parametrizations.weight[0]._u[e])
                    t.parametrizations.weight[0]._v.copy_(ours.parametrizations.weight[0]._v[e])
                theirs.append(t)
        else:
            theirs = torch.nn.utils.parametrizations.spectral_norm(holder(W))
            with torch.no_grad():
                theirs.parametrizations.weight[0]._u.copy_(ours.parametrizations.weight[0]._u)
                theirs.parametrizations.weight[0]._v.copy_(ours.parametrizations.weight[0]._v)

        def torch_weight():
            return torch.stack([t.weight for t in theirs]) if stack else theirs.weight

        def torch_step():
            torch_weight().backward(G)
            for t in (theirs if stack else [theirs]):
                t.parametrizations.weight.original.grad = None

        def ours_step():
            ours.weight.backward(G)
            ours.parametrizations.weight.original.grad = None

        # check: one step from the same vectors; fp32 against torch, bf16 against a float64 evaluation
        # of the same step (torch's bf16 arithmetic is itself off by ~1e-2, see the accuracy column)
        v0 = ours.parametrizations.weight[0]._v.detach().double().clone()
        wt, wo = torch_weight().detach(), ours.weight.detach()
        Wd = W.double()
        y = (Wd @ v0.unsqueeze(-1)).squeeze(-1)
        u = y / y.norm(dim=-1, keepdim=True)
        wv = (Wd.mT @ u.unsqueeze(-1)).squeeze(-1)
        v1 = wv / wv.norm(dim=-1, keepdim=True)
        sig = (u.unsqueeze(-1) * Wd * v1.unsqueeze(-2)).sum((-2, -1))
        ref = Wd / sig.reshape(*sig.shape, 1, 1)
        err_ours = harness.rel_err(wo.double().reshape(-1), ref.reshape(-1), normwise_axis=0)
        err_torch = harness.rel_err(wt.double().reshape(-1), ref.reshape(-1), normwise_axis=0)
        harness.check(f"spectral_norm {label} {dtype}", wo.double().reshape(-1), ref.reshape(-1),
                      1e-5 if dtype == torch.float32 else 4e-3, normwise_axis=0)
        timings = harness.measure_interleaved([torch_step, ours_step], repeat=args.repeat, min_repeat=3,
                                              budget_s=args.budget, interleave=True)
        dt = "fp32" if dtype == torch.float32 else "bf16"
        for meth, t, err in (("torch", timings[0], err_torch), ("specfast", timings[1], err_ours)):
            sp = timings[0].median / timings[1].median
            writer.write({"part": "spectral_norm", "shape": list(shape), "dtype": dt, "method": meth,
                          "timing": t.as_dict(), "rel_err_vs_float64_step": err,
                          "speedup_specfast_vs_torch": sp})
            name = ("torch (one parametrization per expert, stacked)" if stack else "torch") if meth == "torch" \
                else ("specfast (batch_dims=1)" if stack else "specfast")
            rows.append({"_group": f"{label}{dt}", "shape": label, "dtype": dt, "method": name,
                         "t": harness.fmt_time(t.median),
                         "spread": f"[{harness.fmt_time(t.min)}, {harness.fmt_time(t.max)}] ({t.n})",
                         "err": harness.fmt_err(err), "speedup": f"{sp:.2f}x" if meth == "specfast" else "-"})
    return rows


# ----------------------------------------------------------------------------------- main
def main():
    removed = harness.prepare_process()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script works")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per row (default 10; smoke 3)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per row (default 4; smoke 0.2)")
    ap.add_argument("--parts", default="train,sn", help="comma list of train, sn")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.repeat = args.repeat or (3 if args.smoke else 10)
    args.budget = args.budget if args.budget is not None else (0.2 if args.smoke else 4.0)
    out = args.out or os.path.join("bench_results", "regularizers_smoke.jsonl" if args.smoke else "regularizers.jsonl")
    harness.require_native_specfast(os.path.dirname(HERE))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = harness.machine_record(os.path.dirname(HERE), removed)
    run_id = uuid.uuid4().hex[:12]
    mode = "smoke" if args.smoke else "full"
    writer = harness.ResultWriter(out, machine, {"bench": "regularizers", "mode": mode, "run_id": run_id})
    t_start = time.perf_counter()
    print(f"specfast regulariser benchmark ({mode}), run {run_id}")
    print(f"machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, torch {torch.__version__} "
          f"({machine['torch_threads']} threads), git {machine['git_revision']}, "
          f"load average at start {machine['loadavg_at_start']}")
    parts = {p.strip() for p in args.parts.split(",")}
    if "train" in parts:
        B = 16 if args.smoke else 128
        g = torch.Generator().manual_seed(0)
        side = 8 if args.smoke else 28
        x = torch.randn(B, 1, side, side, generator=g)
        y = torch.randint(0, 10, (B,), generator=g)
        rows = training_rows("MLP", make_mlp, x, y, args, writer)
        rows += training_rows("CNN", make_cnn, x, y, args, writer)
        arch = ("MLP 64-32-32-10 and CNN 4/8 channels on 8x8, batch 16" if args.smoke else
                "MLP 784-256-256-10 and CNN conv1-16/conv16-32/linear on 28x28, batch 128")
        print(f"\nTraining step (forward + backward + SGD step), {arch}; ratio = step / unregularised step")
        print(harness.format_table(rows, [("model", "model"), ("reg", "regulariser"), ("t", "time (median)"),
                                          ("spread", "[min, max] (n)"), ("ratio", "ratio"), ("over", "overhead"),
                                          ("acc", "check: rel err vs exact")]))
    if "sn" in parts:
        rows = sn_rows(args, writer)
        print("\nspectral_norm parametrization: forward + backward of the parametrized weight (training mode)")
        print(harness.format_table(rows, [("shape", "weight"), ("dtype", "dtype"), ("method", "method"),
                                          ("t", "time (median)"), ("spread", "[min, max] (n)"),
                                          ("speedup", "speedup"), ("err", "rel err vs float64 step")]))
    elapsed = time.perf_counter() - t_start
    writer.write({"kind": "summary", "elapsed_s": elapsed})
    print(f"\nresults appended to {out}; took {elapsed:.0f}s"
          + (" (smoke sizes: timings mean nothing)" if args.smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
