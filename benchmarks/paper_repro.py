"""Reproduction of the paper's experiment (arXiv 2602.01136): does modest spectral regularisation
improve attribution stability even when global spectral summaries change little?

For each dataset × architecture × regulariser strength λ × seed, train from scratch, then measure on
held-out test images:
  - test accuracy;
  - the GMSI and its components (specfast.stability.analyze on a fixed test batch);
  - weight spectral summaries (σ₁ per layer, Σσ₁², log10 Πσ₁, stable rank, spectral entropy);
  - attribution stability (specfast.attribution.attribution_stability) of saliency and integrated
    gradients under Gaussian input noise of std ε (standardised pixels): relative L2 change, cosine,
    top-k overlap, Spearman, max-sensitivity;
  - the per-sample link between saliency instability and the input Jacobian's norm and entropy.
Results are written as JSON lines as each run finishes (a re-run skips the runs already in the file),
then aggregated to mean ± std over seeds in a Markdown table.

Data, all offline: full Fashion-MNIST (IDX files: Debian `dataset-fashion-mnist` or --fashion-dir),
scikit-learn's real handwritten digits, CIFAR-10/100 binary files from --cifar-dir (skipped when
absent). Regulariser: the weight spectral-norm penalty λ Σ_l σ₁(W_l)² (specfast.nn.WeightSpectralPenalty);
--full adds the input-Jacobian spectral penalty.

    cd /tmp && python /work/main/benchmarks/paper_repro.py                 # default (< 15 min, 2-core CPU)
    cd /tmp && python /work/main/benchmarks/paper_repro.py --full --cifar-dir ~/cifar
    cd /tmp && python /work/main/benchmarks/paper_repro.py --smoke         # seconds: checks the script
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402


@dataclass(frozen=True)
class Run:
    dataset: str
    arch: str
    reg: str          # "none", "weight_spectral", "jacobian_spectral"
    lam: float
    seed: int
    epochs: int

    def key(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.reg}/{self.lam:g}/{self.seed}/{self.epochs}"


# ----------------------------------------------------------------------------------------- models
def make_model(arch: str, shape, num_classes: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    c, h, w = shape
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, num_classes))
    if arch == "cnn":
        return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * (h // 4) * (w // 4), num_classes))
    raise ValueError(f"paper_repro: arch must be 'mlp' or 'cnn'; got {arch!r}")


def load(name: str, args):
    from specfast import datasets

    if name == "fashion_mnist":
        return datasets.load_fashion_mnist(args.fashion_dir)
    if name == "digits":
        return datasets.load_digits()
    if name in ("cifar10", "cifar100"):
        return datasets.load_cifar(args.cifar_dir, 10 if name == "cifar10" else 100)
    raise ValueError(f"paper_repro: unknown dataset {name!r}")


def standardise(split, smoke: bool):
    """Scalar mean/std of the training pixels; --smoke keeps a small subset."""
    mean, std = float(split.x_train.mean()), float(split.x_train.std())
    xtr, ytr, xte, yte = split.x_train, split.y_train, split.x_test, split.y_test
    if smoke:
        xtr, ytr, xte, yte = xtr[:512], ytr[:512], xte[:256], yte[:256]
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


# ----------------------------------------------------------------------------------------- training
def train(model, xtr, ytr, run: Run, args):
    import torch
    from torch import nn

    from specfast.nn import WeightSpectralPenalty, jacobian_spectral_penalty

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(run.seed)
    pen = WeightSpectralPenalty(model) if run.reg == "weight_spectral" and run.lam > 0 else None
    ce = nn.CrossEntropyLoss()
    steps, t0 = 0, time.perf_counter()
    model.train()
    for _ in range(run.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), args.batch_size):
            idx = perm[i: i + args.batch_size]
            x, y = xtr[idx], ytr[idx]
            loss = ce(model(x), y)
            if pen is not None:
                loss = loss + run.lam * pen.penalty()
            elif run.reg == "jacobian_spectral" and run.lam > 0:
                loss = loss + run.lam * jacobian_spectral_penalty(model, x[: args.jac_batch], generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    model.eval()
    return {"train_steps": steps, "train_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------- measurements
def weight_summaries(model) -> dict:
    import torch

    import specfast

    mats = [m.weight.detach().reshape(m.weight.shape[0], -1) for m in model.modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    sig = [float(specfast.spectral_norm(W)) for W in mats]
    srank = [float(specfast.stable_rank(W)) for W in mats]
    ent = [float(specfast.spectral_entropy(W, method="exact")) for W in mats]
    return {"sigma_max": max(sig), "sum_sigma_sq": sum(s * s for s in sig),
            "log10_prod_sigma": sum(math.log10(s) for s in sig), "mean_stable_rank": sum(srank) / len(srank),
            "mean_weight_entropy": sum(ent) / len(ent), "sigmas": sig}


def measure(model, xte, yte, run: Run, args) -> dict:
    import torch

    from specfast.attribution import attribution_stability, spectral_link
    from specfast.stability import analyze

    out = {}
    with torch.no_grad():
        pred = torch.cat([model(xte[i: i + 2048]).argmax(1) for i in range(0, len(xte), 2048)])
    out["test_acc"] = float((pred == yte).double().mean())
    g = torch.Generator().manual_seed(1234)          # the same evaluation images for every run
    idx = torch.randperm(len(xte), generator=g)
    ev = idx[: args.eval_samples]
    xa, ya = xte[ev], yte[ev]
    t = time.perf_counter()
    rep = analyze(model, xa[: args.gmsi_samples], ya[: args.gmsi_samples], topk=3, tol=1e-3,
                  max_matvecs=args.max_matvecs, entropy_probes=2, entropy_steps=10, trace_matvecs=12,
                  attribution=False, seed=0)
    out["gmsi"] = rep.gmsi
    for k, v in rep.components.items():
        out[f"gmsi_{k}"] = v
    out["jac_norm_median"] = float(rep.per_sample["jac_norm"].median())
    out["jac_entropy_median"] = float(rep.per_sample["jac_entropy"].median())
    out["analyze_s"] = time.perf_counter() - t
    out.update({f"w_{k}": v for k, v in weight_summaries(model).items()})
    d = xa[0].numel()
    k = max(5, d // 16)
    t = time.perf_counter()
    for method, kw in (("saliency", {}), ("integrated_gradients", {"steps": args.ig_steps})):
        df = attribution_stability(model, xa, ya, method=method, eps=args.eps, kind="gaussian",
                                   num_samples=args.perturbations, k=k,
                                   generator=torch.Generator().manual_seed(99), method_kwargs=kw)
        short = "sal" if method == "saliency" else "ig"
        for col in ("relative_l2", "cosine", "topk_overlap", "spearman", "max_sensitivity"):
            out[f"{short}_{col}"] = float(df[col].mean())
        if method == "saliency":
            link = spectral_link(df.iloc[: args.gmsi_samples].reset_index(drop=True), rep.per_sample,
                                 metric="relative_l2", against=("jac_norm", "jac_entropy"))
            for col in ("jac_norm", "jac_entropy"):
                out[f"link_spearman_{col}"] = link[col]["spearman"]
    out["attribution_s"] = time.perf_counter() - t
    return out


# ----------------------------------------------------------------------------------------- aggregation
COLUMNS = [("test_acc", "acc", 3), ("gmsi", "GMSI", 2), ("gmsi_forward", "c_fwd", 3), ("gmsi_parameter", "c_par", 3),
           ("gmsi_ntk", "κ(NTK)", 3), ("gmsi_curvature", "c_curv", 3), ("w_sigma_max", "max σ₁", 3),
           ("w_log10_prod_sigma", "log10 Πσ₁", 2), ("w_mean_stable_rank", "srank", 3)] + [
    (f"{m}_{col}", f"{label} {name}", 3) for m, label in (("sal", "sal"), ("ig", "IG"))
    for col, name in (("relative_l2", "ΔL2"), ("cosine", "cos"), ("topk_overlap", "top-k"), ("spearman", "ρ"),
                      ("max_sensitivity", "maxsens"))] + [
    ("link_spearman_jac_norm", "ρ(ΔL2, ‖J‖)", 2), ("link_spearman_jac_entropy", "ρ(ΔL2, H)", 2)]


def aggregate(records: list[dict]):
    import numpy as np

    groups: dict = {}
    for r in records:
        groups.setdefault((r["dataset"], r["arch"], r["reg"], r["lam"], r["epochs"]), []).append(r)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] != "none", k[2], k[3])):
        rs = groups[key]
        row = {"dataset": key[0], "arch": key[1], "reg": key[2], "lam": key[3], "seeds": len(rs)}
        for col, _, _ in COLUMNS:
            vals = np.array([r[col] for r in rs if r.get(col) is not None], dtype=float)
            row[col] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"))
        rows.append(row)
    return rows


def markdown(rows) -> str:
    head = "| data | arch | reg | λ | n | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (5 + len(COLUMNS))]
    for r in rows:
        cells = []
        for col, _, digits in COLUMNS:
            m, s = r[col]
            cells.append("—" if math.isnan(m) else (f"{m:.{digits}g} ± {s:.2g}" if not math.isnan(s) else f"{m:.{digits}g}"))
        lines.append(f"| {r['dataset']} | {r['arch']} | {r['reg']} | {r['lam']:g} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows) -> str:
    """Relative change of each regularised configuration against λ = 0 of the same data and arch."""
    out = []
    base = {(r["dataset"], r["arch"]): r for r in rows if r["reg"] == "none"}
    for r in rows:
        b = base.get((r["dataset"], r["arch"]))
        if r["reg"] == "none" or b is None:
            continue

        def rel(col):
            return (r[col][0] - b[col][0]) / abs(b[col][0]) if b[col][0] else float("nan")

        out.append(f"{r['dataset']}/{r['arch']} {r['reg']} λ={r['lam']:g}: saliency ΔL2 {rel('sal_relative_l2'):+.0%}, "
                   f"IG ΔL2 {rel('ig_relative_l2'):+.0%}, top-k overlap {rel('sal_topk_overlap'):+.0%}; "
                   f"GMSI {r['gmsi'][0] - b['gmsi'][0]:+.2f} (log10 units), max σ₁ {rel('w_sigma_max'):+.0%}, "
                   f"accuracy {r['test_acc'][0] - b['test_acc'][0]:+.3f}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- main
def plan(args) -> list[Run]:
    datasets = list(args.datasets)
    if args.cifar_dir:
        from specfast.datasets import cifar_available

        for name, nc in (("cifar10", 10), ("cifar100", 100)):
            if cifar_available(args.cifar_dir, nc):
                datasets.append(name)
            else:
                print(f"skipping {name}: no CIFAR-{nc} binary files in {args.cifar_dir}")
    regs = [("none", 0.0)] + [("weight_spectral", lam) for lam in args.lambdas]
    if args.full or args.jacobian:
        regs += [("jacobian_spectral", lam) for lam in args.jac_lambdas]
    runs = []
    for ds in datasets:
        for arch in args.archs:
            epochs = args.epochs.get((ds, arch), args.epochs.get(ds, 2))
            for reg, lam in regs:
                for seed in args.seeds:
                    runs.append(Run(ds, arch, reg, lam, seed, 1 if args.smoke else epochs))
    return runs


def main():
    removed = harness.prepare_process()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="paper_repro", help="output directory (results.jsonl, table.md)")
    ap.add_argument("--full", action="store_true", help="more λ, the Jacobian penalty, more epochs")
    ap.add_argument("--jacobian", action="store_true",
                    help="add the input-Jacobian spectral penalty (λ 1e-3, 1e-2) to the default runs (~+9 min)")
    ap.add_argument("--smoke", action="store_true", help="tiny subsets, 1 epoch, 2 seeds: checks the script")
    ap.add_argument("--fashion-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    ap.add_argument("--cifar-dir", default=None, help="directory of the CIFAR-10/100 binary files")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(torch.get_num_threads())
    a.datasets = ["fashion_mnist", "digits"]
    a.archs = ["mlp", "cnn"]
    a.lambdas = [1e-3, 1e-2, 1e-1] if not a.full else [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    a.jac_lambdas = [1e-3, 1e-2]
    a.seeds = a.seeds or ([0, 1] if a.smoke else [0, 1, 2] if not a.full else [0, 1, 2, 3, 4])
    # epochs per dataset (and per (dataset, arch) where the CNN's cost differs): the default keeps the
    # whole run under 15 minutes on a 2-core CPU
    a.epochs = {("fashion_mnist", "mlp"): 5, ("fashion_mnist", "cnn"): 3, "digits": 40, "cifar10": 5,
                "cifar100": 5} if not a.full else \
        {("fashion_mnist", "mlp"): 20, ("fashion_mnist", "cnn"): 10, "digits": 100, "cifar10": 15, "cifar100": 15}
    a.lr, a.batch_size, a.jac_batch = 1e-3, 128, 32
    a.eps, a.perturbations, a.ig_steps = 0.1, 8 if not a.smoke else 2, 16 if not a.smoke else 4
    a.eval_samples, a.gmsi_samples, a.max_matvecs = (256, 64, 40) if not a.smoke else (32, 16, 12)
    if a.smoke:
        a.datasets = ["digits"]
        a.lambdas = [1e-2]
        a.full, a.jac_lambdas = True, [1e-2]     # the Jacobian-penalty path runs too

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.jsonl")
    done = {}
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            done[r["key"]] = r
    machine = harness.machine_record(os.path.dirname(HERE), removed)
    runs = plan(a)
    print(f"{len(runs)} runs ({len(done)} already in {path}); machine: {machine['cpu_model']} "
          f"({machine['logical_cpus']} logical cores), torch {torch.__version__}", flush=True)
    t_all = time.perf_counter()
    data = {}
    records = []
    for i, run in enumerate(runs):
        if run.key() in done:
            records.append(done[run.key()])
            continue
        if run.dataset not in data:
            split = load(run.dataset, a)
            data[run.dataset] = (standardise(split, a.smoke), split.num_classes)
        (xtr, ytr, xte, yte), nc = data[run.dataset]
        t = time.perf_counter()
        model = make_model(run.arch, tuple(xtr.shape[1:]), nc, run.seed)
        rec = {"key": run.key(), **asdict(run)}
        rec.update(train(model, xtr, ytr, run, a))
        rec.update(measure(model, xte, yte, run, a))
        rec["run_s"] = time.perf_counter() - t
        rec["machine"] = {k: machine[k] for k in ("cpu_model", "logical_cpus", "torch", "git_revision") if k in machine}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
        print(f"[{i + 1}/{len(runs)} {time.perf_counter() - t_all:6.0f} s] {run.key()}: acc {rec['test_acc']:.3f}, "
              f"GMSI {rec['gmsi']:.2f}, saliency ΔL2 {rec['sal_relative_l2']:.3f}, IG ΔL2 {rec['ig_relative_l2']:.3f} "
              f"({rec['run_s']:.1f} s)", flush=True)
    rows = aggregate(records)
    table = markdown(rows)
    ver = verdict(rows)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n\n" + ver + "\n")
    print(table)
    print(ver)
    print(f"total {time.perf_counter() - t_all:.0f} s; results in {path}, table in {os.path.join(a.out, 'table.md')}")


if __name__ == "__main__":
    main()
