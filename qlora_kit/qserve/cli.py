"""qserve: one 4-bit base, many hot-swappable LoRA adapters, OpenAI-compatible API.

`qserve serve CKPT` runs the server; `qserve adapters list|load|unload` talk to a running one. Flags of
`serve` are generated from ServeConfig's fields, so defaults live only there. Errors go through
qlora_kit._cli.cli_errors (one red line; exit 2 bad input, 1 failure).
"""
import json
import os
import urllib.error
import urllib.request

import click

from qlora_kit._cli import cli_errors, dataclass_options
from qlora_kit._cli.hub import is_hub_id, resolve_checkpoint

from .config import ServeConfig
from .vllm_backend.launch import pop_vllm_options, vllm_cli_options

_SPECIAL = {"checkpoint", "adapters", "base_names"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-kit")
def main():
    """Serve a 4-bit base with many LoRA adapters behind an OpenAI-compatible API."""


@main.command()
@click.argument("checkpoint")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="Adapter loaded at start-up.")
@click.option("--base-name", "base_names", multiple=True, help="Another name of the base for adapter checks.")
@click.option("--backend", type=click.Choice(["native", "vllm"]), default="native", show_default=True,
              help="vllm: vLLM with the qlora_nf4 plugin (TP/PP/DP) behind this server's keys, tenants and metrics.")
@vllm_cli_options
@cli_errors
def serve(checkpoint, adapters, base_names, backend, **flags):
    """Start the HTTP server for CHECKPOINT (a qconvert output folder, or its Hub id: fetched into the Hugging Face
    cache, HF_HUB_OFFLINE honoured)."""
    pairs = []
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r}: expected NAME=PATH", param_hint="--adapter")
        pairs.append((name, path))
    if backend == "vllm" and flags.get("threads") is not None:
        raise click.UsageError("--threads sets the native engine's step thread; with --backend vllm use vLLM's own "
                               "CPU thread settings")
    folder = str(resolve_checkpoint(checkpoint))  # a Hub id is also a name of the base for adapter checks
    base_names = (*base_names, checkpoint) if is_hub_id(checkpoint) else base_names
    try:
        vllm_opts = pop_vllm_options(flags)
        config = ServeConfig(folder, tuple(pairs), base_names=tuple(base_names),
                             **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if backend == "vllm":
        from .vllm_backend import serve as run_vllm

        return run_vllm(config, vllm_opts, announce=lambda msg: click.echo(msg, err=True))
    from .server import serve as run_server  # torch and the model load only for this command

    run_server(config, announce=lambda msg: click.echo(msg, err=True))


# one --flag per scalar ServeConfig field, after the options above (default None = the dataclass default)
serve.params.extend(dataclass_options(ServeConfig, skip=_SPECIAL, default_text=" [default: {}]"))


def _call(url: str, path: str, key: str | None, body: dict | None = None) -> dict:
    req = urllib.request.Request(url.rstrip("/") + path, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        raise click.ClickException(f"HTTP {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise click.ClickException(f"{url}: {e.reason}") from None


_url = click.option("--url", envvar="QSERVE_URL", required=True, help="Server URL (env QSERVE_URL).")
_key = click.option("--api-key", envvar="QSERVE_API_KEY", default=None, help="Admin key (env QSERVE_API_KEY).")


@main.group()
def adapters():
    """List, load and unload adapters on a running server (admin key)."""


@adapters.command("list")
@_url
@_key
def list_adapters(url, api_key):
    """Adapters with state, bytes and requests in flight, then the memory report."""
    data = _call(url, "/v1/adapters", api_key)
    for a in data["adapters"]:
        click.echo(f"{a['name']}\t{a['state']}\t{a['bytes']} B\tin_flight={a['in_flight']}"
                   f"{' draining' if a['draining'] else ''}\t{a['path']}")
    mem = data["memory"]
    click.echo(f"resident: {mem['resident']['free_slots']}/{mem['resident']['slots']} slots free, "
               f"{mem['resident']['more_fit']} more fit; kv cache {mem['kv_cache_bytes']} B; base {mem['base_bytes']} B")


@adapters.command("load")
@click.argument("name")
@click.argument("path")
@_url
@_key
def load(name, path, url, api_key):
    """Load adapter NAME from PATH (under the server's allowed root)."""
    click.echo(_call(url, "/v1/load_lora_adapter", api_key, {"lora_name": name, "lora_path": os.fspath(path)})["message"])


@adapters.command("unload")
@click.argument("name")
@_url
@_key
def unload(name, url, api_key):
    """Unload adapter NAME (running requests finish first)."""
    click.echo(_call(url, "/v1/unload_lora_adapter", api_key, {"lora_name": name})["message"])
