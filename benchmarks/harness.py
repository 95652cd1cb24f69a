"""Shared benchmark harness for specfast.

What every benchmark script gets from here:

* ``prepare_process()``   — call first, before numpy/scipy/torch are imported: removes the
  ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` overrides from *this process only* (by re-exec'ing the
  interpreter with a cleaned environment) and remembers what was removed for the machine record.
* ``machine_record()``    — CPU model, cores, GPU, torch/numpy/scipy versions, ``specfast.build_info()``,
  BLAS kernel (threadpoolctl, or a direct OpenBLAS query), git revision, date.
* ``read_bandwidth()``    — STREAM-style read bandwidth: sum of a large float32 array with torch.sum and
  with numpy, best of several runs; the best is the "measured read bandwidth".
* ``measure()``           — warm-up, repeated runs, median and spread (min, max, IQR); CUDA events when
  the work runs on a GPU. ``measure_interleaved()`` does the same for methods to be compared, in
  alternating rounds, so a change of machine load during the run does not bias their ratios.
* ``check()`` / ``rel_err()`` — assert a result agrees with a float64 reference *before* timing it.
* ``ResultWriter``        — appends one JSON object per result line, each carrying the machine record.
* ``format_table()``      — plain-text table for the console.

numpy and torch are imported inside the functions, never at module import, so that
``prepare_process()`` can still clean the environment before either is loaded.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

# Variables that change which OpenBLAS kernels numpy/scipy use. They may be set on shared machines and
# slow numpy down; the benchmark process (only) runs without them.
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REMOVED_ENV = "SPECFAST_BENCH_REMOVED_ENV"
GIB = 1 << 30


# ----------------------------------------------------------------------------------- process set-up
def prepare_process(keep_blas_env: bool = False) -> dict:
    """Re-exec this interpreter without the OpenBLAS overrides (if any are set and numpy is not loaded).

    Returns the removed variables (also after the re-exec, through an environment marker).
    ``keep_blas_env=True`` leaves the environment alone.
    """
    if keep_blas_env:
        return {}
    present = {k: os.environ[k] for k in BLAS_OVERRIDES if k in os.environ}
    if present:
        if "numpy" in sys.modules or "torch" in sys.modules:
            raise RuntimeError("prepare_process() must run before numpy/torch are imported; "
                               f"{sorted(present)} are still set")
        env = {k: v for k, v in os.environ.items() if k not in BLAS_OVERRIDES}
        env[_REMOVED_ENV] = json.dumps(present)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    return json.loads(os.environ.get(_REMOVED_ENV, "{}"))


def require_native_specfast(repo: str | None = None):
    """Import specfast and exit with an error when the compiled module is missing (e.g. when the
    source tree shadows the installed package)."""
    import specfast

    info = specfast.build_info()
    if not info.get("native"):
        hint = ""
        if repo and os.path.abspath(specfast.__file__).startswith(os.path.abspath(repo) + os.sep):
            hint = (f" (specfast was imported from the source tree {os.path.dirname(specfast.__file__)}; "
                    "install it with `pip install --no-build-isolation .` and run the script from "
                    "another directory, e.g. `cd /tmp && python <repo>/benchmarks/bench_core.py`)")
        sys.exit(f"error: specfast's compiled module is missing: {info.get('error')}{hint}")
    return specfast


# ----------------------------------------------------------------------------------- machine record
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags_of_interest() -> list[str]:
    want = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in flags]
    except OSError:
        pass
    return []


def _cache_sizes() -> dict:
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            p = os.path.join(base, idx)
            try:
                level = open(os.path.join(p, "level")).read().strip()
                typ = open(os.path.join(p, "type")).read().strip()
                size = open(os.path.join(p, "size")).read().strip()
            except OSError:
                continue
            if typ in ("Data", "Unified"):
                out[f"L{level}"] = size
    except OSError:
        pass
    return out


def git_revision(repo: str) -> str:
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def blas_info() -> list[dict]:
    """Which BLAS numpy/scipy loaded and which kernel (core type) it selected.

    threadpoolctl when installed; otherwise ask the loaded OpenBLAS libraries directly (the same
    calls threadpoolctl makes: openblas_get_corename / _get_config / _get_num_threads)."""
    import numpy  # noqa: F401  (make sure the BLAS is loaded)

    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        pass
    try:
        import threadpoolctl

        return [{k: d.get(k) for k in ("internal_api", "prefix", "version", "architecture",
                                       "num_threads", "threading_layer", "filepath")}
                for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        pass
    import ctypes

    libs = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "openblas" in os.path.basename(path).lower() and path not in libs:
                    libs.append(path)
    except OSError:
        return []
    out = []
    for path in libs:
        rec: dict[str, Any] = {"internal_api": "openblas", "filepath": path, "source": "ctypes"}
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            rec["error"] = str(exc)
            out.append(rec)
            continue
        for key, stem, restype in (("architecture", "openblas_get_corename", ctypes.c_char_p),
                                   ("config", "openblas_get_config", ctypes.c_char_p),
                                   ("num_threads", "openblas_get_num_threads", ctypes.c_int)):
            for pre in ("", "scipy_"):
                for suf in ("", "64_"):
                    fn = getattr(lib, pre + stem + suf, None)
                    if fn is None:
                        continue
                    fn.restype = restype
                    val = fn()
                    rec[key] = val.decode() if isinstance(val, bytes) else val
                    break
                if key in rec:
                    break
        out.append(rec)
    return out


def machine_record(repo: str, removed_env: dict | None = None) -> dict:
    import numpy as np
    import torch

    rec: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags_of_interest(),
        "cpu_caches": _cache_sizes(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "git_revision": git_revision(repo),
        "blas_env_removed": removed_env or {},
        "blas": blas_info(),
    }
    try:
        import scipy

        rec["scipy"] = scipy.__version__
    except ImportError:
        rec["scipy"] = None
    if torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name(0)
        rec["cuda_runtime"] = torch.version.cuda
    else:
        rec["gpu"] = None
    try:
        import specfast

        rec["specfast_file"] = specfast.__file__
        rec["specfast_build_info"] = specfast.build_info()
    except ImportError as exc:
        rec["specfast_build_info"] = {"native": False, "error": str(exc)}
    return rec


# ----------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall-clock samples of one measured callable (seconds)."""

    times: list[float]
    warmup: int
    device: str
    note: str = ""
    median: float = field(init=False)
    min: float = field(init=False)
    max: float = field(init=False)
    q1: float = field(init=False)
    q3: float = field(init=False)

    def __post_init__(self):
        ts = sorted(self.times)
        self.median = statistics.median(ts)
        self.min, self.max = ts[0], ts[-1]
        if len(ts) >= 4:
            q = statistics.quantiles(ts, n=4, method="inclusive")
            self.q1, self.q3 = q[0], q[2]
        else:
            self.q1, self.q3 = self.min, self.max

    @property
    def n(self) -> int:
        return len(self.times)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["n"] = self.n
        return d


