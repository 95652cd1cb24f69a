"""Command line: ``specfast info | audit | compare | stability`` (also ``python -m specfast``)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info_lines() -> list[str]:
    import torch

    from . import __version__, build_info
    from ._native import has_native_cpu, has_native_cuda, strict
    from .ops import ALL_OPS

    b = build_info()
    lines = [f"specfast {__version__}", "", "build:"]
    if not b.get("native"):
        lines.append(f"  native module: MISSING ({b.get('error')}) -> pure-torch reference on every device")
    else:
        lines += [
            f"  native module: yes ({b['compiler']}; CPU kernels dispatched to {b['cpu_isa']})",
            f"  openmp: {b['openmp']} (max threads {b['openmp_max_threads']})",
            f"  accumulation: {b['accumulation']}",
            f"  cuda: {b['cuda']}" + (f" (archs {b['cuda_archs']}, nvcc {b['cuda_version']}, "
                                      f"{b.get('cuda_device_count', 0)} device(s) visible to its runtime)"
                                      if b["cuda"] else ""),
        ]
    lines += ["", "runtime:",
              f"  python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}",
              f"  cpu: {_cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
              f"  torch.cuda.is_available(): {torch.cuda.is_available()}"
              + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
              f"  SPECFAST_STRICT: {'1' if strict() else '0'}", "", "backends (op: cpu / cuda):"]
    cpu = "native C++" if has_native_cpu() else "reference (fallback, warns)"
    cuda = "native CUDA" if has_native_cuda() else "reference (fallback, warns)"
    for name in ALL_OPS:
        lines.append(f"  specfast::{name}: {cpu} / {cuda}")
    return lines


def _add_audit_options(p: argparse.ArgumentParser, compare: bool = False):
    from .auditor import ALL_METRICS, DEFAULT_METRICS

    p.add_argument("--out", metavar="DIR", help="results directory (rows are appended as each group "
                   "finishes; default: ./specfast-audit/<model name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted audit in --out")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    p.add_argument("--max-memory", default="4GiB", metavar="SIZE",
                   help="budget for tensors in flight, e.g. 4GiB, 512MiB (default 4GiB)")
    p.add_argument("--metrics", default=",".join(m for m in DEFAULT_METRICS if not (compare and m == "heads")),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (alpha implies --spectrum full)")
    p.add_argument("--topk", type=int, default=5, help="singular values per matrix (default 5)")
    p.add_argument("--tol", type=float, default=1e-4, help="certified relative accuracy of σ (default 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .bin/.pt checkpoints with torch.load(weights_only=True) (refused otherwise)")
    p.add_argument("--format", default="parquet,csv,json", help="output formats (parquet, csv, json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if not compare:
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--spectrum", default="krylov", choices=("krylov", "full"),
                       help="krylov: certified top-k (fast); full: every eigenvalue (WeightWatcher alpha)")
        p.add_argument("--base", metavar="MODEL", help="for a PEFT adapter: the base model, for relative changes")


def _default_out(path) -> Path:
    name = Path(str(path)).name or "model"
    return Path("specfast-audit") / name


def _print_summary(res, out_dir, seconds):
    df, summary = res
    counts = summary.get("status_counts", {})
    print(f"\n{summary['source']}: {summary['tensors']} tensors -> {len(df)} rows "
          + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" in {seconds:.1f} s")
    a = df[df.status == "audited"] if len(df) else df
    if len(a) and "sigma_1" in a:
        g = a.groupby("role").agg(count=("name", "size"), sigma_1_median=("sigma_1", "median"),
                                 sigma_1_max=("sigma_1", "max"), stable_rank_median=("stable_rank", "median"))
        if "spectral_entropy" in a:
            g["entropy_median"] = a.groupby("role").spectral_entropy.median()
        if "alpha" in a:
            g["alpha_median"] = a.groupby("role").alpha.median()
        print(g.to_string(float_format=lambda x: f"{x:.4g}"))
    lip = summary.get("lipschitz") or {}
    if lip.get("bound") is not None:
        print(f"\nLipschitz upper bound: {lip['bound']:.4g} ({lip['kind']})")
        for d in summary.get("dominant_matrices", [])[:5]:
            print(f"  {d['share'] * 100:5.1f}%  {d['name']}")
    if summary.get("outlier_experts"):
        print("\noutlier experts (robust z > 3.5 on log σ₁ or log stable rank):")
        for k, v in summary["outlier_experts"].items():
            print(f"  {k}: {v}")
    bad = df[df.status.isin(["error", "nonfinite"])] if len(df) else df
    for r in bad.head(20).itertuples():
        print(f"  {r.status}: {r.name}: {r.reason}")
    if summary.get("unconverged"):
        print(f"  {summary['unconverged']} matrices did not reach the requested tolerance (see sigma_1_error)")
    files = sorted(p.name for p in Path(out_dir).iterdir() if p.suffix in (".csv", ".parquet", ".json"))
    print(f"\nresults in {out_dir}/ ({', '.join(files)})")


def _run_audit(args) -> int:
    from . import auditor as audit_mod

    path = args.path
    if path is None:
        path = audit_mod.default_model_path()
        print(f"auditing the built-in default model all-MiniLM-L6-v2 ({path})", file=sys.stderr)
    out = Path(args.out) if args.out else (_default_out(path) if args.path else Path("specfast-audit/all-MiniLM-L6-v2"))
    t0 = time.perf_counter()
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    progress = not args.no_progress and sys.stderr.isatty()
    if args.command == "compare":
        res = audit_mod.compare(args.base_model, args.path, out_dir=out, resume=args.resume,
                                overwrite=args.overwrite, metrics=metrics, topk=args.topk, tol=args.tol,
                                max_memory=args.max_memory, seed=args.seed, allow_pickle=args.allow_pickle,
                                progress=progress)
    else:
        res = audit_mod.audit(path, out_dir=out, resume=args.resume, overwrite=args.overwrite, metrics=metrics,
                              topk=args.topk, tol=args.tol, spectrum=args.spectrum, max_memory=args.max_memory,
                              device=args.device, seed=args.seed, allow_pickle=args.allow_pickle,
                              base=args.base, progress=progress)
    fmts = {f.strip() for f in args.format.split(",")}
    if "json" in fmts:
        res.df.to_json(out / "audit.json", orient="records", indent=1, default_handler=str)
    for f in ("parquet", "csv"):
        if f not in fmts:
            (out / f"audit.{f}").unlink(missing_ok=True)
    _print_summary(res, out, time.perf_counter() - t0)
    return 0


def _run_stability(args) -> int:
    import resource

    import torch

    from .stability import analyze
    from .stability.sentence import load_default

    torch.manual_seed(args.seed)
    sentences = None
    if args.sentences:
        path = Path(args.sentences)
        if not path.is_file():
            raise ValueError(f"--sentences: no such file {path}")
        sentences = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    name = Path(args.model).name if args.model else "all-MiniLM-L6-v2"
    out = Path(args.out) if args.out else Path("specfast-stability") / name
    t0 = time.perf_counter()
    enc, inputs, targets, loss_fn, sents = load_default(args.model, sentences, args.batch_size)
    print(f"stability of {name} on {len(sents)} sentences ({inputs.shape[1]} tokens, pairs of paraphrases; "
          f"loss: in-batch ranking)", file=sys.stderr)
    log = (lambda s: print(f"  [{time.perf_counter() - t0:6.1f} s] {s}", file=sys.stderr)) if not args.quiet else None
    # finished sections are kept in the checkpoint, so an interrupted run continues with --resume
    checkpoint = out / "checkpoint.pt"
    if not args.resume:
        checkpoint.unlink(missing_ok=True)
    report = analyze(enc, inputs, targets, loss_fn, topk=args.topk, tol=args.tol, max_matvecs=args.max_matvecs,
                     entropy_probes=args.entropy_probes, entropy_steps=args.entropy_steps,
                     trace_matvecs=args.trace_matvecs, ntk=not args.no_ntk, hessian=not args.no_hessian,
                     attribution=not args.no_attribution, seed=args.seed, checkpoint=checkpoint, log=log)
    paths = report.save(out)
    checkpoint.unlink(missing_ok=True)
    (out / "sentences.txt").write_text("\n".join(sents) + "\n")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB (Linux)
    print(report.summary())
    print(f"\n{time.perf_counter() - t0:.1f} s, peak memory {peak:.2f} GiB; results in {out}/ "
          f"({', '.join(p.name for p in paths)}, sentences.txt)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specfast", description="Fast, certified spectral linear "
                                     "algebra on neural-network weights.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="build and runtime facts, and the backend of every op")
    pa = sub.add_parser("audit", help="spectral health of every matrix of a checkpoint or model directory")
    pa.add_argument("path", nargs="?", help="a .safetensors file, a Hugging Face model directory, a PEFT "
                    "adapter directory or (with --allow-pickle) a .bin/.pt file; default: the built-in "
                    "all-MiniLM-L6-v2")
    _add_audit_options(pa)
    pc = sub.add_parser("compare", help="spectrum of W_tuned − W_base for every matrix of two checkpoints")
    pc.add_argument("base_model", metavar="BASE")
    pc.add_argument("path", metavar="TUNED")
    _add_audit_options(pc, compare=True)
    ps = sub.add_parser("stability", help="matrix-spectral stability report (input Jacobian, NTK, Hessian, GMSI) "
                        "of a sentence encoder; default: the built-in all-MiniLM-L6-v2 on 32 sentences")
    ps.add_argument("--model", metavar="DIR", help="a BERT-family Hugging Face model directory "
                    "(default: the built-in all-MiniLM-L6-v2)")
    ps.add_argument("--sentences", metavar="FILE", help="one sentence per line; lines 2i and 2i+1 are "
                    "paraphrases (the ranking loss's positives); default: 16 built-in pairs")
    ps.add_argument("--batch-size", type=int, default=32, help="sentences analysed (default 32)")
    ps.add_argument("--out", metavar="DIR", help="results directory (default ./specfast-stability/<model>)")
    ps.add_argument("--topk", type=int, default=5, help="eigen/singular values per operator (default 5)")
    ps.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative residual target (default 1e-3)")
    ps.add_argument("--max-matvecs", type=int, default=100, help="products per Lanczos run (default 100)")
    ps.add_argument("--entropy-probes", type=int, default=4, help="SLQ probes per entropy (default 4)")
    ps.add_argument("--entropy-steps", type=int, default=15, help="SLQ Lanczos steps per probe (default 15)")
    ps.add_argument("--trace-matvecs", type=int, default=30, help="Hutch++ products for the Hessian trace")
    ps.add_argument("--no-ntk", action="store_true", help="skip the parameter Jacobian and NTK")
    ps.add_argument("--no-hessian", action="store_true", help="skip the loss Hessian")
    ps.add_argument("--no-attribution", action="store_true", help="skip the attribution curvature")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (its finished "
                    "sections are kept in checkpoint.pt)")
    ps.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        print("\n".join(info_lines()))
        return 0
    if args.command in ("audit", "compare"):
        from .auditor import CheckpointError

        try:
            return _run_audit(args)
        except (CheckpointError, FileExistsError, ValueError, TypeError) as e:
            print(f"specfast {args.command}: error: {e}", file=sys.stderr)
            return 2
    if args.command == "stability":
        from .stability import StabilityError

        for name in ("batch_size", "topk", "max_matvecs", "entropy_probes", "entropy_steps", "trace_matvecs"):
            if getattr(args, name) < 1:
                print(f"specfast stability: error: --{name.replace('_', '-')} must be >= 1; got "
                      f"{getattr(args, name)}", file=sys.stderr)
                return 2
        try:
            return _run_stability(args)
        except (StabilityError, ValueError, OSError) as e:
            print(f"specfast stability: error: {e}", file=sys.stderr)
            return 2
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
