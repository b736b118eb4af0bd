"""One dataset row -> one normalised record, for the row shapes TRL's SFTTrainer accepts.

Row shapes (the first key present decides; a row holding two of these keys is refused as ambiguous):
    {"messages": [{"role", "content"}, ...]}            conversational; loss on assistant turns
    {"conversations": [{"from", "value"}, ...]}         ShareGPT; from human/gpt/system -> user/assistant/system
    {"prompt": str, "completion": str}                  plain; loss on the completion
    {"prompt": [msgs], "completion": [msgs]}            conversational prompt/completion; loss on the completion
    {"text": str}                                       plain; loss on every token
Any other column (an "id", a "source") is ignored; a column whose value is None counts as absent (Arrow fills
columns a row lacks with None). An optional "tools" column (a list of JSON-schema objects) is passed to the chat
template as `tools`. A message's "content" is a string or a list of parts [{"type": "text", "text": ...}]; text
parts are joined with "\\n" (as vLLM does for text-only models); any other part type is refused by name. Keys of a
message other than role/content (e.g. tool_calls, name) are passed to the template unchanged.

Work per row is bounded: at most MAX_MESSAGES messages, MAX_PARTS parts per content, MAX_TOOLS tools,
MAX_ROW_CHARS characters of message text, tools and other message keys, and MAX_RENDER_CHARS for assistant turns x
those characters, so one hostile row cannot make masking (one template render per assistant turn) unbounded.
"""
import json
from dataclasses import dataclass

from .errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
FORMAT_KEYS = ("messages", "conversations", "prompt", "text")
MAX_MESSAGES = 512
MAX_PARTS = 256
MAX_TOOLS = 128
MAX_ROW_CHARS = 1 << 20
MAX_RENDER_CHARS = 1 << 26  # assistant turns x row characters: masking renders the template once per turn


@dataclass(frozen=True, slots=True)
class Record:
    """A normalised row. kind: "text" | "prompt_completion" | "chat" | "chat_prompt_completion".

    text: the text (kind text); prompt/completion: strings (prompt_completion) or message lists
    (chat_prompt_completion); messages: the conversation (chat); tools: the tools column or None.
    """

    kind: str
    text: str = ""
    prompt: object = None
    completion: object = None
    messages: tuple = ()
    tools: list | None = None


def _shown(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:80]
    except (TypeError, ValueError, RecursionError):
        return type(value).__name__


def _content(value, where: str, field: str, budget: list[int]) -> str:
    """A message content: a string, or text parts joined with newlines."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        if len(value) > MAX_PARTS:
            raise DataError(f"{where}: field {field}: {len(value)} content parts; at most {MAX_PARTS}")
        texts = []
        for k, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise DataError(f"{where}: field {field}[{k}]: a content part must be {{\"type\": \"text\", "
                                f"\"text\": string}}, got {_shown(part)}")
            if part["type"] != "text":
                raise DataError(f"{where}: field {field}[{k}]: content part of type {part['type']!r} is not "
                                "supported (text-only model: only \"text\" parts)")
            if not isinstance(part.get("text"), str):
                raise DataError(f"{where}: field {field}[{k}].text: must be a string, got {_shown(part.get('text'))}")
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise DataError(f"{where}: field {field}: must be a string or a list of text parts, got {_shown(value)}")
    _charge(budget, len(text), where, field)
    return text


def _charge(budget: list[int], n: int, where: str, field: str) -> None:
    budget[0] -= n
    if budget[0] < 0:
        raise DataError(f"{where}: field {field}: the row's messages hold more than {MAX_ROW_CHARS} characters")


def _shown_full(value, where: str, field: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        raise DataError(f"{where}: field {field}: not JSON-like data ({type(value).__name__})") from None


def _messages(value, where: str, field: str, budget: list[int], sharegpt: bool = False) -> tuple[dict, ...]:
    """Validated messages as plain dicts {role, content, **other non-None keys}."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field}: must be a non-empty list of messages, got {_shown(value)}")
    if len(value) > MAX_MESSAGES:
        raise DataError(f"{where}: field {field}: {len(value)} messages; at most {MAX_MESSAGES}")
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    allowed = tuple(SHAREGPT_ROLES) if sharegpt else ROLES
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field {field}[{j}]: must be an object, got {_shown(m)}")
        role = m.get(role_key)
        if role not in allowed:
            raise DataError(f"{where}: field {field}[{j}].{role_key}: must be one of {', '.join(allowed)}, "
                            f"got {_shown(role)}")
        msg = {k: v for k, v in m.items() if v is not None and k not in (role_key, text_key)}
        if msg:  # keys passed to the template (tool_calls, name, ...) count against the row's budget too
            _charge(budget, len(_shown_full(msg, where, f"{field}[{j}]")), where, f"{field}[{j}]")
        msg["role"] = SHAREGPT_ROLES[role] if sharegpt else role
        msg["content"] = _content(m.get(text_key), where, f"{field}[{j}].{text_key}", budget)
        out.append(msg)
    return tuple(out)


