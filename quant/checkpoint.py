"""Read a Hugging Face model folder (BF16 or block-FP8 safetensors), lazily, with errors a user can act on.

A folder holds either `model.safetensors.index.json` + shards, or one `model.safetensors`.
`Checkpoint.open` validates everything it can from the headers before any tensor data is read:
a truncated 1 TB download must fail in a second with the shard's name, not an hour into loading.
Tensor data is then read one tensor at a time through `safetensors.safe_open` (memory-mapped).

Block FP8 (docs/formats.md): an F8_E4M3 weight [out, in] has a float sibling
`<name>_scale_inv` [ceil(out/128), ceil(in/128)]; W = e4m3(Q) * S[i // 128, j // 128] (multiply).
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from quant.errors import CheckpointError
from quant.fp8 import BLOCK, scale_grid_shape

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = "F8_E4M3"
MAX_HEADER_BYTES = 100_000_000     # safetensors refuses larger headers; a bigger length means garbage
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
SCALE_DTYPES = ("F32", "BF16", "F16")
REDOWNLOAD = "re-download this shard"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what its header says; no data."""
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"corrupt safetensors header: {what}", file=path, fix=REDOWNLOAD)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one shard's header; reads 8 + header bytes, never tensor data.

    Returns ({name: TensorInfo}, the header's __metadata__). Checks what safetensors itself would
    refuse (bad length, bad JSON, offsets that overlap or leave gaps) plus byte counts per tensor,
    and that the file size equals 8 + header + data, naming expected and actual sizes.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= min(MAX_HEADER_BYTES, size - 8) else None
    except OSError as e:
        raise CheckpointError(f"cannot be read ({e.strerror or e})", file=path,
                              fix="check that the file exists and is readable") from e
    if size == 0:
        raise CheckpointError("is empty (0 bytes)", file=path, fix=REDOWNLOAD)
    if n < 0:
        raise _corrupt(path, f"the file is only {size} bytes, shorter than the 8-byte header length")
    if raw is None:
        raise _corrupt(path, f"its first 8 bytes give a header length of {n:,} bytes, but the file is "
                             f"{size:,} bytes (and headers are at most {MAX_HEADER_BYTES:,})")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(path, f"the {n:,}-byte header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    infos, spans = {}, []
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry)
        spans.append((entry["data_offsets"][0], entry["data_offsets"][1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise _corrupt(path, f"tensor '{name}' data_offsets start at {start}, expected {end} "
                                 "(tensors must be packed without gaps or overlaps)")
        end = stop
    expected = 8 + n + end
    if size < expected:
        raise CheckpointError(
            f"is {size:,} bytes but its header describes {expected:,} bytes ({expected - size:,} missing): "
            "the download is truncated", file=path, fix=REDOWNLOAD)
    if size > expected:
        raise CheckpointError(f"is {size:,} bytes but its header describes only {expected:,} bytes; "
                              "safetensors refuses trailing data", file=path, fix=REDOWNLOAD)
    return infos, {str(k): str(v) for k, v in dict(meta).items()}


def _tensor_info(path: Path, name: str, entry) -> TensorInfo:
    ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
          and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
          and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
          and len(entry["data_offsets"]) == 2
          and all(isinstance(o, int) and o >= 0 for o in entry["data_offsets"]))
    if not ok:
        raise _corrupt(path, f"entry for tensor '{name}' is not {{dtype, shape, data_offsets}}: {entry!r}")
    dtype, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"has unsupported dtype '{dtype}' (supported: {', '.join(ITEMSIZE)})",
                              file=path, tensor=name, fix="convert this checkpoint to BF16 or block FP8")
    want = math.prod(shape) * ITEMSIZE[dtype]
    if stop - start != want:
        raise _corrupt(path, f"tensor '{name}' is {dtype} {list(shape)} = {want:,} bytes, but its "
                             f"data_offsets [{start}, {stop}] span {stop - start:,} bytes")
    return TensorInfo(path, dtype, shape)


def _read_index(index: Path) -> dict[str, str]:
    fix = f"re-download {INDEX_NAME}"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot be read ({e.strerror or e})", file=index, fix=fix) from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"is not UTF-8 text ({e})", file=index, fix=fix) from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                              file=index, fix=fix) from e
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError('has no non-empty "weight_map" object {tensor name: shard file}',
                              file=index, fix=fix)
    for name, shard in wmap.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"maps tensor '{name}' to {shard!r}, not a file name inside the folder",
                                  file=index, fix=fix)
    return wmap


def _read_sharded(folder: Path, index: Path) -> tuple[dict[str, TensorInfo], dict[Path, dict[str, str]]]:
    wmap = _read_index(index)
    shards = sorted(set(wmap.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        count = sum(1 for s in wmap.values() if s == missing[0])
        others = f"; {len(missing) - 1} more shards are missing too: {missing[1:6]}" if len(missing) > 1 else ""
        raise CheckpointError(f"is missing: {INDEX_NAME} maps {count} tensor(s) to it{others}",
                              file=folder / missing[0], fix="download the missing shards into the folder")
    parsed = {s: read_header(folder / s) for s in shards}
    headers = {s: h for s, (h, _) in parsed.items()}
    infos = {}
    for name, shard in wmap.items():
        if name not in headers[shard]:
            raise CheckpointError(
                f"{INDEX_NAME} says this shard holds tensor '{name}', but the shard's header does not list it",
                file=folder / shard, tensor=name,
                fix="the index and the shards come from different revisions; re-download both")
        infos[name] = headers[shard][name]
    return infos, {folder / s: meta for s, (_, meta) in parsed.items()}


def _check_fp8(infos: dict[str, TensorInfo]) -> None:
    for name, info in infos.items():
        scale = infos.get(name + SCALE_SUFFIX)
        if info.dtype != FP8_DTYPE:
            if scale is not None:
                raise CheckpointError(
                    f"is {info.dtype} but has a '{name + SCALE_SUFFIX}' sibling; scales belong to {FP8_DTYPE} "
                    "weights only", file=info.file, tensor=name,
                    fix="remove the stale scale (a BF16 cast drops them) or re-download the checkpoint")
            continue
        if len(info.shape) != 2:
            raise CheckpointError(f"is {FP8_DTYPE} with shape {list(info.shape)}; block FP8 needs a 2-D weight",
                                  file=info.file, tensor=name, fix="re-export the checkpoint")
        if scale is None:
            raise CheckpointError(f"is {FP8_DTYPE} but its scale '{name + SCALE_SUFFIX}' is not in the checkpoint",
                                  file=info.file, tensor=name,
                                  fix="the checkpoint is incomplete: re-download it with every shard and the index")
        _check_scale(name, info, scale)


def _check_scale(name: str, info: TensorInfo, scale: TensorInfo) -> None:
    want = scale_grid_shape(*info.shape, BLOCK)
    if scale.shape != want or scale.dtype not in SCALE_DTYPES:
        raise CheckpointError(
            f"is {scale.dtype} {list(scale.shape)}, but the {list(info.shape)} weight '{name}' with "
            f"{BLOCK}x{BLOCK} blocks needs a float grid of shape {list(want)} (ceil division)",
            file=scale.file, tensor=name + SCALE_SUFFIX,
            fix=f"this reader supports weight_block_size [{BLOCK}, {BLOCK}] only; re-download or re-quantize")


def dequantize_fp8(w8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Block-FP8 weight -> float32, equal bit for bit to quant.fp8.dequantize_blocks.

    Args: w8 float8_e4m3fn [out, in]; scale_inv float [ceil(out/block), ceil(in/block)].
    Returns a new float32 [out, in] tensor (allocated here). The scale is applied in place one
    row-block at a time, so peak memory is the f32 output plus one [in] scale row (a full expanded
    scale would double it: 0.5 GB extra for K2's dense 18432 x 7168 MLP). Ragged edges are cropped.
    """
    out_f, in_f = w8.shape
    if tuple(scale_inv.shape) != scale_grid_shape(out_f, in_f, block):
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)} but a {(out_f, in_f)} weight with "
                         f"{block}x{block} blocks needs {scale_grid_shape(out_f, in_f, block)}")
    w = w8.to(torch.float32)
    s = scale_inv.to(torch.float32)
    for i in range(s.shape[0]):
        w[i * block:(i + 1) * block] *= s[i].repeat_interleave(block)[:in_f]
    return w


class Checkpoint:
    """A Hugging Face model folder: model.safetensors.index.json + shards, or a single model.safetensors.

    Tensors are read lazily with safetensors.safe_open (framework="pt"), never the whole model at once.
    `names` lists the tensors without their `*_scale_inv` companions; every lookup also accepts a
    companion's name (get() then returns the raw scale grid).

    Example:
        >>> with Checkpoint.open("Kimi-K2-Instruct") as ckpt:
        ...     w = ckpt.get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", torch.bfloat16,
        ...                  expect_shape=(576, 7168))
    """

    def __init__(self, model_dir: Path, infos: dict[str, TensorInfo], metadata: dict[str, dict[str, str]]):
        self.model_dir = model_dir
        self._infos = infos
        self._metadata = metadata            # shard path -> its header's __metadata__
        self._handles: dict[Path, object] = {}
        self._closed = False
        self.names = sorted(n for n in infos
                            if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in infos))

    @classmethod
    def open(cls, model_dir) -> "Checkpoint":
        """Validate the folder from its index and headers (no tensor data read); raise CheckpointError."""
        folder = Path(model_dir)
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise CheckpointError(f"model folder {what}", file=folder,
                                  fix="pass the folder that holds config.json and the .safetensors files")
        if (folder / INDEX_NAME).is_file():
            infos, metadata = _read_sharded(folder, folder / INDEX_NAME)
        elif (folder / SINGLE_NAME).is_file():
            infos, meta = read_header(folder / SINGLE_NAME)
            metadata = {folder / SINGLE_NAME: meta}
        else:
            found = sorted(p.name for p in folder.glob("*.safetensors"))[:5]
            raise CheckpointError(
                f"holds neither {INDEX_NAME} nor {SINGLE_NAME}" + (f" (but has {found})" if found else ""),
                file=folder, fix=f"download {INDEX_NAME} too" if found else
                "pass a Hugging Face model folder with safetensors weights")
        _check_fp8(infos)
        return cls(folder, infos, metadata)

    def _info(self, name: str) -> TensorInfo:
        if self._closed:
            raise ValueError(f"Checkpoint {self.model_dir} is closed; open it again to read '{name}'")
        info = self._infos.get(name)
        if info is None:
            near = difflib.get_close_matches(name, self._candidates(name), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise CheckpointError(f"tensor '{name}' is not in this checkpoint ({len(self.names)} tensors){hint}",
                                  file=self.model_dir, fix="check the name against Checkpoint.names; "
                                  "config.json may describe a different model than these weights")
        return info

    def _candidates(self, name: str) -> list[str]:
        # difflib over K2's ~140k names takes seconds; compare with the same module's tensors instead.
        if len(self._infos) <= 10_000:
            return list(self._infos)
        parent = name.rsplit(".", 2)[0]
        return [n for n in self._infos if n.startswith(parent)]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype string: "BF16", "F32", "F8_E4M3", ..."""
        return self._info(name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor as stored (its scale companion not included)."""
        info = self._info(name)
        n = ITEMSIZE[info.dtype]
        for d in info.shape:
            n *= d
        return n

    def is_fp8(self, name: str) -> bool:
        return self._info(name).dtype == FP8_DTYPE

    def file_of(self, name: str) -> Path:
        return self._info(name).file

    def shard_metadata(self, name: str) -> dict[str, str]:
        """The `__metadata__` of the shard holding `name` (where converted stores record their format)."""
        return dict(self._metadata[self._info(name).file])

    def _read(self, name: str) -> torch.Tensor:
        info = self._info(name)
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(info.file, framework="pt")
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"could not be read ({type(e).__name__}: {e})", file=info.file,
                                  tensor=name, fix=REDOWNLOAD) from e

    def get_raw(self, name: str) -> torch.Tensor:
        """One tensor exactly as stored (any dtype; FP8 stays float8_e4m3fn, its scale is a separate name)."""
        return self._read(name)

    def check_shape(self, name: str, expect_shape: tuple) -> None:
        """Raise CheckpointError (naming the file and tensor) unless `name` is stored with this shape."""
        info = self._info(name)
        if tuple(expect_shape) != info.shape:
            raise CheckpointError(
                f"has shape {list(info.shape)} but {list(expect_shape)} was expected: the config.json does "
                "not match the weights", file=info.file, tensor=name,
                fix="use the config.json that came with this checkpoint")

    def get(self, name: str, dtype: torch.dtype = torch.float32, expect_shape: tuple | None = None) -> torch.Tensor:
        """Read one tensor as `dtype` (BF16/F16/F32 converted; F8_E4M3 dequantized with its scale).

        Args:
            name: tensor name as in the checkpoint.
            dtype: a floating torch dtype for the result.
            expect_shape: the shape config.json implies; a different stored shape raises CheckpointError.
        Returns a tensor owned by the caller (it may share a copy-on-write memory map of the file when
        no conversion was needed). FP8 goes through float32 (exact product), then rounds to `dtype`.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
        info = self._info(name)
        if expect_shape is not None:
            self.check_shape(name, expect_shape)
        if info.dtype != FP8_DTYPE:
            return self._read(name).to(dtype)
        scale_name = name + SCALE_SUFFIX
        _check_scale(name, info, self._info(scale_name))
        return dequantize_fp8(self._read(name), self._read(scale_name)).to(dtype)

    def get_fp8(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw block FP8 for the expert store: (codes uint8 [out, in], scale_inv float32 [ceil(out/128),
        ceil(in/128)]). The arrays may view the file's copy-on-write memory map; they stay valid after
        close() (the map lives as long as they do)."""
        info = self._info(name)
        if info.dtype != FP8_DTYPE:
            raise CheckpointError(f"is {info.dtype}, not {FP8_DTYPE}; get_fp8 returns block-FP8 codes only",
                                  file=info.file, tensor=name, fix="use get() for this tensor")
        scale_name = name + SCALE_SUFFIX
        _check_scale(name, info, self._info(scale_name))
        codes = self._read(name).view(torch.uint8).numpy()
        return codes, self._read(scale_name).to(torch.float32).numpy()

    def close(self) -> None:
        self._handles.clear()
        self._closed = True

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.model_dir)!r}, {len(self.names)} tensors, {len(self._metadata)} files)"
