"""hybrid-quant convert: stores load with the same logits as in-memory conversion; interruption-safe; bad input."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hybrid
from quant.convert import JOURNAL, MANIFEST, ConvertError, convert
from quant.errors import CheckpointError

PROMPT = [5, 77, 300, 12, 990, 41, 41, 7]


@pytest.mark.parametrize("source", ["fp8", "bf16"])
@pytest.mark.parametrize("fmt", ["int4", "fp8", "bf16"])
def test_store_logits_equal_in_memory_conversion(tiny_models, tmp_path, source, fmt):
    src = tiny_models("k2", source)
    out = convert(src, tmp_path / "store", fmt, quiet=True)
    from_store = hybrid.load(out, device="cpu")
    assert from_store.info.experts == fmt and from_store.plan.mmap
    in_memory = hybrid.load(src, device="cpu", experts=fmt)
    assert torch.equal(from_store.forward(PROMPT), in_memory.forward(PROMPT))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["expert_format"] == fmt and set(manifest["source_shards"]) == {
        p.name for p in src.glob("*.safetensors")}
    from quant.verify import verify
    report = verify(out, against=src)
    assert report["ok"], report
    if (source, fmt) in (("fp8", "fp8"), ("bf16", "bf16")):
        assert all(v["max_abs_error"] == 0.0 for v in report["numeric"].values())   # released bytes kept


def _tree(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_sigkill_then_rerun_is_byte_identical(tmp_path):
    from hybrid.models.tiny import make_tiny
    # big enough that a conversion takes seconds: 6 MoE layers x 32 experts of 1024 x 512
    src = make_tiny(tmp_path / "src", weights="bf16", tokenizer=False, overrides={
        "hidden_size": 1024, "moe_intermediate_size": 512, "n_routed_experts": 32, "num_experts_per_tok": 4,
        "num_hidden_layers": 7})
    ref = convert(src, tmp_path / "ref", "int4", quiet=True)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quant", "convert", "--input", str(src), "--output", str(out), "--format", "int4",
           "--quiet"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while time.time() < deadline:            # kill as soon as the first layer is recorded as finished
        j = out / JOURNAL
        if j.exists() and "experts/" in j.read_text():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists()
    with pytest.raises(ValueError, match="rerun `hybrid-quant convert`"):
        hybrid.load(out, device="cpu")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _tree(out) == _tree(ref)


def test_resume_rewrites_damaged_files_and_refuses_a_changed_source(tiny_models, tmp_path, monkeypatch):
    import quant.convert as qc
    src = tmp_path / "src"
    shutil.copytree(tiny_models("k2", "fp8"), src)
    ref = convert(src, tmp_path / "ref", "int4", quiet=True)
    out = tmp_path / "out"
    calls = []
    real = qc.LayerStore.build_file

    def dying(*a, **k):                     # an interruption after the dense pass and one layer
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(qc.LayerStore, "build_file", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, "int4", quiet=True)
    monkeypatch.setattr(qc.LayerStore, "build_file", real)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"damaged")           # a finished dense shard damaged between the runs
    convert(src, out, "int4", quiet=True)
    assert _tree(out) == _tree(ref)
    # an interrupted run whose source changed before the resume is refused
    out2 = tmp_path / "out2"
    calls.clear()
    monkeypatch.setattr(qc.LayerStore, "build_file", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out2, "int4", quiet=True)
    monkeypatch.setattr(qc.LayerStore, "build_file", real)
    first = sorted(src.glob("model-*.safetensors"))[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    with pytest.raises(ConvertError, match="source files changed"):
        convert(src, out2, "int4", quiet=True)


def test_store_without_manifest_is_refused(tiny_models, tmp_path):
    out = convert(tiny_models("k2", "fp8"), tmp_path / "s", "fp8", quiet=True)
    (out / MANIFEST).unlink()
    with pytest.raises(ValueError, match="not a complete expert store.*rerun `hybrid-quant convert`"):
        hybrid.load(out, device="cpu")


def test_output_holding_something_else_is_left_alone(tiny_models, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert(tiny_models("k2", "fp8"), out, "int4", quiet=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    done = convert(tiny_models("k2", "fp8"), tmp_path / "s", "int4", quiet=True)
    with pytest.raises(ConvertError, match="already holds a complete store"):
        convert(tiny_models("k2", "fp8"), done, "int4", quiet=True)
    with pytest.raises(ConvertError, match="other settings"):
        convert(tiny_models("k2", "fp8"), done, "bf16", quiet=True)


def test_corrupt_input_and_bad_options(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models("k2", "fp8"), src)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(src, tmp_path / "o", "int4", quiet=True)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConvertError, match="--group-size"):
        convert(tiny_models("k2", "fp8"), tmp_path / "o", "fp8", group_size=64)
    with pytest.raises(ConvertError, match="must differ"):
        convert(src, src, "int4")


def test_too_little_disk_space(tiny_models, tmp_path, monkeypatch):
    import shutil as sh
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConvertError, match="needs about .* GiB more but the disk has"):
        convert(tiny_models("k2", "fp8"), tmp_path / "o", "bf16", quiet=True)


def test_cli_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quant", "convert", "--input", str(tmp_path / "nope"), "--output",
                        str(tmp_path / "o"), "--format", "int4"], capture_output=True, text=True)
    assert r.returncode == 2 and "hybrid-quant: error:" in r.stderr and "Traceback" not in r.stderr


def test_k2_thinking_compressed_tensors_int4_is_lossless(tiny_models, tmp_path):
    """A checkpoint in K2-Thinking's layout converts to our INT4 g32 store bit for bit."""
    from hybrid.core.config import ModelConfig
    from hybrid.core.weights import expert_names
    from quant import int4 as qint4
    from quant.checkpoint import Checkpoint
    from quant.compressed import pack_int32, unpack_int32
    from quant.store import LayerStore
    src = tiny_models("k2", "bf16")
    cfg = ModelConfig.from_file(src)
    ct = tmp_path / "ct"
    ct.mkdir()
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                      "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                      "group_size": 32}}}}
    (ct / "config.json").write_text(json.dumps(raw))
    tensors, released = {}, {}
    with Checkpoint.open(src) as ck:
        for n in ck.names:
            if ".mlp.experts." not in n:
                tensors[n] = ck.get_raw(n).contiguous()
                continue
            q, scales = qint4.quantize_groups(ck.get(n).numpy())
            q[0, 0] = -8                                     # the full signed range, -8 included
            p = n[: -len(".weight")]
            tensors[p + ".weight_packed"] = torch.from_numpy(pack_int32(q))
            tensors[p + ".weight_scale"] = torch.from_numpy(scales.view(np.int16)).view(torch.bfloat16)
            tensors[p + ".weight_shape"] = torch.tensor(q.shape, dtype=torch.int32)
            released[n] = (q, scales)
    assert np.array_equal(unpack_int32(tensors[p + ".weight_packed"].numpy(), q.shape[1]), q)
    save_file(tensors, str(ct / "model.safetensors"))
    out = convert(ct, tmp_path / "store", "int4", quiet=True)
    for L in cfg.moe_layers:
        st = LayerStore.load(out / f"experts/layer-{L:03d}.safetensors")
        for e in range(cfg.n_routed_experts):
            for m, n in zip(("gate", "up", "down"), expert_names(L, e)):
                q, scales = released[n]
                assert np.array_equal(st.section(e, m), qint4.pack(q))
                assert np.array_equal(st.section(e, m + "_scale"), scales)
    from quant.verify import verify
    report = verify(out, against=ct)
    assert report["ok"] and all(v["max_abs_error"] == 0.0 for v in report["numeric"].values())
    assert hybrid.load(out, device="cpu").generate(PROMPT, 4, stop_ids=())


