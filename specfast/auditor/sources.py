"""Where tensors come from: safetensors files and Hugging Face directories (validated header, lazy
zero-copy reads), in-memory ``nn.Module``s, PEFT adapter directories and opt-in pickled checkpoints.

A *source* lists its tensors without reading them (``records``); each record loads on demand. For
safetensors the load is a view into a private memory map of the file (no copy: the pages belong to
the page cache and are dropped with ``release`` once a group is done), so the whole model is never
resident and a checkpoint larger than RAM can be audited.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


class CheckpointError(ValueError):
    """A file, directory or tensor that cannot be read as asked; the message names it."""


# safetensors dtype code -> (torch dtype, bytes per element)
_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        _ST_DTYPES[_code] = (getattr(torch, _name), int(_code[1:]) // 8)

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass
class TensorRecord:
    """One tensor of a checkpoint, not yet read. ``load()`` returns it (a zero-copy view for files)."""

    name: str
    shape: tuple
    dtype: torch.dtype
    origin: str  # file path, or "<module>"
    load: Callable[[], torch.Tensor] = field(repr=False)
    release: Callable[[], None] = field(default=lambda: None, repr=False)
    nbytes: int = 0
    shares_with: str | None = None  # in-memory tied weights: the name of the first owner


# ------------------------------------------------------------------------------------ safetensors
class SafetensorsFile:
    """A validated safetensors file. The header is checked against the file before any tensor is
    read: every dtype known, every byte range inside the data section, its length equal to the
    shape's element count times the dtype size, and no two ranges overlapping."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes; the "
                                      "8-byte header length is missing)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise CheckpointError(f"{self.path}: header length {hlen} bytes exceeds the file "
                                      f"({size} bytes): truncated or not a safetensors file")
            raw = f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + hlen
        data_len = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple, int, int]] = {}
        spans = []
        for name, ent in header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(ent, dict) or not {"dtype", "shape", "data_offsets"} <= ent.keys():
                raise CheckpointError(f"{where}: header entry must have dtype, shape and data_offsets; got {ent!r}")
            code = ent["dtype"]
            if code not in _ST_DTYPES:
                raise CheckpointError(f"{where}: unknown dtype {code!r}")
            dtype, itemsize = _ST_DTYPES[code]
            shape, offs = ent["shape"], ent["data_offsets"]
            if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
                raise CheckpointError(f"{where}: shape must be a list of non-negative integers; got {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                    or not 0 <= offs[0] <= offs[1]):
                raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end; "
                                      f"got {offs!r}")
            if offs[1] > data_len:
                raise CheckpointError(f"{where}: data_offsets {offs} end beyond the data section "
                                      f"({data_len} bytes): the file is truncated or the header lies")
            numel = 1
            for d in shape:
                numel *= d
            if numel * itemsize != offs[1] - offs[0]:
                raise CheckpointError(f"{where}: shape {tuple(shape)} of {code} needs {numel * itemsize} "
                                      f"bytes but data_offsets {offs} span {offs[1] - offs[0]}")
            self.entries[name] = (dtype, tuple(shape), offs[0], offs[1])
            spans.append((offs[0], offs[1], name))
        # sorted by start, each non-empty range must begin at or after the furthest end so far
        spans = sorted(sp for sp in spans if sp[1] > sp[0])
        far_end, far_name = 0, None
        for b, e, name in spans:
            if b < far_end:
                raise CheckpointError(f"{self.path}: tensors {far_name!r} and {name!r} {[b, e]} overlap in "
                                      "the data section")
            if e > far_end:
                far_end, far_name = e, name
        self._map: mmap.mmap | None = None
        self._fd = None

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            self._fd = open(self.path, "rb")
            # ACCESS_COPY: a private, writable mapping, so torch.frombuffer accepts it without a copy;
            # nothing ever writes to it, so the pages stay clean and backed by the file.
            self._map = mmap.mmap(self._fd.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def load(self, name: str) -> torch.Tensor:
        dtype, shape, b, e = self.entries[name]
        if e == b:
            return torch.empty(shape, dtype=dtype)
        mm = self._mapping()
        t = torch.frombuffer(mm, dtype=torch.uint8, count=e - b, offset=self.data_start + b)
        return t.view(dtype).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor from this process (they stay in the page cache)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, b, e = self.entries[name]
        page = mmap.PAGESIZE
        start = ((self.data_start + b) // page) * page
        end = self.data_start + e
        if end > start:
            try:
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def close(self):
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still alive somewhere; the GC closes the map with it
            self._fd.close()
            self._map = self._fd = None

    def records(self) -> list[TensorRecord]:
        out = []
        for name, (dtype, shape, b, e) in self.entries.items():
            out.append(TensorRecord(name, shape, dtype, str(self.path),
                                    load=lambda n=name: self.load(n), release=lambda n=name: self.release(n),
                                    nbytes=e - b))
        return out


# ------------------------------------------------------------------------------------ sources
@dataclass
class Source:
    """Everything an audit needs to know about its input."""

    kind: str                     # "safetensors", "hf_dir", "module", "peft", "pickle"
    location: str
    records: list[TensorRecord]
    config: dict                  # the model's config.json (or module.config), {} if none
    files: list[Path] = field(default_factory=list)
    adapter: dict | None = None   # adapter_config.json for PEFT sources
    closers: list = field(default_factory=list)

    def fingerprint(self) -> dict:
        """What identifies the input for --resume: file names, sizes and modification times."""
        return {"kind": self.kind, "location": self.location,
                "files": [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in self.files],
                "tensors": len(self.records)}

    def close(self):
        for c in self.closers:
            c()


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None


def _files_source(kind: str, location: str, files: list[Path], config: dict) -> Source:
    stfiles = [SafetensorsFile(p) for p in files]
    records, seen = [], {}
    for sf in stfiles:
        for r in sf.records():
            if r.name in seen:
                raise CheckpointError(f"tensor {r.name!r} appears in both {seen[r.name]} and {sf.path}")
            seen[r.name] = sf.path
            records.append(r)
    return Source(kind, location, records, config, files=list(files),
                  closers=[sf.close for sf in stfiles])


def _hf_directory(d: Path, allow_pickle: bool = False) -> Source:
    config = _read_json(d / "config.json", "config.json") if (d / "config.json").is_file() else {}
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = _read_json(index, "the shard index")
        wmap = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{index}: must be a JSON object with a non-empty weight_map")
        bad = [(k, v) for k, v in wmap.items() if not isinstance(v, str) or not v]
        if bad:
            raise CheckpointError(f"{index}: weight_map entry {bad[0][0]!r} must name a shard file; got {bad[0][1]!r}")
        root = d.resolve()
        files = []
        for shard in dict.fromkeys(wmap.values()):
            p = (d / shard).resolve()
            if root not in p.parents:
                raise CheckpointError(f"{index}: shard {shard!r} points outside the model directory {d}")
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} does not exist in {d}")
            files.append(p)
        src = _files_source("hf_dir", str(d), files, config)
        names = {r.name for r in src.records}
        missing = sorted(set(wmap) - names)
        if missing:
            raise CheckpointError(f"{index}: {len(missing)} tensor(s) listed in the index are in no shard, "
                                  f"e.g. {missing[0]!r}")
        src.files.append(index)
        return src
    files = sorted(p for p in d.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if not files:
        pickles = sorted(p for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth") and p.is_file())
        if pickles and allow_pickle:
            parts = [_pickle_source(p) for p in pickles]
            records, seen = [], {}
            for part, p in zip(parts, pickles):
                for r in part.records:
                    if r.name in seen:
                        raise CheckpointError(f"tensor {r.name!r} appears in both {seen[r.name]} and {p}")
                    seen[r.name] = p
                    records.append(r)
            return Source("pickle", str(d), records, config, files=list(pickles))
        hint = (f"; found pickled checkpoint(s) {[p.name for p in pickles]}: pass allow_pickle=True "
                "(CLI --allow-pickle) to load them with torch.load(weights_only=True)") if pickles else ""
        raise CheckpointError(f"{d}: no *.safetensors file and no model.safetensors.index.json{hint}")
    return _files_source("hf_dir", str(d), files, config)


def _module_source(module: torch.nn.Module) -> Source:
    sd = module.state_dict(keep_vars=True)
    records, owner = [], {}
    for name, t in sd.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) \
            if t.numel() else None
        shares = owner.get(key) if key is not None else None
        if key is not None and shares is None:
            owner[key] = name
        records.append(TensorRecord(name, tuple(t.shape), t.dtype, "<module>", load=lambda t=t: t,
                                    nbytes=t.numel() * t.element_size(), shares_with=shares))
    cfg = getattr(module, "config", None)
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    return Source("module", type(module).__name__, records, config)


def _pickle_source(path: Path) -> Source:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
        raise CheckpointError(f"{path}: cannot be loaded with torch.load(weights_only=True): {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict); got {type(obj).__name__}")
    records = []
    for name, t in obj.items():
        if isinstance(t, torch.Tensor):
            records.append(TensorRecord(str(name), tuple(t.shape), t.dtype, str(path), load=lambda t=t: t,
                                        nbytes=t.numel() * t.element_size()))
    return Source("pickle", str(path), records, {}, files=[path])


def open_source(model, *, allow_pickle: bool = False) -> Source:
    """Turn what the user passed (path or module) into a Source, with errors naming the file."""
    if isinstance(model, torch.nn.Module):
        return _module_source(model)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"audit: model must be an nn.Module or a path to a .safetensors file or model "
                        f"directory; got {type(model).__name__}")
    p = Path(model)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return _peft_source(p)
        return _hf_directory(p, allow_pickle)
    if p.suffix == ".safetensors":
        cfg_path = p.parent / "config.json"
        config = _read_json(cfg_path, "config.json") if cfg_path.is_file() else {}
        return _files_source("safetensors", str(p), [p], config)
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        if not allow_pickle:
            raise CheckpointError(
                f"{p}: pickled checkpoints can run arbitrary code when loaded, so they are refused by "
                "default. Convert it to safetensors, or opt in with allow_pickle=True (CLI --allow-pickle), "
                "which loads it with torch.load(weights_only=True)")
        return _pickle_source(p)
    raise CheckpointError(f"{p}: unknown file type {p.suffix!r}; expected .safetensors, a model directory, "
                          "or (with allow_pickle) .bin/.pt")


def _peft_source(d: Path) -> Source:
    cfg = _read_json(d / "adapter_config.json", "adapter_config.json")
    f = d / "adapter_model.safetensors"
    if not f.is_file():
        pick = d / "adapter_model.bin"
        hint = " (found adapter_model.bin: pickled adapters are not read)" if pick.is_file() else ""
        raise CheckpointError(f"{d}: adapter directory has no adapter_model.safetensors{hint}")
    src = _files_source("peft", str(d), [f], {})
    src.adapter = cfg
    src.files.append(d / "adapter_config.json")
    return src
