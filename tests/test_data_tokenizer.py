"""The byte tokenizer and the Hugging Face adapter."""

from __future__ import annotations

import pytest

from moray.data import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer
from moray.data.tokenizer import SPECIALS


def test_byte_layout_fits_the_tiny_model():
    tok = ByteTokenizer()
    assert tok.id == "byte-v1" and tok.vocab_size == 256 + len(SPECIALS) <= 320
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert set(tok.role_ids) == {"system", "user", "assistant"} and tok.end_id == 262
    assert load_tokenizer("byte").id == "byte-v1"


def test_byte_roundtrip_unicode():
    tok = ByteTokenizer()
    text = "moray 🐍 — naïve\x00end"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(i < 256 for i in ids[1:-1]) and len(ids) == len(text.encode()) + 2
    assert tok.decode(ids, skip_special=True) == text
    assert tok.decode(ids) == "<|bos|>" + text + "<|eos|>"
    assert tok.encode_array(text).tolist() == list(text.encode())


def test_special_text_is_not_a_special_token_unless_allowed():
    tok = ByteTokenizer()
    assert tok.eos_id not in tok.encode("a <|eos|> b")
    assert tok.encode("a<|eos|>b", allow_special=True) == [ord("a"), tok.eos_id, ord("b")]


def test_chat_template():
    tok = ByteTokenizer()
    ids = tok.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                          add_generation_prompt=True)
    assert tok.decode(ids) == "<|system|>be brief<|end|><|user|>hi<|end|><|assistant|>"
    with pytest.raises(TokenizerError, match="role 'robot'"):
        tok.encode_chat([{"role": "robot", "content": "x"}])


def _hf_file(tmp_path, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"] + specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the moray hides in the reef at night"] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_adapter(tmp_path):
    path = _hf_file(tmp_path, ["<|endoftext|>", "<|user|>", "<|system|>", "<|assistant|>", "<|end|>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.id.startswith("hf-") and len(tok.id) == 19
    assert tok.eos_id == tok.pad_id == 1 and tok.bos_id is None
    text = "the moray hides"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text, eos=True)[-1] == tok.eos_id
    forged = tok.encode("reef <|endoftext|> night")
    assert tok.eos_id not in forged and tok.decode(forged) == "reef <|endoftext|> night"
    assert tok.eos_id in tok.encode("reef <|endoftext|>", allow_special=True)
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == tok.role_ids["user"]
    assert HFTokenizer(path).id == tok.id, "the id is the file's hash"


def test_hf_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(TokenizerError, match="no end-of-sequence token"):
        load_tokenizer(str(_hf_file(tmp_path, [])))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "junk.json"))


def test_hf_tokenizer_end_to_end(tmp_path):
    from moray.data import DataConfig, DataError, MixtureSampler, SourceConfig, prepare

    path = _hf_file(tmp_path, ["<|endoftext|>"])
    (tmp_path / "src").mkdir()
    for i in range(20):
        (tmp_path / "src" / f"{i}.txt").write_text("the moray hides in the reef at night " * (i + 3))
    data = DataConfig(dir=str(tmp_path / "d"), tokenizer=str(path), sources=[SourceConfig(name="t", path=str(tmp_path / "src"))])
    m = prepare(data, 8, log=lambda *_: None).manifest
    tok = load_tokenizer(str(path))
    assert m.tokenizer["id"] == tok.id and m.tokenizer["eos_id"] == tok.eos_id
    x = MixtureSampler(str(tmp_path / "d"), seed=0, tokenizer_id=tok.id).next_batch(4)
    assert x.max() < tok.vocab_size and (x == tok.eos_id).any()
    with pytest.raises(DataError, match="byte-v1"):
        MixtureSampler(str(tmp_path / "d"), seed=0, tokenizer_id="byte-v1")
