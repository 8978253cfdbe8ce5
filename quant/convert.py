"""hybrid-quant convert: an HF checkpoint (BF16, block-FP8, or K2-Thinking's compressed-tensors INT4) ->
the expert store that hybrid.load memory-maps.

Output folder:
    config.json, tokenizer and other side files      copied unchanged
    model-0000i-of-0000N.safetensors + index          every non-expert tensor exactly as stored (FP8 stays FP8)
    experts/layer-LLL.safetensors                     one file per MoE layer (quant/store.py), page-aligned
    hybrid-store.json                                 the manifest, written LAST
Safety: every file is written under a temporary name, flushed and renamed when complete; a journal
(.convert-state.json) records finished files with their checksums, so a rerun after Ctrl-C, kill -9 or a
full disk resumes where it stopped and produces the same bytes as an uninterrupted run. Without the
manifest the folder is not a store, and hybrid.load refuses it. Memory: one layer at a time per thread,
written through a memory map. The input is only read.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import compressed
from .checkpoint import INDEX_NAME, SCALE_SUFFIX, Checkpoint
from .dense import CHECKPOINT, MlaDims, convert_tensors, dense_kind, mlp_prefix
from .errors import CheckpointError
from .formats import FORMAT_NAMES
from .int4 import GROUP_SIZES
from .layout import make_layout
from .store import LayerStore, StoreSpec
from .writer import write_sharded

MANIFEST = "hybrid-store.json"
JOURNAL = ".convert-state.json"
STORE_FORMAT, STORE_VERSION = "k2hybrid-expert-store", 1
TOOL_VERSION = "0.1.0"
DENSE_SHARD_BYTES = 4 << 30


class ConvertError(ValueError):
    """The conversion cannot start or go on; the message names the problem and the fix."""


def read_config_dict(model_dir: Path, error=ValueError) -> dict:
    """config.json as a plain dict, K2.5's `text_config` unwrapped. quant/ reads the few fields it needs
    itself (it does not import hybrid/); `error` is the exception type raised for a missing or bad file."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist; pass the model folder that holds config.json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); restore it from the checkpoint") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object")
    return raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw


@dataclass(frozen=True)
class ModelShape:
    """The few config.json fields the store needs: hidden size, expert width, experts per layer, the MoE
    layers, the checkpoint's quantization_config (compressed-tensors INT4 or None) and the MLA dims (None when
    the config lacks them)."""
    hidden: int
    inter: int
    n_experts: int
    moe_layers: tuple[int, ...]
    quantization_config: dict | None = None
    mla: MlaDims | None = None


