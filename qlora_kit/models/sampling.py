"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus, Holtzman et al. 2019).
The settings are the torch-free SamplingParams of sampling_params.py.

    temperature == 0:  argmax(logits)
    otherwise:         p = softmax(logits / T); keep the k largest (top_k > 0), then the smallest
                       prefix of the sorted p whose mass reaches top_p (the top token always kept);
                       renormalise and draw with the seeded generator.
"""
import torch

from .sampling_params import SamplingParams

__all__ = ["SamplingParams", "sample"]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: logits (B, vocab) -> (B,) long."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k > 0:  # 0 and -1 disable
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
