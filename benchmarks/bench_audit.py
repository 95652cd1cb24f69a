"""specfast audit against WeightWatcher's analyze(), side by side in one run.

Builds a Llama-architecture checkpoint from a config (default: the TinyLlama-1.1B shape — hidden 2048,
MLP 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000; 1.1 B parameters; transformers' own random
initialisation), saves it as safetensors, then runs, each in its own subprocess so peak memory is
its own:

  1. ``specfast.audit(dir)``                       default metrics (σ₁ + top-5 certified, ‖W‖_F, stable
                                                  rank, entropy, heads), streamed from the files
  2. ``specfast.audit(dir, metrics=[...,"alpha"])``  full spectrum, WeightWatcher's power-law fit
  3. ``weightwatcher.WeightWatcher(model).analyze()`` on the same checkpoint loaded with
                                                  ``from_pretrained`` (WeightWatcher needs a module)

and reports wall time, peak RSS, the speedups, and the agreement of spectral_norm, log_spectral_norm,
stable_rank and alpha on the layers both audit (plus the tensors WeightWatcher skips).

    cd /tmp && python /path/to/repo/benchmarks/bench_audit.py            # ~10 min on 2 cores
    cd /tmp && python /path/to/repo/benchmarks/bench_audit.py --init heavy-tailed   # trained-like spectra
    cd /tmp && python /path/to/repo/benchmarks/bench_audit.py --smoke    # tiny model, seconds
Results: bench_results/audit.jsonl (one line per method and a summary line, with the machine record).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

CHILD = r'''
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"
mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
import torch
t0 = time.perf_counter()
if mode.startswith("specfast"):
    import specfast
    t0 = time.perf_counter()   # both sides timed from the library imported to the table returned
    metrics = None if mode == "specfast_default" else ["sigma", "frobenius", "stable_rank", "entropy", "alpha", "nonfinite"]
    res = specfast.audit(path, metrics=metrics)
    df = res.df
    cols = [c for c in ("tensor", "name", "status", "role", "sigma_1", "spectral_norm", "log_spectral_norm",
                        "stable_rank", "alpha", "converged", "sigma_1_error") if c in df]
    rows = df[cols].to_dict("records")
else:
    import contextlib, io, transformers
    with contextlib.redirect_stdout(io.StringIO()):   # its import prints about SciPy and CUDA
        import weightwatcher as ww
    archs = transformers.AutoConfig.from_pretrained(path).architectures or []
    # a causal LM keeps its head; anything else (e.g. an encoder such as BERT) loads as the bare
    # model, whose parameter names are those of the file
    auto = (transformers.AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs)
            else transformers.AutoModel)
    model = auto.from_pretrained(path, dtype=torch.float32)
    t0 = time.perf_counter()   # WeightWatcher's time starts with the model in memory (its best case)
    df = ww.WeightWatcher(model=model).analyze()
    df["tensor"] = df["longname"] + ".weight"
    rows = df[["tensor", "spectral_norm", "log_spectral_norm", "stable_rank", "alpha"]].to_dict("records")
seconds = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child would report the
# parent's peak (the checkpoint builder's); VmHWM belongs to this process's own address space.
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) * 1024
json.dump({"seconds": seconds, "peak_rss": rss, "rows": rows}, open(out, "w"), default=str)
'''


def plant_heavy_tailed(model, gamma: float = 0.5, seed: int = 0) -> None:
    """Replace every 2-D weight by U diag(s) Vᵀ with random orthonormal U, V and a power-law
    spectrum s_i ∝ (1 + i)^(−gamma), scaled to the random initialisation's Frobenius norm.

    Trained transformer weights have heavy-tailed spectra with separated top singular values (their
    WeightWatcher alpha is typically 2–6); transformers' random initialisation has the gapless
    Marchenko–Pastur bulk, the worst case for Krylov methods. gamma = 0.5 gives the eigenvalues
    λ_i ∝ i^(−1), an ESD tail exponent near 2."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            m, n = p.shape
            k = min(m, n)
            U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
            V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
            s = (1.0 + torch.arange(k, dtype=torch.float32)) ** (-gamma)
            s *= p.float().norm() / s.norm()
            p.copy_(((U * s) @ V.T).to(p.dtype))


def build_checkpoint(d: str, layers: int, smoke: bool, dtype: str, init: str = "random") -> dict:
    import torch
    import transformers

    os.environ["HF_HUB_OFFLINE"] = "1"
    if smoke:
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    else:
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                                       tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    if init == "heavy-tailed":
        plant_heavy_tailed(model)
    nparams = sum(p.numel() for p in model.parameters())
    model.save_pretrained(d, max_shard_size="2GB")
    del model
    return {"params": nparams, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size, "dtype": dtype, "init": init}


def run_child(mode: str, path: str, tmp: str) -> dict:
    out = os.path.join(tmp, f"{mode}.json")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, mode, path, out], check=True, cwd=tmp)
    res = json.load(open(out))
    res["wall_with_startup"] = time.perf_counter() - t
    return res


