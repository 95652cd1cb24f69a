"""Command line: ``specfast info`` (also ``python -m specfast``)."""
from __future__ import annotations

import argparse
import os
import platform
import sys


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specfast", description="Fast, certified spectral linear "
                                     "algebra on neural-network weights.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="build and runtime facts, and the backend of every op")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        print("\n".join(info_lines()))
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
