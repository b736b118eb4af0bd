"""Tokenizer and chat template from a Hugging Face folder, without transformers.

tokenizer.json runs in the `tokenizers` library. The chat template (chat_template.jinja, or the
`chat_template` key of tokenizer_config.json) is rendered with jinja2 in a sandbox, with the
settings Hugging Face templates are written for: trim_blocks, lstrip_blocks, the loopcontrols
extension, a `raise_exception` global and a `tojson` filter. Special tokens come from
tokenizer_config.json; stop tokens are the eos token plus generation_config.json's eos_token_id.
"""
import json
import os
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .errors import TokenizerError


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message):
    raise TokenizerError(f"chat template: {message}")


class Tokenizer:
    """Encode, decode and render chats for one model folder.

    Attributes:
        bos_token, eos_token, pad_token: special token strings (None when absent).
        stop_token_ids: ids that end generation.
        chat_template: the jinja2 source, or None.
    """

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: missing; a tokenizer.json is required")
        self._tok = _HFTokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: use "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        stops = set()
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            stops.add(self.token_to_id(self.eos_token))
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
            stops |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.stop_token_ids = tuple(sorted(stops))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token_id(self) -> int:
        """Id used for padding: pad token, else eos, else 0."""
        for t in (self.pad_token, self.eos_token):
            if t is not None and self.token_to_id(t) is not None:
                return self.token_to_id(t)
        return 0

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (the tokenizer.json post-processor adds BOS etc. when asked)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template rendered for `messages` ([{"role": ..., "content": ...}, ...]).

        Raises:
            TokenizerError: no template, or the template raised / failed to render.
        """
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except TemplateError as e:
            raise TokenizerError(f"chat template failed to render: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered chat (special tokens come from the template text, none are added)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)
