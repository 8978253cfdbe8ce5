"""Top-k sampling as a logits processor: only the k most likely tokens stay (Anthropic's `top_k`, and the
same field on the OpenAI side, as vLLM accepts it). Applied after a grammar mask, so k counts allowed tokens."""
from __future__ import annotations

import torch


class TopK:
    """LogitsProcessor: every logit below the k-th largest becomes -inf (ties at the k-th all stay)."""

    def __init__(self, k: int):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
        self.k = k

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.k >= logits.numel():
            return logits
        kth = torch.topk(logits, self.k).values[-1]
        return logits.masked_fill_(logits < kth, float("-inf"))

    def accept(self, token: int) -> None:
        pass
