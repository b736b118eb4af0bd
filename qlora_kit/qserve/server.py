"""Build the model, engine and HTTP app from a ServeConfig, and run them under uvicorn.

`serve()` blocks (the CLI); `start()` runs the server in a background thread and returns a handle with its
URL (tests, benchmarks). Port 0 binds any free port; the bound address is reported.
"""
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from qlora_kit.models import NF4Linear, Tokenizer, base_names, load_config, load_model
from qlora_kit.models.nf4_linear import dense_linear

from .api import KeyStore, create_app
from .api.app import check_adapter_name
from .api.native import NativeBackend
from ._socket import bind_listener, run_in_thread
from .config import ServeConfig, load_chat_template
from .engine.engine import Engine
from .errors import ServeConfigError

log = logging.getLogger("qserve")


def dequantize_bases(model) -> tuple[int, int]:
    """Swap every NF4 projection for a dense one holding its dequantized weight (ServeConfig.dequantize_base, an
    explicit option: the 4-bit base is the default). Returns (projections swapped, extra bytes vs the 4-bit base)."""
    n, extra = 0, 0
    for layer in model.lora_layers().values():
        base = layer.base
        if isinstance(base, NF4Linear):
            dense = dense_linear(base.in_features, base.out_features, base.bias is not None)
            dense.weight = torch.nn.Parameter(base.dequantized(model.dtype), requires_grad=False)
            if base.bias is not None:
                dense.bias = torch.nn.Parameter(base.bias.detach().to(model.dtype), requires_grad=False)
            extra += dense.weight.nbytes - sum(b.nbytes for name, b in base.named_buffers() if name.startswith("weight_"))
            layer.base = dense
            n += 1
    return n, extra


def preflight(config: ServeConfig) -> KeyStore:
    """Check what needs no model before loading it: the key file, the allowed root, the checkpoint's
    --chat-template, the checkpoint's config.json and tokenizer, and the start-up adapter names. Returns the KeyStore.

    Raises:
        KeyFileError, ServeConfigError, models.ConfigError / UnsupportedArchitecture, TokenizerError,
        AdapterRefused.
    """
    keys = KeyStore.from_file(config.api_keys)
    if config.allowed_root is not None and not os.path.isdir(config.allowed_root):
        raise ServeConfigError(f"allowed_root={config.allowed_root!r}: not an existing folder (flag --allowed-root)")
    for name, _ in config.adapters:
        check_adapter_name(name, config.served_name)
    if config.chat_template is not None:
        load_chat_template(config.chat_template)
    load_config(config.checkpoint)
    Tokenizer(config.checkpoint)
    return keys


def build_engine(config: ServeConfig, announce=print) -> Engine:
    """Load the model and tokenizer, start the engine, load the start-up adapters (refused ones raise)."""
    folder = Path(config.checkpoint)
    model = load_model(folder, compute_dtype=getattr(torch, config.dtype), device=config.device)
    if config.dequantize_base:
        n, extra = dequantize_bases(model)
        announce(f"qserve: --dequantize-base: {n} projections held dense in {config.dtype}, "
                 f"{extra / 2**20:,.1f} MiB more than the 4-bit base")
    tokenizer = Tokenizer(folder)
    if config.chat_template is not None:
        tokenizer.chat_template = load_chat_template(config.chat_template)
    engine = Engine(model, tokenizer, config, base_names(folder)).start()
    try:
        for name, path in config.adapters:
            check_adapter_name(name, config.served_name)
            engine.registry.add(name, path, trusted=True)
    except BaseException:
        engine.stop()
        raise
    return engine


@dataclass
class ServerHandle:
    """A server running in a thread: `url` like http://127.0.0.1:PORT, `stop()` to shut it down."""

    url: str
    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


def _server(config: ServeConfig, engine: Engine, keys: KeyStore) -> uvicorn.Server:
    limits = engine.config.max_body_bytes, engine.config.max_tokens_limit
    app = create_app(NativeBackend(engine), keys, config.served_name, *limits)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))


def start(config: ServeConfig, engine: Engine | None = None) -> ServerHandle:
    """Run the server in a daemon thread; returns once it accepts connections."""
    keys = preflight(config) if engine is None else KeyStore.from_file(config.api_keys)
    engine = engine or build_engine(config)
    server = _server(config, engine, keys)
    thread, url = run_in_thread(server, bind_listener(config.host, config.port), "qserve-http")
    return ServerHandle(url, engine, server, thread)


def serve(config: ServeConfig, announce=print) -> None:
    """Run until interrupted."""
    for line in config.startup_warnings():
        announce(line)
    keys = preflight(config)
    engine = build_engine(config, announce)
    sock = bind_listener(config.host, config.port)
    host, port = sock.getsockname()[:2]
    announce(f"qserve: serving {config.checkpoint} as {config.served_name!r} "
             f"on http://{host}:{port} ({len(config.adapters)} adapters)")
    try:
        _server(config, engine, keys).run(sockets=[sock])
    finally:
        engine.stop()
