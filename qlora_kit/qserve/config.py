"""The one server config: engine geometry, adapter tiers, request limits and the listening address.

Defaults live here only; `qserve serve` generates its flags from these fields.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

from .store.budget import parse_bytes
from .store.hub import compile_allow

OPEN_WARNING = ("qserve: WARNING: no --api-keys file: authentication is OFF and every caller is an admin "
                "(may call every adapter, load and unload adapters, and read /metrics)")

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
        served_model_name: the base's name in /v1/models and requests (vLLM's --served-model-name); None = the
            checkpoint folder's name.
        chat_template: a jinja2 chat template file, or the template text itself (vLLM's --chat-template); None =
            the checkpoint's. Read and compiled at start-up by `load_chat_template`.
        host: listening address; port: 8000 as vLLM, 0 = any free port (printed at start-up).
        device, dtype: where and in which compute dtype the model runs.
        max_loras: resident adapter slots; max_cpu_loras: adapters kept in host memory (None = no limit).
        adapter_store: a folder of adapters (DIR/<name>/) loaded the first time a request names one (qserve/store).
        adapter_hub_allow: Hub repo ids (ORG/NAME) or patterns (ORG/*, ORG/prefix-*) a request may name as its
            adapter (ORG/NAME or ORG/NAME@REVISION), fetched into the Hugging Face cache on first use
            (qserve/store/hub.py); () = off. A store folder of the same name wins.
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
    api_keys: str | None = field(default=None, metadata={
        "help": "JSON file of API keys, tenants and their adapters (README: security model); None = auth OFF"})
    allowed_root: str | None = field(default=None, metadata={
        "help": "folder that adapters loaded through the admin API must live under; None refuses such loads"})
    base_names: tuple[str, ...] = ()
    served_model_name: str | None = field(default=None, metadata={
        "help": "name of the base in /v1/models and requests' `model` (as vLLM); None = the checkpoint "
                "folder's name"})
    chat_template: str | None = field(default=None, metadata={
        "help": "jinja2 chat template for /v1/chat/completions: a file, or the template itself (as vLLM); "
                "None = the checkpoint's own"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "listening address (vLLM listens on all interfaces; give 0.0.0.0 for that)"})
    port: int = field(default=8000, metadata={"help": "listening port, as vLLM; 0 = any free port (printed)"})
    device: str = field(default="cpu", metadata={"help": "torch device the model runs on (cpu, cuda, cuda:1)"})
    dtype: str = field(default="bfloat16", metadata={
        "help": "compute dtype of activations and dequantized weights", "choices": ("bfloat16", "float16", "float32")})
    max_loras: int = field(default=8, metadata={
        "help": "adapters resident at once (slots in the batched LoRA weights)"})
    max_cpu_loras: int | None = field(default=None, metadata={
        "help": "adapters kept loaded in host memory (LRU beyond); None = no limit"})
    adapter_store: str | None = field(default=None, metadata={
        "help": "folder of adapters (DIR/NAME/) loaded on a request's first use of NAME"})
    adapter_hub_allow: tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated Hub repo ids or ORG/* patterns a request's model may name (ORG/NAME[@REVISION]); "
                "fetched on first use (adapter_config.json and adapter_model.safetensors only; HF_HUB_OFFLINE and "
                "the HF cache honoured), validated like store adapters; a --adapter-store folder of the same name "
                "wins; empty = Hub loads off"})
    cpu_adapter_budget: str | None = field(default=None, metadata={
        "help": "host bytes for adapter weights, e.g. 512MiB or 2GB; LRU eviction beyond (None: no limit)"})
    adapter_age_cap_s: float = field(default=2.0, metadata={
        "help": "seconds a queued request may be passed over by requests whose adapter is resident"})
    max_num_seqs: int = field(default=32, metadata={"help": "requests in one running batch"})
    max_num_batched_tokens: int = field(default=1024, metadata={"help": "tokens one model step may process"})
    max_model_len: int = field(default=2048, metadata={
        "help": "prompt + output tokens of one request (capped at the model's max_position_embeddings)"})
    max_waiting: int = field(default=256, metadata={"help": "queued requests before new ones get HTTP 429"})
    block_size: int = field(default=16, metadata={"help": "tokens per paged KV-cache block"})
    kv_cache_tokens: int = field(default=65536, metadata={"help": "KV-cache size in tokens (rounded up to blocks)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV of shared prompt prefixes (per adapter and tenant)"})
    dequantize_base: bool = field(default=False, metadata={
        "help": "serve a dense copy of the base instead of the 4-bit weights (prints the extra memory it costs)"})
    max_tokens_limit: int = field(default=1024, metadata={
        "help": "largest max_tokens a request may ask for (400 beyond)"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body in bytes (413 beyond)"})
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
        compile_allow(self.adapter_hub_allow)
        if self.kv_cache_tokens < self.max_model_len:
            raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens} < max_model_len={self.max_model_len}: "
                             "one full-length request must fit the KV cache")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name='': must be a non-empty name (flag --served-model-name)")
        if self.chat_template is not None and not self.chat_template.strip():
            raise ValueError("chat_template='': give a template file or the template text (flag --chat-template)")
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapters: duplicate names in {names}")

    @property
    def served_name(self) -> str:
        """The `model` name of the base in requests and /v1/models: served_model_name, else the checkpoint folder's
        name."""
        return self.served_model_name or os.path.basename(os.path.normpath(self.checkpoint))

    @property
    def cpu_budget_bytes(self) -> int | None:
        return None if self.cpu_adapter_budget is None else parse_bytes(self.cpu_adapter_budget)

    @property
    def num_blocks(self) -> int:
        return -(-self.kv_cache_tokens // self.block_size)

    def startup_warnings(self) -> list[str]:
        """What either backend prints before it serves: open authentication, and Hub adapter loads when allowed."""
        out = [OPEN_WARNING] if self.api_keys is None else []
        if self.adapter_hub_allow:
            out.append("qserve: WARNING: --adapter-hub-allow: a request may make this server download an adapter from "
                       f"the Hugging Face Hub repos {', '.join(self.adapter_hub_allow)} on first use (two files: "
                       "adapter_config.json and adapter_model.safetensors, validated before loading)")
        return out


def load_chat_template(value: str) -> str:
    """The chat template `--chat-template` names: the text of an existing file, else `value` itself when it holds
    template syntax (`{`); compiled once here so a broken template fails at start-up, not at the first chat.

    Compiled with the settings models.Tokenizer renders with (trim/lstrip blocks, the loopcontrols extension).

    Raises:
        ServeConfigError: a file that cannot be read, a value that is neither a file nor a template, or a template
            jinja2 cannot compile.
    """
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from .errors import ServeConfigError

    if "\n" not in value and os.path.exists(value):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ServeConfigError(f"chat_template={value!r}: cannot read the file ({e}) "
                                   "(flag --chat-template)") from None
        where = f"chat_template file {value}"
    elif "{" in value:
        text, where = value, "chat_template"
    else:
        raise ServeConfigError(f"chat_template={value!r}: no such file, and not a template (no '{{'); give a jinja2 "
                               "file or the template text (flag --chat-template)")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(text)
    except TemplateSyntaxError as e:
        raise ServeConfigError(f"{where}: not a valid jinja2 template (line {e.lineno}: {e.message}) "
                               "(flag --chat-template)") from None
    return text