@pytest.mark.parametrize("kind", ["k2", "v3", "noqlora"])
@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_inspect_sizes_the_dense_part_as_a_default_run_keeps_it(tiny_models, kind, weights, capsys):
    """inspect's dense bytes (quant, which may not import hybrid) equal the placement's for --dense auto in bf16:
    FP8 linears stay FP8 (issue 27: inspect said 515.7 MiB in bf16 where a run keeps 273.8 MiB)."""
    from hybrid.core.config import ModelConfig
    from hybrid.core.placement import dense_device_bytes
    from quant.cli import main
    d = tiny_models(kind, weights)
    assert main(["inspect", str(d), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.from_file(d)
    assert rep["dense_device_bytes"] == dense_device_bytes(cfg, 2, "auto", decoded=False)
    assert rep["dense_device_bytes"] + rep["dense_decode_buffer_bytes_cuda"] == dense_device_bytes(cfg, 2, "auto")
    if weights == "fp8":
        assert rep["dense_device_bytes"] < dense_device_bytes(cfg, 2, "torch", decoded=False)


def test_inspect_reports_what_a_run_needs(tiny_models, tmp_path):
    out = convert(tiny_models("k2", "fp8"), tmp_path / "s", "int4", quiet=True)
    for d in (tiny_models("k2", "fp8"), out):
        r = subprocess.run([sys.executable, "-m", "quant", "inspect", str(d), "--json"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["kv_cache_bytes_per_1k_tokens_bf16"] == 1000 * 3 * (32 + 16) * 2   # 3 layers x 48 cached values
    assert set(rep["host_expert_bytes"]) == {"int4"} and "int4" in rep["format"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert rep["host_expert_bytes"]["int4"] == sum(v["bytes"] for k, v in manifest["files"].items()
                                                   if k.startswith("experts/"))
