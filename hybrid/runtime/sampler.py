"""Token sampling for one request: penalties -> logits processors (e.g. a grammar mask) -> greedy or
temperature + nucleus (top-p) with the request's own seeded generator -> optional log-probabilities.

    sampler = Sampler(SamplingParams(temperature=0.7, seed=1), processors=(grammar_mask,))
    s = sampler(logits)          # logits [V] float32, any device -> TokenSample(token, logprob, top)

Each request owns its Sampler (its generator and its counts of generated tokens), so a seeded request
samples the same tokens alone or among others in a batch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import torch

from hybrid.core.sampling import SamplingParams


class LogitsProcessor(Protocol):
    """Changes the logits before a token is chosen, and learns which token was chosen.

    __call__(logits [V] float32 on the host) -> logits (may modify in place; -inf forbids a token).
    accept(token): the token this request took (a grammar advances its state).
    """

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


@dataclass(frozen=True)
class TokenSample:
    token: int
    logprob: float | None = None                   # log-probability of `token` (when logprobs were asked for)
    top: tuple[tuple[int, float], ...] = ()        # the most likely alternatives, (token, logprob), best first


class Sampler:
    def __init__(self, params: SamplingParams | None = None, processors: tuple[LogitsProcessor, ...] = ()):
        self.params = params or SamplingParams()
        self.processors = tuple(processors)
        self.counts: Counter[int] = Counter()      # generated tokens so far (penalties)
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> TokenSample:
        p = self.params
        logits = logits.detach().float().cpu()
        if p.penalized and self.counts:
            logits = self._penalize(logits.clone())
        for proc in self.processors:
            logits = proc(logits)
        tok = int(logits.argmax()) if p.greedy else self._draw(logits)
        for proc in self.processors:
            proc.accept(tok)
        self.counts[tok] += 1
        if p.logprobs is None:
            return TokenSample(tok)
        lp = torch.log_softmax(logits, dim=-1)
        top = ()
        if p.logprobs:
            v, i = lp.topk(min(p.logprobs, lp.numel()))
            top = tuple(zip(i.tolist(), v.tolist()))
        return TokenSample(tok, float(lp[tok]), top)

    def _penalize(self, logits: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(list(self.counts.keys()), dtype=torch.long)
        n = torch.tensor(list(self.counts.values()), dtype=torch.float32)
        logits[ids] -= n * self.params.frequency_penalty + self.params.presence_penalty
        return logits

    def _draw(self, logits: torch.Tensor) -> int:
        probs = torch.softmax((logits - logits.max()) / self.params.temperature, dim=-1)   # no overflow
        if self.params.top_p < 1.0:
            q, idx = probs.sort(descending=True)
            keep = q.cumsum(0) - q < self.params.top_p      # smallest prefix whose mass reaches top_p
            keep[0] = True                                   # >= 1 token, also when top_p rounds to 0 in float32
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], q[keep])
        if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
            raise ValueError("every token was excluded (all logits are -inf after penalties and processors); "
                             "the logits processors left nothing to sample")
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One token from logits [V] (no penalties, no processors): greedy at temperature 0, else temperature +
    top-p drawn with `generator`. Validates like SamplingParams."""
    s = Sampler(SamplingParams(temperature=temperature, top_p=top_p))
    if generator is not None:
        s.generator = generator
    return s(logits).token
