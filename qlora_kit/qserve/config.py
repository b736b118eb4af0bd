"""The one server config: engine geometry, adapter tiers, request limits and the listening address.

Defaults live here only; `qserve serve` generates its flags from these fields.
"""
import os
from dataclasses import dataclass, field

from .store.budget import parse_bytes

# The engine's step loop runs in its own thread. With torch's OpenMP pool, a non-main thread using 2 intra-op
# threads runs small ops ~30x slower than with 1 (index_add 128x576: ~900 us vs ~27 us on a 2-core CPU, and a
# 128x576 @ 576x576 matmul no faster), so 1 is the measured default on CPU: `python -m bench.threads`,
# bench/results/serve.md.
ENGINE_THREADS = 1


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything `qserve serve` needs.

    Args:
        checkpoint: the 4-bit (or bf16, quantized at load) model folder.
        adapters: (name, path) pairs loaded at start-up (trusted: operator-given).
        api_keys: JSON key file (see qserve.api.auth); None = no authentication.
        allowed_root: folder that adapters loaded through the admin API must live under; None refuses them.
        base_names: extra names of the served base accepted in adapters' base_model_name_or_path.
        host: listening address; port: 0 = any free port (printed at start-up).
        device, dtype: where and in which compute dtype the model runs.
        max_loras: resident adapter slots; max_cpu_loras: adapters kept in host memory (None = no limit).
        adapter_store: a folder of adapters (DIR/<name>/) loaded the first time a request names one (qserve/store).
        cpu_adapter_budget: bytes of adapter weights kept in host memory (resident ones included), e.g. 512MiB;
            least recently used adapters without running requests are dropped to stay within it (None = no limit).
        adapter_age_cap_s: a queued request older than this is admitted in arrival order, ahead of younger
            requests whose adapter is resident (which are otherwise preferred).
        max_num_seqs, max_num_batched_tokens, max_model_len, max_waiting: scheduler limits (max_waiting -> 429).
        block_size, kv_cache_tokens: paged KV cache geometry (tokens in the cache, rounded up to blocks).
        enable_prefix_caching: reuse KV of shared prompt prefixes (per adapter).
        dequantize_base: off by default (the 4-bit base is served). On: keep a dense copy of the base's
            projections instead, which decodes faster where no fused 4-bit path runs, at ~3.9x the 4-bit weight
            bytes in bf16 (2 bytes a weight vs ~0.52 with double-quantized absmax; the extra MiB are printed at start-up).
        max_tokens_limit: largest max_tokens a request may ask for.
        max_body_bytes: largest request body (413 beyond).
        threads: intra-op CPU threads of the engine's step thread (torch.set_num_threads inside that thread;
            the HTTP thread is unaffected). Default ENGINE_THREADS, chosen by bench.serve at 1 and 2 threads.
        lora_dtype: dtype resident adapter weights are kept in; "auto" = the compute dtype (vLLM's default), which
            halves the bytes each decode step reads per distinct adapter in a batch; "float32" keeps the trained
            fp32 masters.
    """

    checkpoint: str
    adapters: tuple[tuple[str, str], ...] = ()
    api_keys: str | None = None
    allowed_root: str | None = None
    base_names: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    dtype: str = "bfloat16"
    max_loras: int = 8
    max_cpu_loras: int | None = None
    adapter_store: str | None = field(default=None, metadata={
        "help": "folder of adapters (DIR/NAME/) loaded on a request's first use of NAME"})
    cpu_adapter_budget: str | None = field(default=None, metadata={
        "help": "host bytes for adapter weights, e.g. 512MiB or 2GB; LRU eviction beyond (None: no limit)"})
    adapter_age_cap_s: float = field(default=2.0, metadata={
        "help": "seconds a queued request may be passed over by requests whose adapter is resident"})
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_model_len: int = 2048
    max_waiting: int = 256
    block_size: int = 16
    kv_cache_tokens: int = 65536
    enable_prefix_caching: bool = True
    dequantize_base: bool = field(default=False, metadata={
        "help": "serve a dense copy of the base instead of the 4-bit weights (prints the extra memory it costs)"})
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    threads: int = field(default=ENGINE_THREADS, metadata={
        "help": "intra-op CPU threads of the engine's step thread (1 measured fastest on a 2-core CPU: "
                "with 2, small ops in that thread run ~30x slower)"})
    lora_dtype: str = field(default="auto", metadata={
        "help": "dtype of resident adapter weights: auto (= --dtype, as vLLM), bfloat16, float16 or float32"})

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("checkpoint: a model folder is required")
        for key in ("max_loras", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting",
                    "block_size", "kv_cache_tokens", "max_tokens_limit", "max_body_bytes", "threads"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key}={v!r}: must be an integer >= 1 (flag --{key.replace('_', '-')})")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r}: must be in [0, 65535] (0 = any free port)")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype={self.dtype!r}: must be bfloat16, float16 or float32")
        if self.lora_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"lora_dtype={self.lora_dtype!r}: must be auto, bfloat16, float16 or float32")
        if not isinstance(self.adapter_age_cap_s, (int, float)) or not self.adapter_age_cap_s >= 0:
            raise ValueError(f"adapter_age_cap_s={self.adapter_age_cap_s!r}: must be a number >= 0")
        if self.cpu_adapter_budget is not None:
            parse_bytes(self.cpu_adapter_budget)
        if self.adapter_store is not None and not os.path.isdir(self.adapter_store):
            raise ValueError(f"adapter_store={self.adapter_store!r}: not an existing folder (flag --adapter-store)")
        if self.kv_cache_tokens < self.max_model_len:
            raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens} < max_model_len={self.max_model_len}: "
                             "one full-length request must fit the KV cache")
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapters: duplicate names in {names}")

    @property
    def served_name(self) -> str:
        """The `model` name of the base in requests and /v1/models: the checkpoint folder's name."""
        return os.path.basename(os.path.normpath(self.checkpoint))

    @property
    def cpu_budget_bytes(self) -> int | None:
        return None if self.cpu_adapter_budget is None else parse_bytes(self.cpu_adapter_budget)

    @property
    def num_blocks(self) -> int:
        return -(-self.kv_cache_tokens // self.block_size)
