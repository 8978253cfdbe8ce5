"""The noaux_tc router of K2 / DeepSeek-V3, in float32.

s = sigmoid(h W^T); the bias e_score_correction_bias is added ONLY to choose experts (with an optional
group limit: keep the topk_group groups whose top-2 biased scores sum highest); the weights are the
UNBIASED scores of the chosen experts, renormalized when norm_topk_prob, then multiplied by
routed_scaling_factor (2.827 for K2).
"""
import torch
from torch import nn

# T = tokens, E = routed experts, H = hidden, k = experts per token


class Router(nn.Module):
    def __init__(self, hidden: int, n_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden), requires_grad=False)      # [E, H]
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))             # [E] f32
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """[T, H] -> unbiased sigmoid affinities [T, E] float32."""
        return torch.nn.functional.linear(h.float(), self.weight.float()).sigmoid()

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H] -> (topk_ids int64 [T, k], topk_weights float32 [T, k])."""
        s = self.scores(h)
        choice = s + self.e_score_correction_bias.float()
        if self.n_group > 1:
            T, E = choice.shape
            grouped = choice.view(T, self.n_group, E // self.n_group)
            group_score = grouped.topk(2, dim=-1)[0].sum(-1)                         # [T, G]
            keep = group_score.topk(self.topk_group, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~mask[..., None], float("-inf")).view(T, E)
        ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        w = s.gather(1, ids)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return ids, w * self.routed_scaling_factor