def _sync(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, float]:
    """Run fn once; return (result, seconds). CUDA: timed with events on the current stream."""
    if device.startswith("cuda"):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 1, repeat: int = 10,
            min_repeat: int = 3, budget_s: float = 5.0, first_result: tuple[Any, float] | None = None,
            single_if_slower_than: float | None = None) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then up to ``repeat`` timed calls, stopping early once
    ``min_repeat`` samples exist and ``budget_s`` seconds have been spent.

    ``first_result=(result, seconds)`` is the caller's own first (checked) call, counted as warm-up.
    If that first call took longer than ``single_if_slower_than`` seconds, it is the only sample
    (recorded in ``note``): very slow baselines (a full SVD) are run once.
    """
    done_warm = 0
    if first_result is not None:
        done_warm = 1
        if single_if_slower_than is not None and first_result[1] > single_if_slower_than:
            return Timing([first_result[1]], warmup=0, device=device,
                          note=f"single run (first call took {first_result[1]:.1f}s)")
    for _ in range(max(0, warmup - done_warm)):
        time_once(fn, device)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < repeat:
        _, dt = time_once(fn, device)
        times.append(dt)
        if len(times) >= min_repeat and time.perf_counter() - t_start > budget_s:
            break
    return Timing(times, warmup=max(warmup, done_warm), device=device)


def measure_interleaved(fns: Sequence[Callable[[], Any]], *, device: str = "cpu", repeat: int = 10,
                        min_repeat: int = 3, budget_s: float = 5.0,
                        first_results: Sequence[tuple[Any, float] | None] | None = None,
                        single_if_slower_than: float | None = None,
                        interleave: bool = False) -> list[Timing]:
    """Time several callables that are to be compared, in interleaved rounds (each round runs every
    callable once, alternating the order), so that a change of machine load during the measurement
    hits all of them alike instead of biasing their ratio. Stops after ``repeat`` rounds, or once
    ``min_repeat`` rounds are done and ``budget_s`` seconds (per callable) have been spent.

    ``first_results[i] = (result, seconds)``: a checked call already made (it is the warm-up). A
    callable whose first call took longer than ``single_if_slower_than`` keeps that call as its only
    sample and is left out of the rounds (a full SVD that takes a minute).

    ``interleave=False`` (default): each callable is timed in its own block of consecutive runs,
    after one untimed call. BLAS libraries keep their worker threads spinning after a call
    (OpenBLAS for ~0.1 s), which on a 2-core machine halves the speed of whatever runs next, so
    alternating rounds charge one library's spin to the next method (measured: specfast's
    spectral_norm on 4096x4096 took a 61 ms median right after scipy calls versus 26 ms on its own).
    A pause between calls is no cure either: after 150 ms idle, a 2 ms product took 13 ms on this
    VM, for torch and specfast alike. ``interleave=True`` keeps the alternating rounds, for a
    machine whose load drifts during the run.
    """
    n = len(fns)
    first_results = list(first_results) if first_results is not None else [None] * n
    timings: list[Timing | None] = [None] * n
    active = []
    for i, fn in enumerate(fns):
        fr = first_results[i]
        if fr is not None and single_if_slower_than is not None and fr[1] > single_if_slower_than:
            timings[i] = Timing([fr[1]], warmup=0, device=device,
                                note=f"single run (first call took {fr[1]:.1f}s)")
            continue
        if fr is None:
            time_once(fn, device)  # warm-up
        active.append(i)
    samples: dict[int, list[float]] = {i: [] for i in active}
    if not interleave:
        for i in active:
            time_once(fns[i], device)  # absorbs the previous method's spinning threads
            t_start = time.perf_counter()
            while len(samples[i]) < repeat:
                samples[i].append(time_once(fns[i], device)[1])
                if len(samples[i]) >= min_repeat and time.perf_counter() - t_start > budget_s:
                    break
        for i in active:
            timings[i] = Timing(samples[i], warmup=2, device=device)
        return timings  # type: ignore[return-value]
    t_start = time.perf_counter()
    rounds = 0
    while active and rounds < repeat:
        order = active if rounds % 2 == 0 else active[::-1]
        for i in order:
            _, dt = time_once(fns[i], device)
            samples[i].append(dt)
        rounds += 1
        if rounds >= min_repeat and time.perf_counter() - t_start > budget_s * len(active):
            break
    for i in active:
        timings[i] = Timing(samples[i], warmup=1, device=device)
    return timings  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- bandwidth
def read_bandwidth(nbytes: int = GIB, repeat: int = 5, device: str = "cpu") -> dict:
    """STREAM-style read bandwidth: time the sum of an ``nbytes`` float32 array (bytes read / time).

    Measured with torch.sum and with numpy (np.add.reduce) on the same buffer, best of ``repeat`` runs
    each; ``best_gbps`` is the "measured read bandwidth" every result is compared with.
    """
    import numpy as np
    import torch

    n = nbytes // 4
    out: dict[str, Any] = {"nbytes": n * 4, "repeat": repeat, "device": device}
    a = torch.empty(n, dtype=torch.float32, device=device)
    a.fill_(1.0)  # touch every page
    best_t = math.inf
    for _ in range(repeat):
        _, dt = time_once(lambda: a.sum(), device)
        best_t = min(best_t, dt)
    out["torch_sum_gbps"] = n * 4 / best_t / 1e9
    if device == "cpu":
        an = a.numpy()
        best_n = math.inf
        for _ in range(repeat):
            _, dt = time_once(lambda: np.add.reduce(an), "cpu")
            best_n = min(best_n, dt)
        out["numpy_sum_gbps"] = n * 4 / best_n / 1e9
    out["best_gbps"] = max(v for k, v in out.items() if k.endswith("_sum_gbps"))
    out["best_method"] = max((k for k in out if k.endswith("_sum_gbps")), key=lambda k: out[k])
    del a
    return out


def read_bandwidth_at(nbytes: int, repeat: int = 5, device: str = "cpu") -> float:
    """torch.sum read bandwidth for an array of ``nbytes`` (shows cache effects for working sets
    that fit in the last-level cache). GB/s."""
    import torch

    a = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    best = math.inf
    for _ in range(repeat):
        _, dt = time_once(lambda: a.sum(), device)
        best = min(best, dt)
    return a.numel() * 4 / best / 1e9


# ----------------------------------------------------------------------------------- checks
class CheckError(AssertionError):
    pass


def _f64(x):
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def rel_err(got, ref, *, normwise_axis: int | None = None) -> float:
    """Max relative error of ``got`` against the float64 ``ref``.

    ``normwise_axis=None``: elementwise max |got - ref| / |ref|  (for singular values).
    ``normwise_axis=k``: ‖got - ref‖₂ / ‖ref‖₂ along axis k, max over the rest (for vectors).
    """
    import numpy as np

    g, r = _f64(got), _f64(ref)
    if g.shape != r.shape:
        raise CheckError(f"shape mismatch: got {g.shape}, reference {r.shape}")
    if not np.all(np.isfinite(g)):
        return math.inf
    if normwise_axis is None:
        den = np.abs(r)
        return float(np.max(np.abs(g - r) / np.where(den > 0, den, 1.0))) if r.size else 0.0
    num = np.linalg.norm(g - r, axis=normwise_axis)
    den = np.linalg.norm(r, axis=normwise_axis)
    return float(np.max(num / np.where(den > 0, den, 1.0))) if r.size else 0.0


def check(name: str, got, ref, rtol: float, *, normwise_axis: int | None = None) -> float:
    """Assert ``got`` agrees with the float64 reference ``ref`` to relative error ``rtol``; return
    the error. Raises ``CheckError`` naming the benchmark, the error and the tolerance."""
    err = rel_err(got, ref, normwise_axis=normwise_axis)
    if not err <= rtol:
        raise CheckError(f"check failed for {name}: relative error {err:.3e} > allowed {rtol:.1e}")
    return err


# ----------------------------------------------------------------------------------- output
class ResultWriter:
    """Appends one JSON object per line to ``path``; every line carries the machine record."""

    def __init__(self, path: str, machine: dict, run_info: dict):
        self.path = path
        self.machine = machine
        self.run_info = run_info
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)

    def write(self, record: dict):
        line = {**self.run_info, **record, "machine": self.machine}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, default=_json_default) + "\n")


def _json_default(o):
    try:
        import numpy as np
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows: dicts of already-formatted strings; columns: (key, header)."""
    widths = [max(len(h), *(len(str(r.get(k, ""))) for r in rows)) if rows else len(h) for k, h in columns]
    sep = "  "
    out = [sep.join(h.ljust(w) for (_, h), w in zip(columns, widths)),
           sep.join("-" * w for w in widths)]
    prev_group = None
    for r in rows:
        group = r.get("_group")
        if prev_group is not None and group != prev_group:
            out.append("")
        prev_group = group
        out.append(sep.join(str(r.get(k, "")).ljust(w) for (k, _), w in zip(columns, widths)).rstrip())
    return "\n".join(out)


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_err(e: float | None) -> str:
    if e is None:
        return "-"
    if not math.isfinite(e):
        return "inf"
    return f"{e:.1e}"
