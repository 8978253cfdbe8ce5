"""hybrid-quant convert --dense: the dense linears stored in a format, read back by DenseReader exactly as
the same reader gives them from the source checkpoint (quantized at load); other tensors untouched; the
manifest records the format; another format asked of the store is refused; shapes a format cannot hold
fall back to bf16 with one line per kind; an interrupted dense pass resumes to the same bytes."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import quant.convert as qc
from cpu_experts import reference
from cpu_experts.linear import PackedLinear, PackedMLP
from cpu_experts.pool import RowPool
from quant.checkpoint import Checkpoint
from quant.convert import MANIFEST, convert
from quant.dense import DENSE_LINEARS, DenseReader, dense_kind, stored_names
from quant.verify import read_manifest

MLA = {"heads": 4, "dn": 32, "dv": 32}           # the tiny preset's


def _same(a, b):
    return a.fmt == b.fmt and a.requested == b.requested and np.array_equal(a.buffer, b.buffer)


@pytest.mark.parametrize("dense", ["int4", "fp8", "bf16"])
def test_store_holds_what_the_reader_makes_at_load(tiny_models, tmp_path, dense):
    src = tiny_models("k2", "fp8")
    out = convert(src, tmp_path / "store", "int4", dense=dense, quiet=True)
    manifest = read_manifest(out)
    assert manifest["dense_format"] == dense and manifest["dense_fallbacks"] == {}
    with Checkpoint.open(src) as a, Checkpoint.open(out) as b:
        at_load, stored = DenseReader(a, dense), DenseReader(b, dense, manifest)
        linears = [n for n in a.names if dense_kind(n)]
        assert {dense_kind(n) for n in linears} == set(DENSE_LINEARS) - {"self_attn.q_proj"}
        for n in linears:
            assert _same(stored.linear(n), at_load.linear(n)), n
            codes, scales = stored_names(n[: -len(".weight")], dense)
            assert codes in b and (scales is None or scales in b)
        for n in a.names:                         # norms, router, embeddings: byte for byte
            if not dense_kind(n) and ".experts." not in n:
                assert torch.equal(a.get_raw(n).view(torch.uint8), b.get_raw(n).view(torch.uint8)), n
        kv_b = "model.layers.1.self_attn.kv_b_proj.weight"
        for x, y in zip(stored.mla_kv_b(kv_b, **MLA), at_load.mla_kv_b(kv_b, **MLA)):
            assert _same(x, y)
        if dense == "fp8":                        # the release's FP8 bytes and scales are kept as they are
            codes, scale = a.get_fp8("model.layers.1.self_attn.q_a_proj.weight")
            w = stored.linear("model.layers.1.self_attn.q_a_proj.weight")
            assert np.array_equal(w.codes(), codes) and np.array_equal(w.scales(), scale)


def test_absorbed_kv_b_halves_equal_the_weight(tiny_models):
    """uk_t[h] = W_UK[h]^T and uv[h] = W_UV[h], exactly for fp8/bf16 (bytes rearranged); int4 quantized along dn."""
    with Checkpoint.open(tiny_models("k2", "fp8")) as ck:
        name = "model.layers.1.self_attn.kv_b_proj.weight"
        w = ck.get(name, torch.float32).numpy().reshape(4, 64, 32)
        for fmt in ("fp8", "bf16", "int4"):
            uk_t, uv = DenseReader(ck, fmt).mla_kv_b(name, **MLA)
            assert (uk_t.groups, uk_t.rows, uk_t.cols, uv.groups, uv.rows, uv.cols) == (4, 32, 32, 4, 32, 32)
            full = DenseReader(ck, fmt).linear(name).dequantize()[0].reshape(4, 64, 32)
            np.testing.assert_array_equal(uv.dequantize(), full[:, 32:])
            want = w[:, :32].transpose(0, 2, 1)
            if fmt == "int4":                     # quantized from the exact float weight, groups along dn
                assert np.abs(uk_t.dequantize() - want).max() <= np.abs(want).max() / 14 * 1.01
            else:
                np.testing.assert_array_equal(uk_t.dequantize(), full[:, :32].transpose(0, 2, 1))


def test_store_weights_run_on_the_kernels(tiny_models, tmp_path):
    out = convert(tiny_models("k2", "bf16"), tmp_path / "store", "fp8", dense="fp8", quiet=True)
    pool = RowPool(2)
    with Checkpoint.open(out) as ck:
        dense = DenseReader(ck, "auto", read_manifest(out))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((3, 256)).astype(np.float32)
        q_a = dense.linear("model.layers.1.self_attn.q_a_proj.weight")
        got = PackedLinear(q_a).run(x, np.empty((3, 64), np.float32), pool)
        assert np.abs(got - reference.linear_forward(q_a.dequantize(), x)).max() <= 5e-5 * np.abs(got).max()
        mats = dense.mlp("model.layers.1.mlp.shared_experts")
        got = PackedMLP(*mats).run(x, np.empty((3, 256), np.float32), pool)
        ref = reference.expert_forward(*(m.dequantize()[0] for m in mats), x)
        assert np.abs(got - ref).max() <= 5e-5 * np.abs(ref).max()
    pool.close()


def test_another_format_is_refused_with_the_fix(tiny_models, tmp_path):
    out = convert(tiny_models("k2", "fp8"), tmp_path / "store", "int4", dense="int4", quiet=True)
    with Checkpoint.open(out) as ck:
        with pytest.raises(ValueError, match="this store holds int4 dense weights; pass --dense int4 .* "
                                             "convert again with --dense fp8"):
            DenseReader(ck, "fp8", read_manifest(out))
        assert DenseReader(ck, "auto", read_manifest(out)).linear("lm_head.weight").fmt == "int4"


def test_shapes_int4_cannot_hold_fall_back_to_bf16_once_per_kind(tmp_path):
    from hybrid.models.tiny import make_tiny
    src = make_tiny(tmp_path / "src", weights="bf16", tokenizer=False, overrides={"kv_lora_rank": 48,
                                                                                  "moe_intermediate_size": 80})
    out = tmp_path / "store"
    r = subprocess.run([sys.executable, "-m", "quant", "convert", "--input", str(src), "--output", str(out),
                        "--format", "bf16", "--dense", "int4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = sorted(ln for ln in r.stderr.splitlines() if "cannot hold" in ln)
    assert len(lines) == 2 and "bf16" in lines[0] + lines[1], r.stderr
    assert "mlp.shared_experts: int4 cannot hold hidden 256 / inter 80" in lines[0]
    assert "self_attn.kv_b_proj: int4 cannot hold [256, 48]" in lines[1]
    m = json.loads((out / MANIFEST).read_text())
    assert set(m["dense_fallbacks"]) == {"self_attn.kv_b_proj", "mlp.shared_experts"}
    with Checkpoint.open(out) as ck:
        dense = DenseReader(ck, "int4", m)
        w = dense.linear("model.layers.2.self_attn.kv_b_proj.weight")
        assert (w.fmt, w.requested) == ("bf16", "int4")
        assert [x.fmt for x in dense.mlp("model.layers.2.mlp.shared_experts")] == ["bf16"] * 3   # all three
        assert dense.linear("model.layers.2.self_attn.o_proj.weight").fmt == "int4"


def test_interrupted_dense_pass_resumes_to_the_same_bytes(tiny_models, tmp_path, monkeypatch):
    src = tiny_models("k2", "fp8")
    ref = convert(src, tmp_path / "ref", "int4", dense="int4", quiet=True)
    real, calls = qc.convert_tensors, []

    def dies(*args, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(qc, "convert_tensors", dies)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", "int4", dense="int4", quiet=True)
    monkeypatch.setattr(qc, "convert_tensors", real)
    with pytest.raises(qc.ConvertError, match="interrupted conversion with other settings"):
        convert(src, tmp_path / "out", "int4", dense="fp8", quiet=True)
    out = convert(src, tmp_path / "out", "int4", dense="int4", quiet=True)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    for f in files:
        if f.name != MANIFEST:                    # the manifest names its own output folder's source only
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f
