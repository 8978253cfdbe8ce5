"""export-gguf: a K2 / DeepSeek-V3 checkpoint as a GGUF of llama.cpp's `deepseek2` architecture.

llama.cpp then runs exactly our weights: a second, independent oracle for the runtime, and the baseline
of bench/. Names, shapes and metadata keys follow llama.cpp's convert_hf_to_gguf.py (DeepseekV2Model)
and its deepseek2 loader (docs/formats.md, "Output: GGUF"): MLA split of kv_b_proj into attn_k_b (K half,
transposed) and attn_v_b, experts stacked per layer, router bias as exp_probs_b, sigmoid gating (2),
MQA view of MLA (head_count_kv 1, key_length kv_lora_rank + rope dims), yarn_log_multiplier =
0.1 * mscale_all_dim (the loader divides by 0.1 again).

Streaming: the file's header is written from the config and the checkpoint's headers alone, then each
tensor is read, converted and written in row chunks of at most 64 MB of f32 (one routed expert at a
time), so peak memory is one source tensor as read (K2's largest: the BF16 embedding, 2.3 GB; an FP8
dense MLP matrix dequantized, 0.5 GB) plus one chunk, never the model. The file appears under its name
only when complete (written as NAME.partial, then renamed).

Files: this one (tensor table, streaming writer, CLI), gguf_meta.py (config.json and the key/value
pairs), gguf_vocab.py (the tokenizer as a GGUF vocabulary).

Types: "f32" writes every tensor f32 (for the logit comparison); "bf16" / "q8_0" / "q4_0" convert
weight matrices (experts, attention, dense MLP, embeddings, lm_head) and keep norms, the router and
its bias f32, as llama.cpp's converter does. A matrix whose rows are not a multiple of the 32-value
quant block falls back to bf16. Conversions use gguf-py's reference quantizers (llama.cpp's rounding).

Known llama.cpp behaviour the file cannot change (run-time settings, documented in
bench/llama_build.md): the deepseek2 loader ignores rope.scaling.yarn_beta_fast/slow and uses 32/1;
K2 needs 1/1, so pass yarn_beta_fast=1.0 (CLI: --yarn-beta-fast 1) or positions get wrong rotations.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from quant.checkpoint import Checkpoint
from quant.errors import CheckpointError
from quant.gguf_meta import GGUFExportError, read_config, write_metadata
from quant.gguf_vocab import read_vocab

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
EXPORT_TYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
                "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
ARCH = "deepseek2"
CHUNK_VALUES = 16 << 20          # rows per chunk so one f32 chunk is <= 64 MB


# ---- tensor plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: name, numpy-order shape (GGUF lists it reversed), type, and a source of f32
    row chunks that together make the tensor in order."""
    name: str
    shape: tuple[int, ...]
    qtype: Q
    chunks: Callable[[], Iterator[np.ndarray]]
    sources: tuple[tuple[str, tuple[int, ...]], ...]     # (checkpoint name, expected shape)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def tensor_type(name: str, shape: tuple[int, ...], export_type: str) -> Q:
    """GGUF type of one tensor: f32 for vectors, norms, the router and its bias (llama.cpp keeps
    these f32); else the export type, or bf16 where rows do not fill whole quant blocks."""
    if len(shape) == 1 or name.endswith(("_norm.weight", ".ffn_gate_inp.weight", ".bias")):
        return Q.F32
    qtype = EXPORT_TYPES[export_type][0]
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.BF16


def _gname(kind: T, layer: int | None = None, suffix: str = "weight") -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=layer) + "." + suffix


