"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus, Holtzman et al. 2019).

    temperature == 0:  argmax(logits)
    otherwise:         p = softmax(logits / T); keep the k largest (top_k > 0), then the smallest
                       prefix of the sorted p whose mass reaches top_p (the top token always kept);
                       renormalise and draw with the seeded generator.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    Args:
        temperature: 0 = greedy.
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus mass in (0, 1] (1 = all).
        max_tokens: new tokens to generate at most.
        seed: seeds the sampling generator (None = nondeterministic).
        stop_token_ids: extra ids that end a sequence (the tokenizer's stop ids are added by generate()).
        ignore_eos: do not stop on the tokenizer's stop ids.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: logits (B, vocab) -> (B,) long."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each token
        drop = before >= params.top_p
        drop[:, 0] = False
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
