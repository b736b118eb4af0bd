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
from .errors import ServeConfigError
from .vllm_backend.launch import pop_vllm_options, vllm_cli_options

_SPECIAL = {"checkpoint", "adapters", "base_names"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-kit")
def main():
    """Serve a 4-bit base with many LoRA adapters behind an OpenAI-compatible API."""


def _lora_module(item: str, flag: str) -> tuple[str, str, str | None]:
    """(name, path, base_model_name or None) of `NAME=PATH` or, for --lora-modules, vLLM's JSON form
    `{"name": ..., "path": ..., "base_model_name": ...}`."""
    if flag == "--lora-modules" and item.lstrip().startswith("{"):
        try:
            spec = json.loads(item)
        except ValueError as e:
            raise click.BadParameter(f"{item!r}: not valid JSON ({e})", param_hint=flag) from None
        extra = sorted(set(spec) - {"name", "path", "base_model_name"}) if isinstance(spec, dict) else []
        if not isinstance(spec, dict) or extra or not all(isinstance(spec.get(k), str) and spec[k]
                                                         for k in ("name", "path")):
            raise click.BadParameter(f"{item!r}: expected {{\"name\": str, \"path\": str, \"base_model_name\": str}}"
                                     + (f" (unknown keys {extra})" if extra else ""), param_hint=flag)
        base = spec.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise click.BadParameter(f"{item!r}: base_model_name must be a string", param_hint=flag)
        return spec["name"], spec["path"], base
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"{item!r}: expected NAME=PATH", param_hint=flag)
    return name, path, None


def _check_bases(config: ServeConfig, bases: dict[str, str]) -> None:
    """A --lora-modules base_model_name must name this server's base (its served name, a --base-name, the folder's
    name or config.json's _name_or_path); vLLM would list the adapter under it."""
    from qlora_kit.models import base_names  # reads config.json only

    known = {config.served_name, *config.base_names}
    for name, base in bases.items():
        if base not in known:
            known.update(base_names(config.checkpoint))
        if base not in known:
            raise ServeConfigError(f"--lora-modules {name!r}: base_model_name {base!r} is not the served base "
                                   f"({config.served_name!r}); add --base-name {base} if it is")


@main.command()
@click.argument("checkpoint")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="Adapter (a PEFT folder) served as model NAME from start-up (repeatable).")
@click.option("--lora-modules", "lora_modules", multiple=True, metavar="NAME=PATH|JSON",
              help='vLLM\'s spelling of --adapter: NAME=PATH or {"name": .., "path": .., "base_model_name": ..} '
                   "(repeat the flag for each; vLLM's space-separated list is not read).")
@click.option("--base-name", "base_names", multiple=True,
              help="Another name of the base accepted in adapters' base_model_name_or_path (repeatable).")
@click.option("--backend", type=click.Choice(["native", "vllm"]), default="native", show_default=True,
              help="vllm: vLLM with the qlora_nf4 plugin (TP/PP/DP) behind this server's keys, tenants and metrics.")
@vllm_cli_options
@cli_errors
def serve(checkpoint, adapters, lora_modules, base_names, backend, **flags):
    """Start the HTTP server for CHECKPOINT (a qconvert output folder, or its Hub id: fetched into the Hugging Face
    cache, HF_HUB_OFFLINE honoured; the Hub id is then the base's served name unless --served-model-name is given)."""
    specs = [_lora_module(a, "--adapter") for a in adapters] + [_lora_module(m, "--lora-modules") for m in lora_modules]
    if backend == "vllm" and flags.get("threads") is not None:
        raise click.UsageError("--threads sets the native engine's step thread; with --backend vllm use vLLM's own "
                               "CPU thread settings")
    folder = str(resolve_checkpoint(checkpoint))  # a Hub id is also a name of the base for adapter checks
    base_names = (*base_names, checkpoint) if is_hub_id(checkpoint) else base_names
    try:
        vllm_opts = pop_vllm_options(flags)
        if is_hub_id(checkpoint) and flags.get("served_model_name") is None:
            flags["served_model_name"] = checkpoint
        config = ServeConfig(folder, tuple((n, p) for n, p, _ in specs), base_names=tuple(base_names),
                             **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    _check_bases(config, {n: b for n, _, b in specs if b is not None})
    if backend == "vllm":
        from .vllm_backend import serve as run_vllm

        return run_vllm(config, vllm_opts, announce=lambda msg: click.echo(msg, err=True))
    from .server import serve as run_server  # torch and the model load only for this command

    run_server(config, announce=lambda msg: click.echo(msg, err=True))


# one --flag per scalar ServeConfig field, after the options above (default None = the dataclass default); every
# field carries its description in metadata["help"] (require_help makes a field without one an error)
serve.params.extend(dataclass_options(ServeConfig, skip=_SPECIAL, default_text=" [default: {}]", require_help=True))


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
