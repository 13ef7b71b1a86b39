"""A growing sequence's text, decoded a few tokens at a time.

Decoding every output token again at every step costs O(n) per step, O(n^2) per request: at 64
running requests of 512 tokens that is ~10 ms of Python per step on this CPU, half a decode
step. vLLM's incremental detokenizer decodes a short window instead: the text of
tokens[prefix:] minus the text of tokens[prefix:read] is what the newest tokens add, held
back while it ends in an unfinished character (U+FFFD: a multi-byte character, or a BPE
merge, split over tokens). Once a sequence finishes, its text is decoded whole once
(`final`), so a character that never completed reads exactly as a full decode gives it.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""  # the complete characters so far
        self.prefix = 0  # tokens[prefix:read] decode to the text's tail: the window's context
        self.read = 0  # tokens before this are in `text`

    def update(self, tokens: Sequence[int]) -> str:
        """tokens: the whole output so far (it only grows) -> the text they add, possibly ''."""
        if len(tokens) <= self.read:
            return ""
        seen = self.tokenizer.decode(tokens[self.prefix:self.read]) if self.read > self.prefix else ""
        window = self.tokenizer.decode(tokens[self.prefix:])
        if len(window) <= len(seen) or window.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character still being completed
        delta = window[len(seen):]
        self.prefix, self.read = self.read, len(tokens)
        self.text += delta
        return delta

    def final(self, tokens: Sequence[int]) -> str:
        """The finished text: one full decode."""
        self.text = self.tokenizer.decode(tokens)
        self.prefix = self.read = len(tokens)
        return self.text