def _source(ck: Checkpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One checkpoint tensor, FP8 dequantized to f32 (exact), BF16/F16 kept (converted per chunk)."""
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(ck.dtype(name), torch.float32)
    return ck.get(name, dtype, expect_shape=shape)


def _rows(ck: Checkpoint, name: str, shape: tuple[int, ...]) -> Callable[[], Iterator[np.ndarray]]:
    def gen():
        t = _source(ck, name, shape)
        rows = t.reshape(-1, shape[-1])
        step = max(1, CHUNK_VALUES // shape[-1])
        for i in range(0, rows.shape[0], step):
            yield rows[i:i + step].to(torch.float32).numpy()
    return gen


def _experts(ck: Checkpoint, names: list[str], shape: tuple[int, int]) -> Callable[[], Iterator[np.ndarray]]:
    def gen():                          # expert e is slice e of the stacked [E, out, in] tensor
        for n in names:
            yield _source(ck, n, shape).to(torch.float32).numpy()
    return gen


def _kv_b(ck: Checkpoint, name: str, cfg: dict, part: str) -> Callable[[], Iterator[np.ndarray]]:
    nh, dn, dv, r = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"])

    def gen():
        # kv_b_proj rows per head: dn rows of K_nope, then dv rows of V (docs/model.md, "MLA").
        kv_b = _source(ck, name, (nh * (dn + dv), r)).to(torch.float32).view(nh, dn + dv, r)
        k_b, v_b = kv_b.split([dn, dv], dim=1)
        yield (k_b.transpose(1, 2) if part == "k" else v_b).contiguous().numpy()   # [nh, r, dn] / [nh, dv, r]
    return gen


def plan_tensors(ck: Checkpoint, cfg: dict, export_type: str) -> list[Planned]:
    """Every GGUF tensor in llama.cpp's order, with HF source, shape and type (no data read)."""
    H, V, nh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    dn, dr, dv, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    qr, E, I = cfg["q_lora_rank"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    out: list[Planned] = []

    def add(gname: str, shape: tuple[int, ...], chunks, sources):
        out.append(Planned(gname, shape, tensor_type(gname, shape, export_type), chunks, tuple(sources)))

    def hf(gname: str, hname: str, shape: tuple[int, ...]):
        add(gname, shape, _rows(ck, hname, shape), [(hname, shape)])

    hf(_gname(T.TOKEN_EMBD), "model.embed_tokens.weight", (V, H))
    for L in range(cfg["num_hidden_layers"]):
        p, a = f"model.layers.{L}.", f"model.layers.{L}.self_attn."
        hf(_gname(T.ATTN_NORM, L), p + "input_layernorm.weight", (H,))
        if qr is None:
            hf(_gname(T.ATTN_Q, L), a + "q_proj.weight", (nh * (dn + dr), H))
        else:
            hf(_gname(T.ATTN_Q_A, L), a + "q_a_proj.weight", (qr, H))
            hf(_gname(T.ATTN_Q_A_NORM, L), a + "q_a_layernorm.weight", (qr,))
            hf(_gname(T.ATTN_Q_B, L), a + "q_b_proj.weight", (nh * (dn + dr), qr))
        hf(_gname(T.ATTN_KV_A_MQA, L), a + "kv_a_proj_with_mqa.weight", (r + dr, H))
        hf(_gname(T.ATTN_KV_A_NORM, L), a + "kv_a_layernorm.weight", (r,))
        kv_b = [(a + "kv_b_proj.weight", (nh * (dn + dv), r))]
        add(_gname(T.ATTN_K_B, L), (nh, r, dn), _kv_b(ck, kv_b[0][0], cfg, "k"), kv_b)
        add(_gname(T.ATTN_V_B, L), (nh, dv, r), _kv_b(ck, kv_b[0][0], cfg, "v"), kv_b)
        hf(_gname(T.ATTN_OUT, L), a + "o_proj.weight", (H, nh * dv))
        hf(_gname(T.FFN_NORM, L), p + "post_attention_layernorm.weight", (H,))
        if L < cfg["first_k_dense_replace"]:
            F = cfg["intermediate_size"]
            for kind, proj, shape in ((T.FFN_GATE, "gate", (F, H)), (T.FFN_UP, "up", (F, H)), (T.FFN_DOWN, "down", (H, F))):
                hf(_gname(kind, L), f"{p}mlp.{proj}_proj.weight", shape)
            continue
        hf(_gname(T.FFN_GATE_INP, L), p + "mlp.gate.weight", (E, H))
        hf(_gname(T.FFN_EXP_PROBS_B, L, "bias"), p + "mlp.gate.e_score_correction_bias", (E,))
        for kind, proj, shape in ((T.FFN_GATE_EXP, "gate", (I, H)), (T.FFN_UP_EXP, "up", (I, H)),
                                  (T.FFN_DOWN_EXP, "down", (H, I))):
            names = [f"{p}mlp.experts.{e}.{proj}_proj.weight" for e in range(E)]
            add(_gname(kind, L), (E, *shape), _experts(ck, names, shape), [(n, shape) for n in names])
        S = I * cfg["n_shared_experts"]
        for kind, proj, shape in ((T.FFN_GATE_SHEXP, "gate", (S, H)), (T.FFN_UP_SHEXP, "up", (S, H)),
                                  (T.FFN_DOWN_SHEXP, "down", (H, S))):
            hf(_gname(kind, L), f"{p}mlp.shared_experts.{proj}_proj.weight", shape)
    hf(_gname(T.OUTPUT_NORM), "model.norm.weight", (H,))
    hf(_gname(T.OUTPUT), "lm_head.weight", (V, H))
    return out


def check_sources(ck: Checkpoint, plan: list[Planned]) -> None:
    """Every source tensor present with the shape config.json implies, from the headers alone, before
    a byte is written: a wrong folder fails in a second, not half-way through a 1 TB export.
    Tensors the plan does not use (the MTP layer, which llama.cpp's converter skips too) are ignored."""
    for t in plan:
        for name, shape in t.sources:
            if ck.shape(name) != shape:                        # ck.shape raises naming a missing tensor
                raise CheckpointError(f"has shape {list(ck.shape(name))} but config.json implies {list(shape)}",
                                      file=ck.file_of(name), tensor=name,
                                      fix="use the config.json that came with these weights")


# ---- writing -----------------------------------------------------------------------------------
def _encode(chunk: np.ndarray, qtype: Q) -> np.ndarray:
    chunk = np.ascontiguousarray(chunk, dtype=np.float32)
    return chunk if qtype == Q.F32 else gguf.quants.quantize(chunk, qtype)


def export_gguf(input_dir, output_path, type: str = "q4_0", progress: Callable[[str], None] | None = None) -> Path:
    """Write the checkpoint in `input_dir` as a llama.cpp deepseek2 GGUF.

    Args:
        input_dir: a Hugging Face model folder (config.json, safetensors, BF16 or block-FP8) with
            K2-format tokenizer files (tiktoken.model, tokenizer_config.json).
        output_path: the .gguf file to write (its folder must exist; an existing file is replaced).
        type: "f32", "bf16", "q8_0" or "q4_0" for the weight matrices (see the module docstring).
        progress: optional callback receiving one line per tensor written.
    Returns: the output path.
    Raises: GGUFExportError (config/type), CheckpointError (weights), FileNotFoundError/ValueError
        (tokenizer files). Nothing is left under output_path unless the write completed.

    Example:
        >>> export_gguf("Kimi-K2-Instruct", "k2-q4_0.gguf", "q4_0")
    """
    if type not in EXPORT_TYPES:
        raise GGUFExportError(f"type {type!r} is not supported; choose one of {', '.join(EXPORT_TYPES)}")
    src, out = Path(input_dir), Path(output_path)
    if not src.is_dir():
        raise GGUFExportError(f"input {src} is not a folder; pass the model folder that holds config.json")
    if not out.parent.is_dir():
        raise GGUFExportError(f"output folder {out.parent} does not exist; create it first")
    if out.is_dir():        # checked now, not at the final rename hours later
        raise GGUFExportError(f"--output {out} is a folder; name the .gguf file to write, e.g. {out / 'model.gguf'}")
    cfg = read_config(src)
    vocab = read_vocab(src, cfg["vocab_size"])
    tmp = out.with_name(out.name + ".partial")
    with Checkpoint.open(src) as ck:
        plan = plan_tensors(ck, cfg, type)
        check_sources(ck, plan)
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            write_metadata(writer, cfg, vocab, EXPORT_TYPES[type][1], src.name)
            for t in plan:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_data(writer, plan, progress)
            writer.close()
            os.replace(tmp, out)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    return out


def _write_data(writer: gguf.GGUFWriter, plan: list[Planned], progress) -> None:
    # GGUFWriter.write_tensor_data takes whole tensors; experts and embeddings are written chunk by
    # chunk instead, with the writer's own alignment rule (offsets were fixed by write_ti_data_to_file).
    fout = writer.fout[0]
    for t in plan:
        writer.write_padding(fout, fout.tell())
        written = 0
        for chunk in t.chunks():
            data = _encode(chunk, t.qtype)
            data.tofile(fout)
            written += data.nbytes
        assert written == t.nbytes, f"{t.name}: wrote {written} bytes, header says {t.nbytes}"
        writer.write_padding(fout, written)
        if progress:
            progress(f"{t.name} {t.qtype.name} {list(t.shape)}")


# ---- command line ------------------------------------------------------------------------------
def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add `export-gguf --input DIR --output FILE.gguf --type q4_0|q8_0|bf16|f32` to a subparsers object."""
    p = subparsers.add_parser("export-gguf", help="write a checkpoint as a llama.cpp deepseek2 GGUF",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="Hugging Face model folder (BF16 or block FP8)")
    p.add_argument("--output", required=True, type=Path, help="the .gguf file to write")
    p.add_argument("--type", default="q4_0", choices=list(EXPORT_TYPES), help="weight type (default q4_0)")
    p.add_argument("--quiet", action="store_true", help="no per-tensor progress lines")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    out = export_gguf(args.input, args.output, args.type, progress=None if args.quiet else print)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0
