"""QK-Clip on hand-built MLA weights, and the aux-loss-free balancing of the router bias."""
from __future__ import annotations

import pytest
import torch

from gpu_attn import MLA, Router, YarnRope
from hybrid.core.config import ModelConfig
from hybrid.models.tiny import PRESETS
from train import TrainModel, balance_bias_, imbalance, qk_clip_
from train.model import attend
from train.qk_clip import qk_clip_model_

NH, DN, DR, DV, R = 4, 8, 4, 8, 8


def _mla(q_lora: int | None, seed: int = 0) -> MLA:
    g = torch.Generator().manual_seed(seed)
    attn = MLA(32, NH, q_lora, R, DN, DR, DV, softmax_scale=(DN + DR) ** -0.5, rope=YarnRope(DR, 10000.0, "default"))
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 if p.dim() == 2 else 1 + 0.1 * torch.randn(p.shape, generator=g))
        wq = (attn.q_proj if q_lora is None else attn.q_b_proj).weight.view(NH, DN + DR, -1)
        wq[1] *= 12.0          # heads 1 and 3 get large logits; 0 and 2 stay small
        wq[3] *= 7.0
    return attn


def _parts(attn: MLA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nope and rope parts of every pre-softmax logit, scale included: each [nh, T, T]."""
    pos = torch.arange(x.shape[0])
    q_nope, q_pe = attn.query(x, pos)
    rows = attn.compress(x, pos)
    k_nope = attn.kv_b_proj(rows[:, :R]).view(-1, NH, DN + DV)[..., :DN]
    nope = torch.einsum("thd,shd->hts", q_nope, k_nope) * attn.scale
    rope = torch.einsum("thd,sd->hts", q_pe, rows[:, R:]) * attn.scale
    return nope, rope


@pytest.mark.parametrize("q_lora", [16, None])
def test_qk_clip_caps_clipped_heads_and_leaves_the_rest_bit_identical(q_lora):
    attn = _mla(q_lora)
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, s = attend(attn, x)
    tau = float(s[[0, 2]].max()) + 1.0
    assert s[1] > tau and s[3] > tau, "the hand-built weights must put heads 1 and 3 over tau"
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    nope0, rope0 = _parts(attn, x[0])

    gamma = qk_clip_(attn, s, tau)

    assert gamma[0] == 1.0 and gamma[2] == 1.0
    torch.testing.assert_close(gamma[[1, 3]], tau / s[[1, 3]], rtol=0, atol=0)
    with torch.no_grad():
        _, s_after = attend(attn, x)
    torch.testing.assert_close(s_after[[1, 3]], torch.full((2,), tau), rtol=1e-5, atol=0)
    assert torch.equal(s_after[[0, 2]], s[[0, 2]])
    nope1, rope1 = _parts(attn, x[0])
    for h in (1, 3):      # q.k scales by exactly gamma: sqrt(gamma) * sqrt(gamma) on nope, gamma on rope
        torch.testing.assert_close(nope1[h], gamma[h] * nope0[h], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rope1[h], gamma[h] * rope0[h], rtol=1e-5, atol=1e-6)
    for h in (0, 2):
        assert torch.equal(nope1[h], nope0[h]) and torch.equal(rope1[h], rope0[h])

    after = attn.state_dict()
    qname = "q_proj.weight" if q_lora is None else "q_b_proj.weight"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {qname, "kv_b_proj.weight"}          # the shared rope key (kv_a_proj_with_mqa) untouched
    q0, q1 = before[qname].view(NH, DN + DR, -1), after[qname].view(NH, DN + DR, -1)
    k0, k1 = before["kv_b_proj.weight"].view(NH, DN + DV, R), after["kv_b_proj.weight"].view(NH, DN + DV, R)
    for h in (0, 2):
        assert torch.equal(q0[h], q1[h]) and torch.equal(k0[h], k1[h])
    for h in (1, 3):
        g = gamma[h].item()
        assert torch.equal(q1[h, :DN], q0[h, :DN] * g ** 0.5)       # q_nope rows x sqrt(gamma)
        assert torch.equal(q1[h, DN:], q0[h, DN:] * g)              # q_rope rows x gamma
        assert torch.equal(k1[h, :DN], k0[h, :DN] * g ** 0.5)       # k_nope rows x sqrt(gamma)
        assert torch.equal(k1[h, DN:], k0[h, DN:])                  # value rows untouched


def test_qk_clip_under_tau_is_a_no_op():
    attn = _mla(16)
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    gamma = qk_clip_(attn, torch.tensor([1.0, 5.0, -3.0, 100.0]), 100.0)
    assert torch.equal(gamma, torch.ones(NH))
    assert all(torch.equal(before[k], v) for k, v in attn.state_dict().items())


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_qk_clip_rejects_tau_not_positive(tau):
    with pytest.raises(ValueError, match="tau must be > 0"):
        qk_clip_(_mla(16), torch.ones(NH), tau)


def test_qk_clip_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        qk_clip_(_mla(16), torch.ones(NH + 1), 10.0)


def test_clip_on_the_updated_weights_caps_every_layer_on_the_batch():
    cfg = ModelConfig.from_dict({**PRESETS["tiny"], "num_hidden_layers": 3})
    model = TrainModel(cfg, seed=0)
    with torch.no_grad():
        for attn in model.attentions():
            attn.q_b_proj.weight.mul_(6.0)             # logits far above tau in every layer
            attn.kv_b_proj.weight.mul_(3.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = torch.stack(model(ids)[1].max_logits)                 # [layers, nh]
    tau = float(before.min()) * 0.8
    gammas = qk_clip_model_(model, ids, tau)
    with torch.no_grad():
        after = torch.stack(model(ids)[1].max_logits)
    assert all((g < 1).all() for g in gammas)
    assert (after <= tau * (1 + 1e-5)).all(), (after, tau)
    torch.testing.assert_close(after, torch.full_like(after, tau), rtol=1e-5, atol=0)


def test_balancing_brings_a_skewed_load_down():
    E, H, k = 16, 32, 4
    g = torch.Generator().manual_seed(0)
    router = Router(H, E, k, 1, 1, True, 2.827)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=g) * 0.1)
        router.e_score_correction_bias[:4] = 0.5        # a skewed start: experts 0-3 chosen by every token
    h = torch.randn(512, H, generator=g)
    loads = []
    for _ in range(300):
        ids, w = router(h)
        load = torch.bincount(ids.flatten(), minlength=E)
        loads.append(imbalance(load))
        balance_bias_(router, load, 5e-3)
    ids, w = router(h)
    final = imbalance(torch.bincount(ids.flatten(), minlength=E))
    assert loads[0] > 3.5, f"the start must be skewed, max/mean load {loads[0]:.2f}"
    assert final < 1.5 and final < loads[0] / 2, (loads[0], final)
    # the bias only chooses: the weights are the unbiased scores of the chosen experts
    s = router.scores(h)
    expect = s.gather(1, ids) / s.gather(1, ids).sum(-1, keepdim=True) * 2.827
    torch.testing.assert_close(w, expect)


def test_balancing_rejects_wrong_load_shape():
    with pytest.raises(ValueError, match="one count per expert"):
        balance_bias_(Router(8, 16, 2, 1, 1, True, 1.0), torch.ones(15), 1e-3)