def agreement(a_rows, b_rows, cols) -> dict:
    import numpy as np
    import pandas as pd

    a = pd.DataFrame(a_rows)
    a = a[a.status == "audited"].set_index("tensor")
    b = pd.DataFrame(b_rows).set_index("tensor")
    common = a.index.intersection(b.index)
    out = {"common": int(len(common)), "only_specfast": sorted(set(a.index) - set(b.index)),
           "only_weightwatcher": sorted(set(b.index) - set(a.index))}
    for c in cols:
        if c in a and c in b:
            x, y = a.loc[common, c].astype(float), b.loc[common, c].astype(float)
            rel = ((x - y).abs() / y.abs().clip(lower=1e-300)).replace([np.inf], np.nan)
            out[c] = {"max_rel_diff": float(rel.max()), "worst": str(rel.idxmax()) if rel.notna().any() else None}
    return out


def main():
    removed = harness.prepare_process()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny Llama: checks the script, times nothing useful")
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B shape)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="checkpoint dtype")
    ap.add_argument("--init", default="random", choices=("random", "heavy-tailed"),
                    help="random: transformers' initialisation (Marchenko-Pastur bulk, no spectral gap: the "
                    "worst case for Krylov); heavy-tailed: planted power-law spectra like trained weights")
    ap.add_argument("--model", metavar="DIR", help="benchmark this Hugging Face model directory instead of "
                    "building one (e.g. the default model: python -c 'import specfast.auditor as a; "
                    "print(a.default_model_path())')")
    ap.add_argument("--skip-weightwatcher", action="store_true")
    ap.add_argument("--out", default=os.path.join("bench_results", "audit_smoke.jsonl" if "--smoke" in sys.argv
                                                  else "audit.jsonl"))
    args = ap.parse_args()
    harness.require_native_specfast(os.path.dirname(HERE))
    machine = harness.machine_record(os.path.dirname(HERE), removed)
    writer = harness.ResultWriter(args.out, machine, {"mode": "smoke" if args.smoke else "full"})
    with tempfile.TemporaryDirectory(prefix="specfast-bench-audit-") as tmp:
        t = time.perf_counter()
        if args.model:
            ckpt = os.path.abspath(args.model)
            info = {"model": ckpt}
            print(f"checkpoint: {ckpt}", flush=True)
        else:
            ckpt = os.path.join(tmp, "llama")
            info = build_checkpoint(ckpt, args.layers, args.smoke, args.dtype, args.init)
            print(f"checkpoint: Llama {info['params'] / 1e9:.3f} B params ({info['layers']} layers, hidden "
                  f"{info['hidden']}, MLP {info['intermediate']}), {args.init} init, {args.dtype} safetensors, "
                  f"built in {time.perf_counter() - t:.0f} s", flush=True)
        results = {}
        modes = ["specfast_default", "specfast_full"] + ([] if args.skip_weightwatcher else ["weightwatcher"])
        import importlib.util

        if importlib.util.find_spec("weightwatcher") is None:  # not imported here: its import has side effects
            modes = modes[:2]
            print("weightwatcher is not installed: pip install 'weightwatcher==0.7.*' for the comparison")
        for mode in modes:
            r = run_child(mode, ckpt, tmp)
            results[mode] = r
            print(f"  {mode:18s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss'] / 2**30:5.2f} GiB", flush=True)
            writer.write({"kind": "audit", "method": mode, "seconds": r["seconds"], "peak_rss": r["peak_rss"],
                          "checkpoint": info})
        summary = {"kind": "summary", "checkpoint": info}
        if "weightwatcher" in results:
            ww = results["weightwatcher"]
            for mode in ("specfast_default", "specfast_full"):
                summary[f"speedup_{mode}"] = ww["seconds"] / results[mode]["seconds"]
            summary["agreement_default"] = agreement(results["specfast_default"]["rows"], ww["rows"],
                                                     ("spectral_norm", "log_spectral_norm", "stable_rank"))
            summary["agreement_full"] = agreement(results["specfast_full"]["rows"], ww["rows"],
                                                  ("spectral_norm", "log_spectral_norm", "stable_rank", "alpha"))
            summary["goals"] = {
                "default audit >= 20x faster": summary["speedup_specfast_default"] >= 20,
                "full (alpha) >= 2x faster": summary["speedup_specfast_full"] >= 2,
                "spectral_norm/log/stable_rank within 1e-4": all(
                    summary["agreement_default"][c]["max_rel_diff"] <= 1e-4
                    for c in ("spectral_norm", "log_spectral_norm", "stable_rank")),
                "same alpha (1e-6 relative)": summary["agreement_full"]["alpha"]["max_rel_diff"] <= 1e-6,
            }
            print(f"\nspeedup vs WeightWatcher analyze(): default audit {summary['speedup_specfast_default']:.1f}x, "
                  f"full spectrum + alpha {summary['speedup_specfast_full']:.1f}x")
            for k in ("agreement_default", "agreement_full"):
                ag = summary[k]
                cols = {c: f"{v['max_rel_diff']:.1e}" for c, v in ag.items() if isinstance(v, dict)}
                print(f"{k}: {ag['common']} common matrices, max relative difference {cols}")
            print(f"tensors audited by specfast that WeightWatcher skips: {summary['agreement_default']['only_specfast']}")
            print("goals:", json.dumps(summary["goals"]))
        writer.write(summary)
    print(f"results appended to {args.out}")


if __name__ == "__main__":
    main()
