"""vLLM's OpenAI server as a child process: the command line for a ServeConfig, start, readiness, stop.

The child runs `python -m vllm.entrypoints.openai.api_server` in an interpreter that has vLLM and qlora-kit
installed (the `vllm` extra; the `vllm` console script of the CPU build is broken). It listens on loopback
only, on a free port, behind a random API key that only qserve's front knows, so tenants cannot reach it
around the front's authentication and per-tenant adapter checks.
"""
import ctypes
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import click

from qlora_kit.formats.errors import QloraKitError

from ..config import ServeConfig
from ..errors import AdapterRefused
from ..vllm_plugin import NAME
from ..vllm_plugin.errors import BackendStartError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True, slots=True)
class VllmOptions:
    """What `--backend vllm` adds to ServeConfig.

    Args:
        python: interpreter with vLLM + qlora-kit; None = $QSERVE_VLLM_PYTHON, else this interpreter.
        tensor_parallel_size, pipeline_parallel_size, data_parallel_size: vLLM's parallelism.
        max_lora_rank: None = the largest rank among start-up adapters and adapters under allowed_root
            (16 when there are none), rounded up to a rank vLLM accepts.
        enforce_eager: None = eager on CPU, CUDA graphs on GPU.
        startup_timeout_s: how long vLLM may take to load before start-up fails.
        extra_args: passed to vLLM's server verbatim, last.
    """

    python: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    max_lora_rank: int | None = None
    enforce_eager: bool | None = None
    startup_timeout_s: float = 600.0
    extra_args: tuple[str, ...] = ()

    def __post_init__(self):
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key}={v!r}: must be an integer >= 1 (flag --{key.replace('_', '-')})")
        if self.max_lora_rank is not None and not 1 <= self.max_lora_rank <= VLLM_RANKS[-1]:
            raise ValueError(f"max_lora_rank={self.max_lora_rank!r}: must be in [1, {VLLM_RANKS[-1]}]")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s!r}: must be > 0")


_FLAG_NAMES = {"python": "--vllm-python", "startup_timeout_s": "--vllm-startup-timeout", "extra_args": "--vllm-arg"}
_HELP = {
    "python": "interpreter with vLLM and qlora-kit installed (env QSERVE_VLLM_PYTHON, else this one)",
    "tensor_parallel_size": "vLLM tensor-parallel workers",
    "pipeline_parallel_size": "vLLM pipeline-parallel stages",
    "data_parallel_size": "vLLM data-parallel replicas",
    "max_lora_rank": "vLLM's --max-lora-rank (auto: the largest start-up / allowed-root adapter rank, rounded up "
                     "to one vLLM accepts)",
    "enforce_eager": "vLLM without CUDA graphs (auto: eager on CPU only)",
    "startup_timeout_s": "seconds vLLM may take to load before start-up fails",
    "extra_args": "one extra vLLM server argument, passed verbatim, last (repeatable)",
}


def vllm_cli_options(fn):
    """`qserve serve` flags for VllmOptions (keyword names prefixed `vllm_`), defaults left to the dataclass."""
    for f in reversed(fields(VllmOptions)):
        flag = _FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        kw = "vllm_" + f.name
        default = "" if f.name == "extra_args" else f"; default: {f.default if f.default is not None else 'auto'}"
        help_ = f"{_HELP[f.name]} [--backend vllm{default}]"
        if f.name == "enforce_eager":
            fn = click.option(f"{flag}/--no-enforce-eager", kw, default=None, help=help_)(fn)
        elif f.name == "extra_args":
            fn = click.option(flag, kw, multiple=True, help=help_)(fn)
        else:
            kind = {"python": str, "startup_timeout_s": float}.get(f.name, int)
            fn = click.option(flag, kw, type=kind, default=None, help=help_)(fn)
    return fn


def pop_vllm_options(flags: dict) -> VllmOptions:
    """Remove the `vllm_*` keywords of vllm_cli_options from `flags` and build VllmOptions (ValueError if bad)."""
    got = {k[len("vllm_"):]: flags.pop(k) for k in [k for k in flags if k.startswith("vllm_")]}
    got = {k: (tuple(v) if k == "extra_args" else v) for k, v in got.items() if v is not None and v != ()}
    return VllmOptions(**got)


def adapter_rank(folder: str | os.PathLike) -> int:
    """Largest LoRA rank in a PEFT adapter folder (r and rank_pattern of adapter_config.json, read by formats/)."""
    from qlora_kit.formats.peft import CONFIG_NAME, LoraConfig  # torch loads only when vLLM is started

    path = Path(folder) / CONFIG_NAME
    try:
        cfg = LoraConfig.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError, QloraKitError) as e:
        raise AdapterRefused(f"{path}: cannot be read ({e})") from None
    return max([cfg.r, *cfg.rank_pattern.values()])


def _adapter_folders(root: str, depth: int = 3) -> list[str]:
    out = []
    for here, dirs, files in os.walk(root):
        if "adapter_config.json" in files:
            out.append(here)
        if here[len(root):].count(os.sep) >= depth:
            dirs[:] = []
    return out


