"""Incremental detokenisation, so stop strings are checked on text without re-decoding a
whole sequence every step."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a window from the last emitted boundary; text is emitted only once the window
    decodes to more text than its already-emitted head and does not end in an incomplete
    UTF-8 sequence (a multi-byte character split over tokens decodes to U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are already in self.text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        dec = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        head = dec(self.ids[self._prefix:self._read])
        full = dec(self.ids[self._prefix:])
        if len(full) > len(head) and not full.endswith("\ufffd"):
            new = full[len(head):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += new
            return new
        return ""
