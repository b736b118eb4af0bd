"""Training data: dataset rows -> token ids with a loss mask -> packed, length-grouped micro-batches.

Rows come from trainer/sources.py (JSONL, or parquet / JSON / CSV / Hub datasets through `datasets`) and are
normalised by trainer/records.py (TRL's shapes: text, prompt/completion plain or conversational, messages,
ShareGPT conversations, content as text parts, an optional tools column; other columns ignored). Loss:
    text                               every token (EOS appended)
    prompt/completion (strings)        the completion (EOS appended)
    messages / conversations           assistant turns only (their end-of-turn text included)
    prompt/completion (messages)       the completion messages, i.e. what the conversation adds after the
                                       prompt rendered with the generation prompt
With assistant_only_loss / completion_only_loss off (LossMask), conversations / prompt-completion rows carry loss
on every token.

Chat masking renders the template for messages[:i] with the generation prompt and for messages[:i+1]
without it; the text between the two is assistant turn i (its end-of-turn token included) and is the
only text that carries loss. Every row is parsed and checked before training starts; the first bad
row is an error naming the file and line (or row) and the field.

Labels are shifted here: label[t] is token t + 1 when that token carries loss, else IGNORE. A row's
last label is always IGNORE, so packing examples back to back never trains one example on the next.
"""
import os
from dataclasses import dataclass

import torch

from qlora_kit.models import Tokenizer, TokenizerError

from .errors import DataError
from .records import Record, normalise
from .sources import rows

IGNORE = -100


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized record: ids, labels (already shifted, IGNORE where no loss) and its source line."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class LossMask:
    """Which tokens carry loss: TrainConfig.assistant_only_loss / completion_only_loss (off: every token)."""

    assistant_only: bool = True
    completion_only: bool = True


def _pieces(tok: Tokenizer, rec: Record, where: str, mask: LossMask) -> list[tuple[str, bool]]:
    """(text, carries_loss) pieces of one record, in order."""
    eos = tok.eos_token or ""
    if rec.kind == "text":
        return [(rec.text + eos, True)]
    if rec.kind == "prompt_completion":
        return [(rec.prompt, not mask.completion_only), (rec.completion + eos, True)]
    try:
        if rec.kind == "chat":
            pieces = _chat_pieces(tok, list(rec.messages), rec.tools, where)
            everything = not mask.assistant_only
        else:
            pieces = _completion_pieces(tok, list(rec.prompt), list(rec.completion), rec.tools, where)
            everything = not mask.completion_only
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None
    return [(text, carries or everything) for text, carries in pieces]


def _render(tok: Tokenizer, msgs: list[dict], gen: bool, tools) -> str:
    return tok.render_chat(msgs, add_generation_prompt=gen, **({"tools": tools} if tools is not None else {}))


def _chat_pieces(tok: Tokenizer, msgs: list[dict], tools, where: str) -> list[tuple[str, bool]]:
    pieces, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        # the empty prefix too: a template may open with text of its own (a default system prompt, the tools)
        prompt = _render(tok, msgs[:i], True, tools)
        full = _render(tok, msgs[:i + 1], False, tools)
        if not prompt.startswith(done) or not full.startswith(prompt):
            first = " (the conversation opens with an assistant message; start it with a user or system one)" \
                if i == 0 else ""
            raise DataError(f"{where}: the chat template does not render this conversation prefix by prefix, "
                            f"so assistant turns cannot be located{first}")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    tail = _render(tok, msgs, False, tools)[len(done):]
    return pieces + ([(tail, False)] if tail else [])


def _completion_pieces(tok: Tokenizer, prompt: list[dict], completion: list[dict], tools,
                       where: str) -> list[tuple[str, bool]]:
    """Conversational prompt/completion: the prompt rendered with the generation prompt carries no loss; what
    the whole conversation adds after it (the completion messages, end-of-turn tokens included) does."""
    head = _render(tok, prompt, True, tools)
    full = _render(tok, prompt + completion, False, tools)
    if not full.startswith(head):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of prompt + completion, "
                        "so the completion cannot be located")
    return [(head, False), (full[len(head):], True)]


def tokenize_record(tok: Tokenizer, row: dict, where: str, line: int = 0, mask: LossMask = LossMask()) -> Example:
    """Tokenize one row (any shape records.normalise accepts) into an Example (module docstring: masking)."""
    rec = normalise(row, where)
    ids, loss = [], []
    for k, (text, carries) in enumerate(_pieces(tok, rec, where, mask)):
        # plain records get the tokenizer's own specials (e.g. BOS) once; chat templates write theirs as text
        special = k == 0 and rec.kind in ("text", "prompt_completion")
        piece = tok.encode(text, add_special_tokens=special) if text else []
        ids += piece
        loss += [carries] * len(piece)
    if not any(loss):
        raise DataError(f"{where}: no tokens carry loss (empty completion or assistant content)")
    labels = [ids[t + 1] if loss[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(tuple(ids), tuple(labels), line)


def load_examples(path: str | os.PathLike, tok: Tokenizer, max_seq_len: int, truncate: bool = False,
                  split: str = "train", config: str = "", mask: LossMask = LossMask()) -> list[Example]:
    """Read (trainer/sources.py), check and tokenize every row of a dataset; blank JSONL lines are skipped.

    Args:
        path: a JSONL / JSON / parquet / CSV file, a dataset folder or a Hub dataset id.
        split, config: the split and configuration of a folder or Hub id.
        mask: which tokens carry loss (default: assistant turns / the completion only).

    Raises:
        DataError: unreadable source, bad JSON or row shape (naming the file and line or row, and the field), an
            example longer than max_seq_len (unless truncate), or no examples at all.
    """
    out = []
    for n, (where, row) in enumerate(rows(str(path), split, config), 1):
        ex = tokenize_record(tok, row, where, n, mask)
        if len(ex) > max_seq_len:
            if not truncate:
                raise DataError(f"{where}: {len(ex)} tokens exceed max_seq_len={max_seq_len}; raise --max-seq-len "
                                "or pass --truncate")
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len - 1] + (IGNORE,), n)
            if all(y == IGNORE for y in ex.labels):
                raise DataError(f"{where}: after --truncate to {max_seq_len} tokens no token carries loss")
        out.append(ex)
    if not out:
        raise DataError(f"{path}: no examples (the dataset is empty or holds only blank lines)")
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
