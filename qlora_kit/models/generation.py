"""A simple batched generate(): left-padded prefill into a StaticKVCache, then one token per step."""
import torch

from .attention import StaticKVCache
from .batch import Batch
from .errors import SamplingError
from .llama import Llama
from .sampling import SamplingParams, sample


@torch.inference_mode()
def generate(
    model: Llama,
    prompts: list[list[int]],
    params: SamplingParams = SamplingParams(),
    adapter_ids: list[int] | None = None,
    stop_token_ids: tuple[int, ...] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt (token ids) until a stop token or params.max_tokens.

    Args:
        model: the decoder.
        prompts: one list of token ids per row (non-empty).
        params: sampling settings; params.stop_token_ids are added to `stop_token_ids`.
        adapter_ids: LoRA adapter per row (-1 = base); None = all base.
        stop_token_ids: ids that end a row (typically Tokenizer.stop_token_ids); ignored with ignore_eos.
        pad_id: id placed in padding slots (never attended).

    Raises:
        ValueError on an empty prompt; SamplingError for stop strings.

    Returns:
        The new tokens per row, the stop token included when one was produced.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if params.stop:
        raise SamplingError(f"stop={params.stop!r}: stop strings need detokenized text; generate() stops on "
                            "token ids only (use stop_token_ids, or qserve)")
    device = model.model.embed_tokens.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):] = torch.tensor(p, device=device)
        mask[row, T - len(p):] = True
    adapters = None if adapter_ids is None else torch.tensor(adapter_ids, dtype=torch.long, device=device)
    cfg = model.cfg
    cache = StaticKVCache(cfg.num_layers, B, T + params.max_tokens, cfg.num_kv_heads, cfg.head_dim,
                          model.dtype, device)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(stop_token_ids))
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    logits = model(Batch(ids, adapter_ids=adapters, attention_mask=mask, cache=cache), last_only=True)
    for step in range(params.max_tokens):
        nxt = sample(logits[:, -1], params, generator)
        for row, tok in enumerate(nxt.tolist()):
            if not done[row]:
                out[row].append(tok)
                done[row] = tok in stops
        if all(done) or step == params.max_tokens - 1:
            break
        logits = model(Batch(nxt.unsqueeze(1), adapter_ids=adapters, cache=cache), last_only=True)
    return out
