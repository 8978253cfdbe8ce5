"""Dense (non-expert) linears in their stored format (hybrid/runtime/dense.py): the release's FP8 run by the
project's kernels stays faithful to the oracle; INT4 stays close; the CUDA-side module (packed on the device,
dequantized per use) equals the float one; bad requests are refused with the fix."""
import pytest
import torch

import hybrid
from hybrid.runtime import dense as rd

from tests.oracle import oracle_greedy, oracle_logits, oracle_model

PROMPT = [5, 17, 300, 42, 7, 99, 1000, 3, 64, 12]


@pytest.mark.parametrize("kind", ["k2", "v3", "noqlora"])
def test_fp8_dense_on_the_kernels_matches_the_oracle(tiny_models, kind, tmp_path):
    model = tiny_models(kind, "fp8")
    # the defaults: experts and dense layers in the checkpoint's own formats (FP8, lm_head bf16) on the kernels
    eng = hybrid.load(model, device="cpu")
    assert eng.info.dense == "auto" and eng.stats().dense == "auto" and eng.info.experts == "fp8"
    assert isinstance(eng.model.model.layers[0].self_attn.kv_a_proj_with_mqa, rd.CpuLinear)
    oracle = oracle_model(model, tmp_path / "oracle")        # the same bytes, dequantized to float32
    assert (eng.forward(PROMPT) - oracle_logits(oracle, PROMPT)).abs().max().item() < 1e-4
    assert eng.generate(PROMPT, 12, stop_ids=()) == oracle_greedy(oracle, PROMPT, 12)


def test_int4_dense_stays_close_to_bf16(capsys):
    """On the shipped trained model (real weight distributions; random tiny weights amplify any rounding) and
    real text: per-position logits cosine and teacher-forced greedy agreement of INT4 dense against BF16."""
    from hybrid.models.tiny import ensure_default_tiny
    from hybrid.text.bpe import CORPUS
    model = ensure_default_tiny()
    ref = hybrid.load(model, device="cpu", experts="bf16", dense="bf16")
    q = hybrid.load(model, device="cpu", experts="bf16", dense="int4")
    ids = ref.tokenizer.encode(CORPUS.read_text()[:4000])[:400]
    a, b = ref.forward(ids), q.forward(ids)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\n[dense int4 vs bf16, {len(ids)} positions] logits cosine mean {cos.mean().item():.4f} "
              f"(min {cos.min().item():.4f}), greedy (teacher-forced top-1) agreement {top1:.1%}")
    assert cos.mean().item() >= 0.99 and top1 >= 0.8           # measured: 0.994 and 86 %


def test_device_dense_dequantizes_per_use_like_the_float_modules(tiny_models, monkeypatch):
    """DeviceDense is what CUDA runs; here it runs on the CPU to check it against the float reference."""
    model = tiny_models("k2", "fp8")
    ref = hybrid.load(model, device="cpu", experts="fp8", dense="torch")
    monkeypatch.setattr("hybrid.runtime.loader.modules_for",
                        lambda dense, dev, dt, pool, act: rd.DeviceDense(dev, dt))
    eng = hybrid.load(model, device="cpu", experts="fp8", dense="auto")     # FP8 as stored, lm_head bf16
    attn = eng.model.model.layers[1].self_attn
    assert isinstance(attn.q_b_proj, rd.DeviceLinear) and attn.q_b_proj.dec.fmt == "fp8"
    assert isinstance(attn.kv_b_proj, rd.DeviceKVUp) and eng.model.lm_head.dec.fmt == "bf16"
    assert (eng.forward(PROMPT) - ref.forward(PROMPT)).abs().max().item() < 1e-4
    assert eng.generate(PROMPT, 8, stop_ids=()) == ref.generate(PROMPT, 8, stop_ids=())


@pytest.mark.parametrize("dense, widened", [("bf16", {"bf16"}), ("auto", {"fp8", "bf16"})])
def test_bf16_prefill_runs_dense_as_gemms_that_agree_with_the_kernels(tiny_models, monkeypatch, dense, widened):
    """bf16 compute, GEMM_TOKENS or more tokens: FP8 and BF16 dense weights are widened to bf16 and multiplied by
    torch's GEMM (the kernels otherwise); decode steps and float32 stay on the kernels; both ways are as close to
    the float32 reference as bf16 allows (random tiny weights: a rounding flips a routing choice at a few
    positions, so the comparison is of whole-prompt statistics). auto: the checkpoint's FP8, lm_head bf16."""
    model = tiny_models("k2", "fp8")
    eng = hybrid.load(model, device="cpu", dtype="bfloat16", threads=1, dense=dense)
    decoded = []
    for cls in (rd.Decodable, rd.Widened):
        monkeypatch.setattr(cls, "weight", lambda self, s, f=cls.weight: decoded.append(self.fmt) or f(self, s))
    long = [(7 * i) % 1000 + 3 for i in range(rd.GEMM_TOKENS + 16)]
    gemm = eng.forward(long).float()
    n_layers = eng.cfg.num_hidden_layers
    assert set(decoded) == widened and len(decoded) >= 5 * n_layers          # q_a, q_b, kv_a, kv_b, o, MLPs, lm_head
    decoded.clear()
    eng.generate(long[:8], 4, stop_ids=())                                          # short prefill + decode
    assert decoded == []
    monkeypatch.setattr(rd, "GEMM_TOKENS", 10**9)
    kernels = eng.forward(long).float()
    assert decoded == []
    f32 = hybrid.load(model, device="cpu", threads=1, dense=dense)                 # float32: always the kernels
    ref = f32.forward(long)
    assert decoded == []
    err = {}
    for name, x in (("gemm", gemm), ("kernels", kernels)):
        assert torch.nn.functional.cosine_similarity(x, ref, dim=-1).mean().item() > 0.995, name
        assert (x.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9, name
        err[name] = (x - ref).abs().median().item()
    assert err["gemm"] < 1.5 * err["kernels"], err


def test_bad_dense_requests_name_the_fix(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="dense='int3' is not one of"):
        hybrid.load(tiny_models("k2", "fp8"), device="cpu", dense="int3")
    from quant.convert import convert
    store = tmp_path / "store"
    convert(tiny_models("k2", "fp8"), store, "fp8", quiet=True, dense="int4")
    with pytest.raises(ValueError, match="this store holds int4 dense weights; pass --dense int4"):
        hybrid.load(store, device="cpu", dense="fp8")
    eng = hybrid.load(store, device="cpu")                                    # auto: the store's own int4
    assert eng.generate(PROMPT, 4, stop_ids=()) and eng.info.dense == "auto"


def test_a_shape_the_format_cannot_hold_falls_back_and_says_so(tiny_models):
    # the v3-like tiny model's MLA ranks include 32-wide inputs (fine for int4 groups of 32); group 64 cannot
    # hold kv_b's 32 inputs: that kind falls back to bf16 with one warning line naming it
    model = tiny_models("v3", "bf16")
    with pytest.warns(UserWarning, match="dense .*: int4 cannot hold"):
        eng = _load_with_group(model, 64)
    assert eng.generate(PROMPT, 4, stop_ids=())


def _load_with_group(model, group):
    from quant.dense import DenseReader
    real = DenseReader.__init__

    def with_group(self, ck, fmt="auto", manifest=None, group_size=None):
        real(self, ck, fmt, manifest, group)
    import unittest.mock
    with unittest.mock.patch.object(DenseReader, "__init__", with_group):
        return hybrid.load(model, device="cpu", experts="bf16", dense="int4")