def model_shape(cfg: dict, where: str) -> ModelShape:
    """The ModelShape of a config.json's fields; ConvertError naming `where` when one it needs is missing."""
    need = ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_hidden_layers", "first_k_dense_replace")
    missing = [k for k in need if not isinstance(cfg.get(k), int)]
    if missing:
        raise ConvertError(f"{where}: config.json lacks integer fields {missing}; copy it unchanged from the checkpoint")
    freq = cfg.get("moe_layer_freq", 1)
    moe = [L for L in range(cfg["num_hidden_layers"]) if L >= cfg["first_k_dense_replace"] and L % freq == 0]
    mla = [cfg.get(f) for f in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim")]
    return ModelShape(cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"], tuple(moe),
                      cfg.get("quantization_config"), MlaDims(*mla) if all(isinstance(v, int) for v in mla) else None)


def expert_prefix(layer: int, e: int, m: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{m}_proj"


def is_expert_tensor(name: str) -> bool:
    return ".mlp.experts." in name


def layer_file(layer: int) -> str:
    return f"experts/layer-{layer:03d}.safetensors"


def convert(input_dir, output_dir, fmt: str, group_size: int = 32, threads: int = 1, quiet: bool = False,
            dense: str | None = None) -> Path:
    """Convert (or resume converting) input_dir into an expert store at output_dir; returns output_dir.

    dense: the format of the dense linear weights (quant/dense.py), None to keep the checkpoint's own.
    """
    src, out = Path(input_dir), Path(output_dir)
    if fmt not in FORMAT_NAMES:
        raise ConvertError(f"--format {fmt!r} is not one of {', '.join(FORMAT_NAMES)}")
    if dense is not None and dense not in FORMAT_NAMES:
        raise ConvertError(f"--dense {dense!r} is not one of {', '.join(FORMAT_NAMES)} (leave it out to keep the "
                           f"checkpoint's own)")
    if group_size not in GROUP_SIZES or (fmt != "int4" and group_size != 32):
        raise ConvertError(f"--group-size {group_size}: int4 takes {GROUP_SIZES}; fp8 and bf16 take none")
    if threads < 1:
        raise ConvertError(f"--threads must be >= 1, got {threads}")
    if src.resolve() == out.resolve():
        raise ConvertError("--output must differ from --input: the input is never modified")
    shape = model_shape(read_config_dict(src, ConvertError), str(src / "config.json"))
    spec = StoreSpec(fmt, shape.hidden, shape.inter, group_size)
    with Checkpoint.open(src) as ck:                # validates every shard header before any writing
        try:
            return _convert(ck, src, out, spec, shape, threads, quiet, dense)
        except OSError as e:                        # the disk filled up after the start-up check
            if e.errno != errno.ENOSPC:
                raise
            state = _read_json(out / JOURNAL)       # what is finished: kept, and skipped by the rerun
            raise _no_space(out, _bytes_left(ck, shape, spec, state), during=True) from None


def _convert(ck: Checkpoint, src: Path, out: Path, spec: StoreSpec, shape: ModelShape, threads: int, quiet: bool,
             dense: str | None) -> Path:
    source = expert_source(ck, shape)
    params = {"format": STORE_FORMAT, "version": STORE_VERSION, "expert_format": spec.fmt,
              "group_size": spec.group_size, "source": str(src.resolve()), "source_kind": source.kind,
              "dense_format": dense or CHECKPOINT, "source_files": _fingerprint(src)}
    if dense == "int4":
        params["dense_group_size"] = spec.group_size
    state = _prepare_output(out, params)
    dense_names = [n for n in ck.names if not is_expert_tensor(n)]
    todo_layers = [L for L in shape.moe_layers if layer_file(L) not in state["done"]]
    need = _bytes_left(ck, shape, spec, state)
    if need * 1.02 > shutil.disk_usage(out).free:
        raise _no_space(out, need)
    progress = _Progress(quiet, len(shape.moe_layers), len(shape.moe_layers) - len(todo_layers))
    _copy_side_files(src, out)
    if not state.get("dense"):
        _write_dense(ck, dense_names, out, state, DenseSpec(params["dense_format"], spec.group_size, shape.mla),
                     progress)
        progress.note(f"dense tensors: {len(dense_names)} written ({params['dense_format']})")
    (out / "experts").mkdir(exist_ok=True)

    def one(layer):
        t0 = time.perf_counter()
        LayerStore.build_file(out / layer_file(layer), spec, shape.n_experts, lambda e: source.expert(layer, e))
        return layer, time.perf_counter() - t0, sum(source.nbytes(layer, e) for e in range(shape.n_experts))

    peak = PeakAnonMemory()
    with peak, ThreadPoolExecutor(threads) as pool:
        for layer, secs, nbytes in pool.map(one, todo_layers):
            rel = layer_file(layer)
            state["done"][rel] = _file_record(out / rel)
            _write_json(out / JOURNAL, state)
            progress.layer(layer, nbytes, secs)
    if "source_shards" not in state:
        state["source_shards"] = {p.name: _sha256(p) for p in sorted(src.glob("*.safetensors"))}
        _write_json(out / JOURNAL, state)
    manifest = {**{k: v for k, v in params.items() if k != "source_files"}, "tool_version": TOOL_VERSION,
                "moe_layers": list(shape.moe_layers), "n_experts": shape.n_experts, "hidden": shape.hidden,
                "inter": shape.inter, "source_shards": state["source_shards"],
                "dense_fallbacks": state.get("dense_fallbacks", {}), "files": dict(sorted(state["done"].items()))}
    _write_json(out / MANIFEST, manifest)        # last: only now is the folder a store
    (out / JOURNAL).unlink()
    progress.note(f"done: {out} ({spec.fmt}, {len(shape.moe_layers)} MoE layers); peak memory of the layer "
                  f"conversion {peak.peak / 2**20:.0f} MiB anonymous (the memory-mapped input and output pages "
                  f"are file-backed and not counted: the kernel drops them under pressure)")
    return out


def _bytes_left(ck: Checkpoint, shape: ModelShape, spec: StoreSpec, state: dict) -> int:
    """Bytes the conversion still has to write: the MoE layers the journal does not list, and the dense
    tensors unless their pass is done."""
    stride = make_layout(spec.fmt, spec.hidden, spec.inter, spec.group_size).stride
    todo = [L for L in shape.moe_layers if layer_file(L) not in state["done"]]
    dense_bytes = 0 if state.get("dense") else _dense_bytes(ck, [n for n in ck.names if not is_expert_tensor(n)])
    return len(todo) * shape.n_experts * stride + dense_bytes


def _no_space(out: Path, need: int, during: bool = False) -> ConvertError:
    """The one disk-space message: at the start-up check, and when the disk fills up during the run."""
    free = shutil.disk_usage(out).free
    when = "the disk filled up during the conversion: " if during else ""
    resume = "; what is finished is kept: rerun the same command to resume" if during else ""
    return ConvertError(f"{out}: {when}the conversion needs about {need / 2**30:.1f} GiB more but the disk has "
                        f"{free / 2**30:.1f} GiB free; free space or choose another --output{resume}")


def _fingerprint(src: Path) -> dict:
    """Size and mtime of each source shard: a resume refuses a source that changed since the first run
    (full checksums go into the manifest at the end)."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(src.glob("*.safetensors"))}


# ---- the expert source ---------------------------------------------------------------------------------
class ExpertSource:
    """Routed experts of a checkpoint in the form LayerStore.build takes: block-FP8 (codes, scale_inv) kept
    as released, K2-Thinking INT4 as Int4Weights, anything else as float32. Used by the converter and by
    hybrid.load's in-memory conversion."""

    def __init__(self, ck: Checkpoint, shape: ModelShape, kind: str, group_size: int = 32):
        self.ck, self.shape, self.kind, self.group = ck, shape, kind, group_size
        H, I = shape.hidden, shape.inter
        self.shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}

    def expert(self, layer: int, e: int) -> dict:
        out = {}
        for m, shp in self.shapes.items():
            prefix = expert_prefix(layer, e, m)
            if self.kind == "compressed-tensors-int4":
                out[m] = compressed.read_int4(self.ck, prefix, shp, self.group)
            elif self.ck.is_fp8(prefix + ".weight"):
                if tuple(self.ck.shape(prefix + ".weight")) != shp:
                    self.ck.get(prefix + ".weight", expect_shape=shp)      # raises, naming file and tensor
                out[m] = self.ck.get_fp8(prefix + ".weight")
            else:
                out[m] = self.ck.get(prefix + ".weight", dtype=torch.float32, expect_shape=shp).numpy()
        return out

    def nbytes(self, layer: int, e: int) -> int:
        """Bytes of expert e as stored in the source (what converting it reads)."""
        suffixes = compressed.SUFFIXES if self.kind == "compressed-tensors-int4" else (".weight",)
        return sum(self.ck.nbytes(expert_prefix(layer, e, m) + s) for m in self.shapes for s in suffixes)


def expert_source(ck: Checkpoint, shape: ModelShape) -> ExpertSource:
    """The source of `shape`'s routed experts in ck (checks they are all there for an unquantized/FP8 one)."""
    qc = shape.quantization_config
    if compressed.is_compressed(qc):
        return ExpertSource(ck, shape, "compressed-tensors-int4", compressed.group_size_of(qc))
    for L in shape.moe_layers:
        for e in range(shape.n_experts):
            for m in ("gate", "up", "down"):
                if expert_prefix(L, e, m) + ".weight" not in ck:
                    raise CheckpointError(f"tensor {expert_prefix(L, e, m) + '.weight'!r} is missing; the "
                                          f"checkpoint does not match its config.json", file=ck.model_dir)
    first = expert_prefix(shape.moe_layers[0], 0, "gate") + ".weight" if shape.moe_layers else None
    return ExpertSource(ck, shape, "block-fp8" if first and ck.is_fp8(first) else "bf16")


# ---- output folder, journal, files ---------------------------------------------------------------------
def _prepare_output(out: Path, params: dict) -> dict:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--output {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest, journal = out / MANIFEST, out / JOURNAL
    if manifest.exists():
        old = _read_json(manifest)
        same = all(old.get(k) == v for k, v in params.items() if k != "source_files")
        raise ConvertError(f"{out} already holds a complete store" + (
            " of these settings; nothing to do (delete it to convert again)" if same else
            f" of other settings ({old.get('expert_format')}, from {old.get('source')}); choose another --output"))
    if journal.exists():
        state = _read_json(journal)
        if state.get("params") != params:
            changed = "the source files changed since it started" if {**state.get("params", {}), "source_files": None} \
                == {**params, "source_files": None} else f"other settings ({state.get('params')})"
            raise ConvertError(f"{out} holds an interrupted conversion with {changed}; rerun it with the same "
                               f"input and settings, or delete {out} (or choose another --output) to start over")
        for tmp in list(out.glob("*.tmp")) + list(out.glob("experts/*.tmp")):
            tmp.unlink()                                   # a half-written file from the interrupted run
        for rel, rec in list(state["done"].items()):
            p = out / rel
            if not p.exists() or p.stat().st_size != rec["bytes"] or _sha256(p) != rec["sha256"]:
                del state["done"][rel]                     # damaged since: write it again
                if not rel.startswith("experts/"):
                    state["dense"] = False                 # a dense shard or the index: redo the dense pass
        if not state["dense"]:
            state["done"] = {k: v for k, v in state["done"].items() if k.startswith("experts/")}
        return state
    if any(out.iterdir()):
        raise ConvertError(f"--output {out} is not empty and holds no conversion of ours; choose an empty or "
                           f"new folder (nothing there was changed)")
    state = {"params": params, "done": {}, "dense": False}
    _write_json(journal, state)
    return state


@dataclass(frozen=True)
class DenseSpec:
    fmt: str                  # a format name, or CHECKPOINT: keep the checkpoint's tensors as they are
    group_size: int           # int4
    mla: MlaDims | None       # kv_b's per-head halves (quant/dense.py)


def _write_dense(ck: Checkpoint, names: list[str], out: Path, state: dict, spec: DenseSpec, progress) -> None:
    for p in list(out.glob("model-*.safetensors")) + [out / INDEX_NAME]:
        p.unlink(missing_ok=True)                          # an interrupted dense pass starts over
    fallbacks = {}
    linears = [n for n in names if spec.fmt != CHECKPOINT and dense_kind(n)]
    t0 = time.perf_counter()

    def tensors():
        done, mlps = 0, set()
        for n in names:
            if spec.fmt != CHECKPOINT and dense_kind(n):
                done += 1
                mlp = mlp_prefix(n)
                if mlp in mlps:
                    continue                               # written with its MLP's first weight
                if mlp:
                    mlps.add(mlp)
                pairs, why = convert_tensors(ck, n, spec.fmt, spec.group_size, spec.mla)
                kind = dense_kind(n).rsplit(".", 1)[0] if mlp else dense_kind(n)
                if why and kind not in fallbacks:
                    fallbacks[kind] = why
                    progress.note(f"dense {kind}: {why} (said once for all layers)")
                yield from pairs
                if done % max(1, len(linears) // 10) == 0:
                    left = (time.perf_counter() - t0) / done * (len(linears) - done)
                    progress.note(f"dense linears in {spec.fmt}: {done}/{len(linears)}, ETA {left / 60:.1f} min")
                continue
            yield n, ck.get_raw(n).contiguous()
            if ck.is_fp8(n):
                yield n + SCALE_SUFFIX, ck.get_raw(n + SCALE_SUFFIX).contiguous()
    shards = write_sharded(out, tensors(), DENSE_SHARD_BYTES)
    for p in shards + [out / INDEX_NAME]:
        state["done"][p.name] = _file_record(p)
    state["dense"], state["dense_fallbacks"] = True, fallbacks
    _write_json(out / JOURNAL, state)


def _dense_bytes(ck: Checkpoint, names: list[str]) -> int:
    """Bytes the non-expert tensors take as stored (FP8 scale grids, 4 bytes per 16384 weights, left out)."""
    return sum(ck.nbytes(n) for n in names)


def _copy_side_files(src: Path, out: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != INDEX_NAME and not p.name.startswith("."):
            tmp = out / (p.name + ".tmp")
            shutil.copyfile(p, tmp)
            tmp.replace(out / p.name)


def _file_record(p: Path) -> dict:
    return {"sha256": _sha256(p), "bytes": p.stat().st_size}


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ConvertError(f"{path} is unreadable ({e}); delete the output folder and convert again") from None


def anon_rss(pid: int | str = "self") -> int:
    """Resident anonymous memory (bytes) of a process: heap and arrays, not mapped file pages. Linux
    /proc; elsewhere psutil's RSS, which overcounts by the mapped files."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return psutil.Process(None if pid == "self" else int(pid)).memory_info().rss


class PeakAnonMemory:
    """Samples anon_rss() every 50 ms in a thread while the with-block runs; .peak is the maximum seen."""

    def __init__(self, pid: int | str = "self", every: float = 0.05):
        import threading
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, anon_rss(self.pid))
            except (OSError, ValueError):
                return
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakAnonMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class _Progress:
    def __init__(self, quiet: bool, total: int, done: int):
        self.quiet, self.total, self.done = quiet, total, done
        self.t0, self.bytes = time.perf_counter(), 0

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"[convert] {text}", file=sys.stderr, flush=True)

    def layer(self, layer: int, source_bytes: int, secs: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        rate = source_bytes / elapsed if elapsed else 0.0
        left = elapsed / max(1, self.done) * (self.total - self.done)
        self.note(f"layer {layer}: {self.done}/{self.total} MoE layers, {secs:.1f} s; input {source_bytes / 2**30:.2f} GiB "
                  f"read at {rate / 1e6:.0f} MB/s; ETA {left / 60:.1f} min")