def _tools(value, where: str, budget: list[int]) -> list | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_TOOLS or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: field tools: must be a list of at most {MAX_TOOLS} objects (JSON schemas), "
                        f"got {_shown(value)}")
    _charge(budget, len(_shown_full(value, where, "tools")), where, "tools")
    return value


def _check_render_cost(msgs, budget: list[int], where: str, field: str) -> None:
    turns = sum(m["role"] == "assistant" for m in msgs)
    if turns * (MAX_ROW_CHARS - budget[0]) > MAX_RENDER_CHARS:
        raise DataError(f"{where}: field {field}: {turns} assistant turns over {MAX_ROW_CHARS - budget[0]} characters "
                        f"is too much to mask (turns x characters at most {MAX_RENDER_CHARS}); split the conversation")


def normalise(row, where: str) -> Record:
    """One row -> Record (see the module docstring). Raises DataError naming `where` and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    present = [k for k in FORMAT_KEYS if row.get(k) is not None]
    if len(present) > 1:
        raise DataError(f"{where}: holds both {present[0]!r} and {present[1]!r}; a row has exactly one of "
                        f"{', '.join(FORMAT_KEYS)} (with completion for prompt)")
    if not present:
        shown = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: expected {{\"text\"}}, {{\"prompt\", \"completion\"}}, {{\"messages\"}} or "
                        f"{{\"conversations\"}} with values; got keys {shown}")
    key, budget = present[0], [MAX_ROW_CHARS]
    if key == "text":
        if not isinstance(row["text"], str):
            raise DataError(f"{where}: field text: must be a string, got {_shown(row['text'])}")
        return Record("text", text=row["text"])
    tools = _tools(row.get("tools"), where, budget)
    if key in ("messages", "conversations"):
        msgs = _messages(row[key], where, key, budget, sharegpt=key == "conversations")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: field {key}: no assistant message, so nothing to train on")
        _check_render_cost(msgs, budget, where, key)
        return Record("chat", messages=msgs, tools=tools)
    prompt, completion = row["prompt"], row.get("completion")
    if completion is None:
        raise DataError(f"{where}: field completion: missing (a prompt-only row has nothing to train on)")
    if isinstance(prompt, str) and isinstance(completion, str):
        if tools is not None:
            raise DataError(f"{where}: field tools: only conversational rows use tools (prompt is a plain string)")
        return Record("prompt_completion", prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        p = _messages(prompt, where, "prompt", budget)
        c = _messages(completion, where, "completion", budget)
        return Record("chat_prompt_completion", prompt=p, completion=c, tools=tools)
    raise DataError(f"{where}: fields prompt/completion: both strings or both lists of messages, got "
                    f"{type(prompt).__name__} and {type(completion).__name__}")
