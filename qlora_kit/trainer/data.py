"""Training data: JSONL records -> token ids with a loss mask -> packed, length-grouped micro-batches.

Accepted records, one JSON object per line:
    {"text": "..."}                                   loss on every token (EOS appended)
    {"prompt": "...", "completion": "..."}            loss on the completion (EOS appended)
    {"messages": [{"role": ..., "content": ...}]}     chat template; loss only on assistant turns

Chat masking renders the template for messages[:i] with the generation prompt and for messages[:i+1]
without it; the text between the two is assistant turn i (its end-of-turn token included) and is the
only text that carries loss. Every line is parsed and checked before training starts; the first bad
line is an error naming the file and line.

Labels are shifted here: label[t] is token t + 1 when that token carries loss, else IGNORE. A row's
last label is always IGNORE, so packing examples back to back never trains one example on the next.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.models import Tokenizer, TokenizerError

from .errors import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized record: ids, labels (already shifted, IGNORE where no loss) and its source line."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int

    def __len__(self) -> int:
        return len(self.input_ids)


def _pieces(tok: Tokenizer, rec: dict, where: str) -> list[tuple[str, bool]]:
    """(text, carries_loss) pieces of one record, in order."""
    eos = tok.eos_token or ""
    if set(rec) == {"text"} and isinstance(rec["text"], str):
        return [(rec["text"] + eos, True)]
    if set(rec) == {"prompt", "completion"} and all(isinstance(rec[k], str) for k in rec):
        return [(rec["prompt"], False), (rec["completion"] + eos, True)]
    if set(rec) == {"messages"}:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: \"messages\" must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                f"\"content\": string}}, got {json.dumps(m)[:80]}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
        try:
            return _chat_pieces(tok, msgs, where)
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None
    shown = ", ".join(sorted(rec)) or "none"
    raise DataError(f"{where}: expected {{\"text\"}}, {{\"prompt\", \"completion\"}} or {{\"messages\"}} with string "
                    f"values; got keys {shown}")


def _chat_pieces(tok: Tokenizer, msgs: list[dict], where: str) -> list[tuple[str, bool]]:
    pieces, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.render_chat(msgs[:i], add_generation_prompt=True) if i else ""
        full = tok.render_chat(msgs[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render this conversation prefix by prefix, "
                            "so assistant turns cannot be located")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    tail = tok.render_chat(msgs, add_generation_prompt=False)[len(done):]
    return pieces + ([(tail, False)] if tail else [])


def tokenize_record(tok: Tokenizer, rec: dict, where: str, line: int = 0) -> Example:
    """Tokenize one parsed record into an Example (see the module docstring for masking)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    ids, loss = [], []
    for k, (text, carries) in enumerate(_pieces(tok, rec, where)):
        # plain records get the tokenizer's own specials (e.g. BOS) once; chat templates write theirs as text
        special = k == 0 and "messages" not in rec
        piece = tok.encode(text, add_special_tokens=special) if text else []
        ids += piece
        loss += [carries] * len(piece)
    if not any(loss):
        raise DataError(f"{where}: no tokens carry loss (empty completion or assistant content)")
    labels = [ids[t + 1] if loss[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(tuple(ids), tuple(labels), line)


def load_examples(path: str | os.PathLike, tok: Tokenizer, max_seq_len: int, truncate: bool = False) -> list[Example]:
    """Parse and tokenize every line of a JSONL file; blank lines are skipped.

    Raises:
        DataError: unreadable file, bad JSON or record shape (with the line number), an example longer
            than max_seq_len (unless truncate), or no examples at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
            except ValueError as e:  # e.g. an integer over Python's digit limit
                raise DataError(f"{where}: not valid JSON ({e})") from None
            ex = tokenize_record(tok, rec, where, n)
            if len(ex) > max_seq_len:
                if not truncate:
                    raise DataError(f"{where}: {len(ex)} tokens exceed max_seq_len={max_seq_len}; raise --max-seq-len "
                                    "or pass --truncate")
                ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len - 1] + (IGNORE,), n)
                if all(y == IGNORE for y in ex.labels):
                    raise DataError(f"{where}: after --truncate to {max_seq_len} tokens no token carries loss")
            out.append(ex)
    if not out:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return out


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples (at least one when fraction > 0), chosen by `seed`."""
    if fraction <= 0:
        return examples, []
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"eval_fraction={fraction} leaves no training examples out of {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
