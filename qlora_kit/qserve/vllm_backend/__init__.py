"""`qserve serve CKPT --backend vllm`: vLLM (with the qlora_nf4 plugin) behind qserve's own front.

    qserve front (this process)      API keys, tenants' adapter access, adapter root, admin API, metrics
        │ loopback + private key
    vLLM OpenAI server (child)       --quantization/--load-format qlora_nf4, LoRA on, TP/PP/DP

`start()` runs both and returns a handle (tests, benchmarks); `serve()` blocks (the CLI). Nothing here imports
vLLM: the child process does, through the plugin's entry point.
"""
import os
import threading
from dataclasses import dataclass

from ..adapters import AdapterRegistry
from .._socket import bind_listener, run_in_thread
from ..config import ServeConfig, load_chat_template
from .launch import (VllmOptions, VllmProcess, adapter_rank, launch, lora_rank, pop_vllm_options, vllm_cli_options,
                     vllm_command)

__all__ = ["VllmHandle", "VllmOptions", "adapter_rank", "lora_rank", "pop_vllm_options", "serve", "start",
           "vllm_cli_options", "vllm_command"]


@dataclass
class VllmHandle:
    """A running front (`url`) and its vLLM child (`vllm`); `stop()` ends both."""

    url: str
    vllm: VllmProcess
    registry: AdapterRegistry
    server: object  # uvicorn.Server
    thread: threading.Thread | None
    max_lora_rank: int

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.vllm.stop()


def _build(config: ServeConfig, opts: VllmOptions, log):
    import uvicorn  # the HTTP stack and torch load only when serving (`qserve --help` stays fast)

    from ..api.app import check_adapter_name
    from ..api.auth import KeyStore
    from .front import create_front, front_registry

    keys = KeyStore.from_file(config.api_keys)  # bad key files fail before vLLM spends a minute loading
    if config.chat_template is not None:
        load_chat_template(config.chat_template)  # vLLM reads it itself; refused here first, in one line
    rank = lora_rank(config, opts)
    registry = front_registry(config, rank)
    for name, path in config.adapters:
        check_adapter_name(name, config.served_name)
        registry.add(name, path, trusted=True)
    proc = launch(config, opts, config.served_name, rank, log)
    app = create_front(config, registry, proc.url, proc.key, keys)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    return proc, registry, server, rank


def start(config: ServeConfig, opts: VllmOptions = VllmOptions(), log: str | os.PathLike | None = None) -> VllmHandle:
    """Start vLLM and the front (in a daemon thread); returns once both accept connections.

    Raises:
        BackendStartError when vLLM exits or is not ready within opts.startup_timeout_s (log: its output file).
    """
    proc, registry, server, rank = _build(config, opts, log)
    try:
        sock = bind_listener(config.host, config.port)
    except OSError:
        proc.stop()
        raise
    thread, url = run_in_thread(server, sock, "qserve-vllm-front")
    return VllmHandle(url, proc, registry, server, thread, rank)


def serve(config: ServeConfig, opts: VllmOptions = VllmOptions(), announce=print) -> None:
    """Run until interrupted."""
    for line in config.startup_warnings():
        announce(line)
    proc, _, server, rank = _build(config, opts, None)
    try:
        sock = bind_listener(config.host, config.port)
        host, port = sock.getsockname()[:2]
        announce(f"qserve: serving {config.checkpoint} on http://{host}:{port} through vLLM at {proc.url} "
                 f"(tp={opts.tensor_parallel_size} pp={opts.pipeline_parallel_size} dp={opts.data_parallel_size}, "
                 f"max LoRA rank {rank}, {len(config.adapters)} adapters)")
        server.run(sockets=[sock])
    finally:
        proc.stop()
