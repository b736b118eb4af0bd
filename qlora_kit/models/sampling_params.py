"""The one SamplingParams: how to pick tokens and when to stop, for offline generate() and the server alike.

Plain Python (no torch), so qserve's torch-free engine core can hold it. The defaults here are the offline ones
(greedy, 64 new tokens), used by `models.generate`. The HTTP layer applies the OpenAI/vLLM
defaults itself (temperature 1.0 in qserve/api/protocol.py, max_tokens 16 in qserve/api/app.py), so API users
get what OpenAI and vLLM give them.
"""
from dataclasses import dataclass

from .errors import SamplingError

# Below this, logits / T overflow float32 (|logit| ~ 1e2 / 1e-3 is fine; / 1e-300 is inf and softmax is NaN).
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 2.0  # OpenAI's upper bound
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch.Generator accepts


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings, validated on construction.

    Args:
        temperature: 0 means greedy; otherwise in [MIN_TEMPERATURE, 2].
        top_p: nucleus mass in (0, 1].
        top_k: keep the k most likely tokens; 0 or -1 disables.
        max_tokens: most tokens to generate, >= 1.
        stop_token_ids: token ids that end generation (the tokenizer's stop ids are added by the caller unless
            ignore_eos).
        stop: strings that end generation; matched on detokenized text by the serving engine (generate(), which
            works on token ids, refuses them).
        seed: RNG seed in SEED_RANGE, or None (nondeterministic).
        ignore_eos: keep generating past the tokenizer's stop ids.

    Raises:
        SamplingError (a ValueError) naming the field and its allowed range.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(field, value, rule):
            raise SamplingError(f"{field}={value!r}: {rule}")

        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) \
                or not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            bad("temperature", t, f"must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}]")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", self.top_k, "must be an integer >= 1, or 0/-1 to disable")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "must be a tuple of token ids >= 0")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "must be a tuple of non-empty strings")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            bad("seed", self.seed, f"must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or null")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
