"""The GPU benchmarks' preset reader works without pyyaml and agrees with it on every preset."""

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from model_common import read_simple_yaml, train_flops_per_token  # noqa: E402

from moray.model import ModelConfig  # noqa: E402


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_simple_yaml_reader_agrees_with_pyyaml(preset):
    text = (ROOT / "configs" / preset).read_text()
    try:
        ours = read_simple_yaml(text)
    except ValueError as err:  # a preset grew syntax the reader refuses: it says so, never misreads
        assert "install pyyaml" in str(err)
        return
    assert ours == yaml.safe_load(text)


def test_simple_yaml_reader_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="install pyyaml"):
        read_simple_yaml("data:\n  sources:\n    - name: a\n")


def test_flops_per_token_formula():
    cfg = ModelConfig(vocab_size=100, d_model=16, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=32,
                      n_experts=4, top_k=2)
    f = train_flops_per_token(cfg, seq_len=10)
    # head_dim 4; active = embeddings 2*100*16 + attention 2*(16*16 + 2*16*4 + 16*16)
    #                    + 2 of 4 experts 2*2*3*16*32 + router 2*16*4 + norms 5*16
    n_active = 3200 + 2 * 640 + 6144 + 128 + 80
    assert f["n_active"] == n_active
    assert f["total"] == 6 * n_active + 12 * 2 * 4 * 4 * 10
