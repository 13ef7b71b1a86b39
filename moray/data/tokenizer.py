"""Tokenizers: the built-in byte tokenizer and an adapter for Hugging Face JSON files.

Both expose the same small surface: `id` (stored in every manifest and shard
and checked when data is opened), `vocab_size`, the special ids (`bos_id`,
`eos_id`, `pad_id`, `role_ids`), `encode`, `decode` and `encode_chat`.

Byte layout (`byte-v1`, 263 ids, fits model.vocab_size 320):

    0..255   the UTF-8 bytes
    256 <|bos|>  257 <|eos|>  258 <|pad|>
    259 <|system|>  260 <|user|>  261 <|assistant|>  262 <|end|>
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")
SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or does not match the data; the message says what to do."""


class ByteTokenizer:
    """UTF-8 bytes plus a few special ids; needs no download and never fails to encode."""

    id = "byte-v1"

    def __init__(self) -> None:
        self.special_ids: Dict[str, int] = {tok: 256 + i for i, tok in enumerate(SPECIALS)}
        self.vocab_size = 256 + len(SPECIALS)
        self.bos_id = self.special_ids["<|bos|>"]
        self.eos_id = self.special_ids["<|eos|>"]
        self.pad_id = self.special_ids["<|pad|>"]
        self.end_id = self.special_ids["<|end|>"]
        self.role_ids = {role: self.special_ids[f"<|{role}|>"] for role in ROLES}
        self._special_re = re.compile("|".join(re.escape(s) for s in SPECIALS))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> List[int]:
        """Token ids of `text`. Special-token strings in `text` stay plain bytes unless
        `allow_special` (so a document that quotes "<|eos|>" cannot forge a boundary)."""
        ids: List[int] = [self.bos_id] if bos else []
        if allow_special:
            pos = 0
            for m in self._special_re.finditer(text):
                ids.extend(text[pos : m.start()].encode("utf-8"))
                ids.append(self.special_ids[m.group()])
                pos = m.end()
            ids.extend(text[pos:].encode("utf-8"))
        else:
            ids.extend(text.encode("utf-8"))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for data preparation: the document's ids as an int32 array, no specials."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        names = {i: s for s, i in self.special_ids.items()}
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if i not in names:
                raise TokenizerError(f"token id {i} is outside {self.id} (vocab_size {self.vocab_size})")
            if not skip_special:
                out.append(names[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> List[int]:
        return encode_chat(self, messages, add_generation_prompt=add_generation_prompt)


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file; its id is a hash of the file's bytes."""

    EOS_NAMES = ("<|endoftext|>", "<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
    BOS_NAMES = ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "[CLS]")
    PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer file {path} not found; set data.tokenizer to 'byte' or to the path of a tokenizer.json"
            )
        from tokenizers import Tokenizer  # imported here: only users of this adapter need the package

        raw = path.read_bytes()
        self.path = str(path)
        self.id = "hf-" + hashlib.sha256(raw).hexdigest()[:16]
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # the library raises a bare Exception subclass
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({err})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(self.EOS_NAMES)
        if self.eos_id is None:
            raise TokenizerError(
                f"{path}: no end-of-sequence token (looked for {', '.join(self.EOS_NAMES)}); "
                "add one as a special token so documents can be separated"
            )
        self.bos_id = self._find(self.BOS_NAMES)
        pad = self._find(self.PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad
        self.end_id = self._find(("<|end|>", "<|im_end|>", "<|eot_id|>"))
        self.role_ids = {r: i for r in ROLES if (i := self._find((f"<|{r}|>",))) is not None}
        self.special_ids = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        names = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(n) for n in names)) if names else None

    def _find(self, names: Sequence[str]) -> Optional[int]:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> List[int]:
        ids = self._encode(text, allow_special)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if eos else ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._encode(text, False), dtype=np.int32)

    def _encode(self, text: str, allow_special: bool) -> List[int]:
        # `tokenizers` always matches added tokens; unless allowed, a special token's
        # text is encoded as two plain pieces so a document cannot forge one.
        if allow_special or self._special_re is None or not self._special_re.search(text):
            return self._tok.encode(text, add_special_tokens=False).ids
        ids: List[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            for piece in (text[pos : m.start()], m.group()[:1], m.group()[1:]):
                if piece:
                    ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
            pos = m.end()
        if text[pos:]:
            ids.extend(self._tok.encode(text[pos:], add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> List[int]:
        return encode_chat(self, messages, add_generation_prompt=add_generation_prompt)


def encode_chat(tok, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> List[int]:
    """`<|role|>content<|end|>` per message; with add_generation_prompt, end on `<|assistant|>`."""
    missing = [r for r in ROLES if r not in tok.role_ids] + ([] if tok.end_id is not None else ["end"])
    if missing:
        raise TokenizerError(f"tokenizer {tok.id} has no chat tokens for: {', '.join(missing)}")
    ids: List[int] = []
    for m in messages:
        role = m.get("role")
        if role not in tok.role_ids:
            raise TokenizerError(f"chat message role {role!r}: expected one of {', '.join(ROLES)}")
        ids.append(tok.role_ids[role])
        ids.extend(tok.encode(str(m.get("content", ""))))
        ids.append(tok.end_id)
    if add_generation_prompt:
        ids.append(tok.role_ids["assistant"])
    return ids


def load_tokenizer(spec: str = "byte"):
    """`"byte"` -> ByteTokenizer; a path to a tokenizer.json -> HFTokenizer."""
    if spec in ("byte", ByteTokenizer.id):
        return ByteTokenizer()
    return HFTokenizer(spec)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that stores every id (shards hold this dtype)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
