"""Benchmark of specfast.stability on the real all-MiniLM-L6-v2 (batch of 32 sentences).

Three comparisons, each against what a user would otherwise write, in the same run:

1. input-Jacobian top-5 singular values of every sample: specfast's batched matrix-free Lanczos
   (one jvp+vjp per step for all samples) vs the dense Jacobian of each sample
   (torch.autograd.functional.jacobian, vectorized) + torch.linalg.svdvals. The dense result is
   the reference for the accuracy column.
2. top Hessian eigenvalue of the training loss (10.8 M parameters): specfast's Lanczos vs power
   iteration on the same Hessian-vector products (PyHessian's method: stop when the eigenvalue
   changes by less than 1e-3 relative). Reference: Lanczos to a 1e-6 residual.
3. the full report, `specfast stability` (top-5 of every operator, entropies, traces, GMSI) in a
   subprocess: wall time and peak memory against the goals (< 300 s, < 4 GiB on a 2-core CPU).

Run from outside the source tree: `cd /tmp && python /work/main/benchmarks/bench_stability.py`
(`--smoke`: 4 sentences and small budgets, used by the tests).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

GOAL_SECONDS, GOAL_GIB = 300.0, 4.0


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_input_jacobian(enc_cls, enc, x, k, tol):
    import torch

    from specfast.stability import eigsh
    from specfast.stability.operators import InputJacobian

    B = x.shape[0]
    counter = {"n": 0}

    def lanczos():
        J = InputJacobian(enc, x)
        mv, n = J.gram()

        def counted(u):
            counter["n"] += 1
            return mv(u)

        r = eigsh(counted, n, k, batch=B, tol=tol, max_matvecs=300, generator=torch.Generator().manual_seed(0))
        return r.values.clamp_min(0).sqrt(), r

    def dense():
        out = []
        for b in range(B):
            one = enc_cls(enc.bert, enc.mask[b:b + 1]).eval()
            Jb = torch.autograd.functional.jacobian(lambda e: one(e)[0], x[b:b + 1], vectorize=True)
            out.append(torch.linalg.svdvals(Jb.reshape(Jb.shape[0], -1).double())[:k])
        return torch.stack(out)

    (sv, r), t_l = _timed(lanczos)
    ref, t_d = _timed(dense)
    err = float(((sv - ref).abs() / ref[:, :1]).max())
    return {"op": "input_jacobian_top5", "specfast_s": t_l, "baseline_s": t_d, "baseline": "dense jacobian + svdvals",
            "speedup": t_d / t_l, "max_rel_err": err, "products": counter["n"], "converged": bool(r.converged.all())}


def bench_hessian_top(enc, x, y, loss_fn, tol, power_rtol=1e-3, power_max=100):
    import torch

    from specfast.stability import eigsh
    from specfast.stability.operators import LossHessian, ModelFunction

    LH = LossHessian(ModelFunction(enc), x, y, loss_fn)
    p = LH.p

    def lanczos(t):
        return eigsh(LH.matvec, p, 1, tol=t, max_matvecs=400, generator=torch.Generator().manual_seed(1))

    def power():
        g = torch.Generator().manual_seed(2)
        v = torch.randn(1, p, generator=g)
        v /= v.norm()
        lam, its = None, 0
        while its < power_max:
            w = LH.matvec(v)
            its += 1
            new = float((w * v).sum())
            v = w / w.norm()
            if lam is not None and abs(new - lam) <= power_rtol * abs(lam):
                lam = new
                break
            lam = new
        return lam, its

    r, t_l = _timed(lambda: lanczos(tol))
    (lam_p, its), t_p = _timed(power)
    ref = lanczos(1e-6)
    lam_ref = float(ref.values[0, 0])
    return {"op": "hessian_top1", "specfast_s": t_l, "baseline_s": t_p, "baseline": "power iteration (PyHessian rule)",
            "speedup": t_p / t_l, "specfast_rel_err": abs(float(r.values[0, 0]) - lam_ref) / abs(lam_ref),
            "baseline_rel_err": abs(lam_p - lam_ref) / abs(lam_ref), "products": r.matvecs, "baseline_products": its,
            "reference": lam_ref, "reference_converged": bool(ref.converged.all())}


def bench_full_report(smoke: bool, out_dir: str):
    args = [sys.executable, "-m", "specfast.cli", "stability", "--out", out_dir, "--quiet"]
    if smoke:
        args += ["--batch-size", "4", "--max-matvecs", "12", "--entropy-probes", "2", "--entropy-steps", "5",
                 "--trace-matvecs", "6"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20   # KiB on Linux
    if proc.returncode != 0:
        raise SystemExit(f"specfast stability failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"op": "full_report", "wall_s": wall, "peak_gib": peak_gib, "children_peak_before_gib": before / 2**20,
            "summary": proc.stdout}


def main():
    removed = harness.prepare_process()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="4 sentences, small budgets: checks the script")
    ap.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative residual (default 1e-3)")
    ap.add_argument("--out", default=os.path.join("bench_results", "stability_smoke.jsonl" if "--smoke" in sys.argv
                                                  else "stability.jsonl"))
    args = ap.parse_args()
    harness.require_native_specfast(os.path.dirname(HERE))
    import torch

    from specfast.stability.sentence import SentenceEncoder, load_default

    machine = harness.machine_record(os.path.dirname(HERE), removed)
    writer = harness.ResultWriter(args.out, machine, {"mode": "smoke" if args.smoke else "full"})
    B = 4 if args.smoke else 32
    enc, x, y, loss_fn, _ = load_default(batch_size=B)
    torch.manual_seed(0)

    # the full report first, in a fresh process, so its peak memory is its own
    with tempfile.TemporaryDirectory(prefix="specfast-bench-stability-") as tmp:
        full = bench_full_report(args.smoke, tmp)
    writer.write({k: v for k, v in full.items() if k != "summary"})
    jac = bench_input_jacobian(SentenceEncoder, enc, x, 5, args.tol)
    writer.write(jac)
    hes = bench_hessian_top(enc, x, y, loss_fn, args.tol)
    writer.write(hes)

    print(f"machine: {machine['cpu_model']} ({machine.get('logical_cores', os.cpu_count())} logical cores), "
          f"torch {torch.__version__}; all-MiniLM-L6-v2, {B} sentences, {x.shape[1]} tokens\n")
    rows = [
        {"op": "input Jacobian top-5 (all samples)", "spec": harness.fmt_time(jac["specfast_s"]),
         "base": f"{harness.fmt_time(jac['baseline_s'])} ({jac['baseline']})", "ratio": f"{jac['speedup']:.1f}x",
         "acc": f"max |Δσ|/σ₁ {jac['max_rel_err']:.1e} ({jac['products']} products)"},
        {"op": "Hessian top eigenvalue", "spec": harness.fmt_time(hes["specfast_s"]),
         "base": f"{harness.fmt_time(hes['baseline_s'])} ({hes['baseline']})", "ratio": f"{hes['speedup']:.1f}x",
         "acc": f"rel err {hes['specfast_rel_err']:.1e} ({hes['products']} HVPs) vs "
                f"{hes['baseline_rel_err']:.1e} ({hes['baseline_products']} HVPs)"},
    ]
    print(harness.format_table(rows, [("op", "operation"), ("spec", "specfast"), ("base", "baseline"),
                                      ("ratio", "speedup"), ("acc", "accuracy (specfast vs baseline)")]))
    print(f"\nfull report (`specfast stability`): {full['wall_s']:.1f} s, peak RSS {full['peak_gib']:.2f} GiB")
    ok_t, ok_m = full["wall_s"] < GOAL_SECONDS, full["peak_gib"] < GOAL_GIB
    print(f"goals: full report < {GOAL_SECONDS:.0f} s: {'met' if ok_t else 'MISSED'}; "
          f"peak < {GOAL_GIB:.0f} GiB: {'met' if ok_m else 'MISSED'}" + (" (smoke sizes: not meaningful)" if args.smoke
                                                                            else ""))
    writer.write({"kind": "summary", "goal_time_met": ok_t, "goal_memory_met": ok_m})
    print("\n" + full["summary"])


if __name__ == "__main__":
    main()