def lora_rank(config: ServeConfig, opts: VllmOptions) -> int:
    """vLLM's --max-lora-rank: the option, or the largest adapter rank found (start-up adapters, the allowed root and
    the adapter store), rounded up to an allowed value."""
    if opts.max_lora_rank is not None:
        want = opts.max_lora_rank
    else:
        folders = [p for _, p in config.adapters] + [f for root in (config.allowed_root, config.adapter_store)
                                                     if root for f in _adapter_folders(root)]
        ranks = []
        for f in folders:
            try:
                ranks.append(adapter_rank(f))
            except AdapterRefused:
                continue  # unreadable folders are refused later, when someone loads them
        want = max(ranks, default=16)
    fit = [r for r in VLLM_RANKS if r >= want]
    if not fit:
        raise ValueError(f"LoRA rank {want} is larger than vLLM's maximum {VLLM_RANKS[-1]}")
    return fit[0]


def _kv_cache_gib(config: ServeConfig) -> int:
    """GiB of CPU KV cache for `kv_cache_tokens` tokens (vLLM's CPU backend sizes its cache in whole GiB)."""
    hf = json.loads((Path(config.checkpoint) / "config.json").read_text())
    heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    per_token = 2 * hf["num_hidden_layers"] * heads * head_dim * _DTYPE_BYTES[config.dtype]
    return max(1, math.ceil(config.kv_cache_tokens * per_token / 2**30))


def vllm_command(config: ServeConfig, opts: VllmOptions, port: int, key: str, served_name: str,
                 max_lora_rank: int) -> tuple[list[str], dict[str, str]]:
    """The child's argv and environment."""
    python = opts.python or os.environ.get("QSERVE_VLLM_PYTHON") or sys.executable
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(config.checkpoint),
            "--served-model-name", served_name, "--quantization", NAME, "--load-format", NAME,
            "--host", "127.0.0.1", "--port", str(port), "--api-key", key, "--dtype", config.dtype,
            "--max-model-len", str(config.max_model_len), "--max-num-seqs", str(config.max_num_seqs),
            "--max-num-batched-tokens", str(max(config.max_num_batched_tokens, config.max_model_len)),
            "--tensor-parallel-size", str(opts.tensor_parallel_size),
            "--pipeline-parallel-size", str(opts.pipeline_parallel_size),
            "--data-parallel-size", str(opts.data_parallel_size),
            "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(config.max_loras),
            "--enable-prefix-caching" if config.enable_prefix_caching else "--no-enable-prefix-caching",
            "--disable-uvicorn-access-log"]
    if config.max_cpu_loras is not None:
        argv += ["--max-cpu-loras", str(config.max_cpu_loras)]
    if config.lora_dtype != "auto":
        argv += ["--lora-dtype", config.lora_dtype]
    if config.adapters:
        argv += ["--lora-modules", *(f"{n}={p}" for n, p in config.adapters)]
    if config.chat_template is not None:  # a file path or the template text: vLLM's --chat-template takes both
        argv += ["--chat-template", config.chat_template]
    if opts.enforce_eager if opts.enforce_eager is not None else config.device == "cpu":
        argv.append("--enforce-eager")
    argv += list(opts.extra_args)
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if config.dequantize_base:
        env["QLORA_KIT_VLLM_DEQUANTIZE"] = "1"  # read by the plugin's quantization config in every worker
    if config.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(_kv_cache_gib(config)))
    return argv, env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so no engine outlives its front."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VllmProcess:
    """One vLLM server child. `start()` returns once its /health answers; `stop()` ends its process group."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, key: str, log: str | os.PathLike | None = None):
        self.argv, self.env, self.key = argv, env, key
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> "VllmProcess":
        out = open(self.log, "ab") if self.log else None
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendStartError(f"vLLM exited with code {self.proc.returncode} while starting"
                                        f"{self._tail()}; command: {' '.join(self.argv[:3])} ...")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise BackendStartError(f"vLLM did not become ready within {timeout_s:.0f} s{self._tail()}")

    def _tail(self) -> str:
        if not self.log or not os.path.exists(self.log):
            return ""
        lines = [ln for ln in Path(self.log).read_text(errors="replace").splitlines() if "Error" in ln or "error" in ln]
        return f" (log {self.log}: {lines[-1].strip()[:400]})" if lines else f" (log {self.log})"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        if not self.alive():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # vLLM's engine and workers share the child's session
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def launch(config: ServeConfig, opts: VllmOptions, served_name: str, max_lora_rank: int, log=None) -> VllmProcess:
    """Start vLLM for `config` and wait until it is ready."""
    port, key = free_port(), "sk-qserve-" + secrets.token_hex(16)
    argv, env = vllm_command(config, opts, port, key, served_name, max_lora_rank)
    return VllmProcess(argv, env, port, key, log).start(opts.startup_timeout_s)
