"""Incremental detokenization of one request's output: O(1) tokens decoded per step, the same text as decoding
all output ids at once.

Prefix-offset method (the one tokenizers' DecodeStream and TGI use; written here over `tokenizer.decode` so any
tokenizer with `decode(ids)` works). With `prefix <= read <= len(ids)`:

    prefix_text = decode(ids[prefix:read])      # the last segment already emitted, as context
    new_text    = decode(ids[prefix:])
    if new_text is longer and does not end in U+FFFD:
        emit new_text[len(prefix_text):];  prefix, read = read, len(ids)

Decoding from `prefix` rather than `read` gives each new token its left context, so decoders that depend on it
(SentencePiece's leading-space strip on the first token, byte-level merges) give the same characters as a full
decode. A trailing U+FFFD means the last tokens end inside a multi-byte UTF-8 character (byte-level BPE or byte
fallback): nothing is emitted until a later token completes it, and `final` flushes whatever remains, exactly as
the full decode would render it. Each step decodes the tokens since the last emission plus one emitted segment,
so a 2,000-token stream costs O(n), not the O(n^2) of re-decoding everything (`tokens_decoded` counts the work).

Stop strings: the text not yet sent keeps back len(longest stop) - 1 characters that could still grow into a stop
string; the first stop string found ends the text before it.
"""


class Detokenizer:
    """The streamed text of one request.

    Args:
        tokenizer: anything with `decode(ids, skip_special_tokens=True) -> str` (models.Tokenizer).
        stops: stop strings (non-empty); the output ends before the first one.

    Attributes:
        tokens_decoded: token ids passed to `tokenizer.decode` so far (the work done; bench/tests read it).
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.pending = ""  # decoded, not yet sent
        self.tokens_decoded = 0

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        self.tokens_decoded += end - start
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def _advance(self, final: bool) -> str:
        """The text the tokens since the last emission add (held back while it ends inside a character)."""
        prefix_text = self._decode(self.prefix, self.read)
        new_text = self._decode(self.prefix, len(self.ids))
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def step(self, new_ids, final: bool) -> tuple[str, bool]:
        """Take the tokens sampled since the last call; return (text to send now, a stop string was seen).
        After a stop string nothing more is returned: the text is cut before it."""
        self.ids.extend(new_ids)
        if new_ids or final:
            self.pending += self._advance(final)
        hit = None
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (hit is None or i < hit):
                hit = i
        if hit is not None:
            self.pending, final = self.pending[:hit], True
        end = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        delta, self.pending = self.pending[:end], self.pending[end:]
        return delta, hit is not None
