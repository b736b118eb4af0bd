"""Request bodies of the OpenAI-compatible and admin endpoints, and their conversion to engine SamplingParams.

Types are strict (pydantic strict mode: "5" is not an integer, true is not a token id). OpenAI fields this
server does not implement are refused by name unless they hold their no-op value (UNSUPPORTED); other unknown
fields (e.g. `user`) are ignored.
"""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine import SamplingParams
from ..errors import InvalidRequest


# field -> the values that mean "not used" (accepted and ignored); anything else is a 400 naming the field
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "min_tokens": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "response_format": (None, {"type": "text"}), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "prompt_logprobs": (None,),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for key, neutral in UNSUPPORTED.items():
                if key in data and not any(_same(data[key], v) for v in neutral):
                    raise InvalidRequest(f"{key}={data[key]!r}: not supported by this server (leave it out)")
        return data

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise InvalidRequest(f"stop={list(stop)!r}: up to 4 non-empty strings")
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens or default_max_tokens, stop=stop, seed=self.seed,
                              ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)


class LoadAdapter(_Body):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapter(_Body):
    lora_name: str = Field(min_length=1, max_length=128)


def _same(value, neutral) -> bool:
    """JSON equality without Python's 1 == True (0 and 0.0 are the same number)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(value) and number(neutral):
        return value == neutral
    return type(value) is type(neutral) and value == neutral
