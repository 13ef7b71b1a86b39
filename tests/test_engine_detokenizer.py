"""Incremental detokenization: the text of a growing output, a few tokens decoded per step,
always a prefix of the full decode and equal to it once finished."""

from __future__ import annotations

import random

from moray.data.tokenizer import ByteTokenizer
from moray.serve.engine.detokenizer import IncrementalDetokenizer


def test_incremental_text_is_a_prefix_of_the_full_decode_and_ends_equal():
    tok = ByteTokenizer()
    rng = random.Random(0)
    text = "héllo wörld — 数据 🙂 plain ascii\n" * 3
    ids = tok.encode(text)
    for trial in range(20):
        cut = ids[:rng.randint(1, len(ids))] + ([rng.choice([0xC3, 0xE6, 0x80, 0xFF])] if trial % 3 == 0 else [])
        d, out = IncrementalDetokenizer(tok), []
        n = 0
        while n < len(cut):
            n = min(len(cut), n + rng.randint(1, 3))  # 1 to 3 tokens per step, as speculative steps emit
            out.append(d.update(cut[:n]))
            full = tok.decode(cut[:n])
            assert full.startswith(d.text)  # never a character that a later token changes
            assert not d.text.endswith("\ufffd") or full.endswith("\ufffd")
        assert "".join(out) == d.text
        assert d.final(cut) == tok.decode(cut)  # a dangling byte reads as the full decode has it


def test_a_multibyte_character_waits_for_its_last_byte():
    tok = ByteTokenizer()
    ids = tok.encode("a🙂b")  # 1 + 4 + 1 bytes
    d = IncrementalDetokenizer(tok)
    assert d.update(ids[:1]) == "a"
    assert [d.update(ids[:n]) for n in (2, 3, 4)] == ["", "", ""]
    assert d.update(ids[:5]) == "🙂" and d.update(ids[:6]) == "b"
    assert d.update(ids[:6]) == ""
