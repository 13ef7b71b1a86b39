"""load_for_serving: the same weights saved three ways (a Hugging Face directory, a moray
directory, a training checkpoint of a one-process TrainEngine) load to models with the very
same logits; dtypes, tokenizers, and clear errors for paths that are none of these."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moray.model import ModelConfig, build_model
from moray.model.hf import save_hf_dir
from moray.model.safetensors_io import save_moray_dir
from moray.serve.engine.loader import LoadError, load_for_serving

MODEL = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=96, n_experts=4, top_k=2,
             max_seq_len=64, init_std=0.1)
TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def write_run(run_dir: Path, model: dict, dtype: str = "float32") -> None:
    """The run's config.yaml, as the controller writes it."""
    from moray.platform.config import build_config

    cfg = build_config({"model": model, "parallel": {"microbatches": 1},
                        "train": {"run_name": run_dir.name, "runs_dir": str(run_dir.parent), "dtype": dtype,
                                  "seq_len": 16}})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())


def train_and_save(run_dir: Path, dtype: str, step: int) -> dict:
    """One TrainEngine step in a gloo group of one, saved with CheckpointStore; its full weights."""
    from moray.parallel import ParallelConfig, ParallelDims, TrainEngine
    from moray.platform.checkpoint import CheckpointStore

    pcfg = ParallelConfig(microbatches=1)
    engine = TrainEngine(ModelConfig(**MODEL), pcfg, ParallelDims.from_config(pcfg, 1), 0, "cpu", seed=7, dtype=dtype)
    engine.step(torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1)))
    write_run(run_dir, MODEL, dtype)
    store = CheckpointStore(str(run_dir / "checkpoints"), keep=3, rank=0, world_size=1, async_save=False)
    store.save(step, engine.state_dict(), extra={"step": step})
    store.close()
    return engine.full_state_dict()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_load")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        weights = train_and_save(root / "run", "float32", 1)
        bf16_weights = train_and_save(root / "bf16_run", "bfloat16", 2)
    finally:
        dist.destroy_process_group()
    cfg = ModelConfig(**MODEL)
    save_hf_dir(root / "hf", cfg, weights)
    save_moray_dir(root / "moray", cfg, weights)
    return dict(root=root, cfg=cfg, weights=weights, bf16_weights=bf16_weights)


def reference_logits(cfg, weights, dtype=torch.float32):
    model = build_model(cfg, dtype=dtype).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(TOKENS)


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


# ---------------------------------------------------------------- three kinds, one model


@pytest.mark.parametrize("where,kind", [("hf", "hf"), ("moray", "moray"), ("run", "checkpoint"),
                                        ("run/checkpoints", "checkpoint"),
                                        ("run/checkpoints/step_0000001", "checkpoint")])
def test_every_kind_loads_the_same_model(saved, where, kind):
    loaded = load_for_serving(str(saved["root"] / where))
    assert loaded.source == kind and loaded.config == saved["cfg"]
    assert loaded.step == (1 if kind == "checkpoint" else None)
    model = loaded.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(logits(model), reference_logits(saved["cfg"], saved["weights"]))


def test_bf16_checkpoint_stays_bf16_and_dtype_casts(saved, tmp_path):
    loaded = load_for_serving(str(saved["root"] / "bf16_run"))
    assert loaded.step == 2 and all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.model.rope_cos.dtype == torch.bfloat16  # as build_model(dtype=bf16) makes it
    assert torch.equal(logits(loaded.model), reference_logits(saved["cfg"], saved["bf16_weights"], torch.bfloat16))
    # bf16 on disk (a Hugging Face directory), read as is and cast up.
    save_hf_dir(tmp_path / "hf16", saved["cfg"], saved["weights"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in load_for_serving(str(tmp_path / "hf16")).model.parameters())
    up = load_for_serving(str(tmp_path / "hf16"), dtype=torch.float32).model
    want = {k: v.to(torch.bfloat16).float() for k, v in saved["weights"].items()}
    assert all(torch.equal(up.state_dict()[k], want[k]) for k in want)
    # float32 on disk, cast down on load.
    down = load_for_serving(str(saved["root"] / "moray"), dtype=torch.bfloat16).model
    assert torch.equal(logits(down), reference_logits(saved["cfg"], saved["weights"], torch.bfloat16))


def test_tied_embeddings_stay_tied(tmp_path):
    cfg = ModelConfig(**{**MODEL, "tie_embeddings": True})
    source = build_model(cfg, seed=3).eval()
    save_moray_dir(tmp_path / "tied", cfg, source.state_dict())
    model = load_for_serving(str(tmp_path / "tied")).model
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(logits(model), logits(source))


# ---------------------------------------------------------------- tokenizers


def _hf_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the moray hides in the reef at night"] * 20, trainer)
    tok.save(str(path))


def test_tokenizers_found_beside_the_weights_or_in_the_run(saved, tmp_path):
    from moray.data.tokenizer import ByteTokenizer, HFTokenizer

    assert load_for_serving(str(saved["root"] / "hf")).tokenizer is None  # no tokenizer files: token ids
    assert isinstance(load_for_serving(str(saved["root"] / "run")).tokenizer, ByteTokenizer)  # data.tokenizer
    step_dir = saved["root"] / "run" / "checkpoints" / "step_0000001"
    assert isinstance(load_for_serving(str(step_dir)).tokenizer, ByteTokenizer)  # the run's, found from the step
    save_hf_dir(tmp_path / "hf", saved["cfg"], saved["weights"])
    _hf_tokenizer(tmp_path / "hf" / "tokenizer.json")
    tok = load_for_serving(str(tmp_path / "hf")).tokenizer
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("the reef")) == "the reef"
    assert isinstance(load_for_serving(str(tmp_path / "hf"), tokenizer="byte").tokenizer, ByteTokenizer)
    from tokenizers import Tokenizer, models  # a word-level vocabulary larger than the model's

    words = {f"w{i}": i for i in range(399)} | {"</s>": 399}
    Tokenizer(models.WordLevel(words, unk_token="w0")).save(str(tmp_path / "hf" / "tokenizer.json"))
    with pytest.raises(LoadError, match="tokenizer has 400 ids but the model only 320"):
        load_for_serving(str(tmp_path / "hf"))


# ---------------------------------------------------------------- errors


def test_paths_that_are_no_model_fail_clearly(saved, tmp_path):
    with pytest.raises(LoadError, match="no such file or directory; expected a Hugging Face"):
        load_for_serving(str(tmp_path / "nowhere"))
    with pytest.raises(LoadError, match="it is a file; point at the directory"):
        load_for_serving(str(saved["root"] / "moray" / "model.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="has none of config.json, moray_config.yaml"):
        load_for_serving(str(tmp_path / "empty"))
    with pytest.raises(LoadError, match="step 5 has no committed checkpoint.*committed steps: \\[1\\]"):
        load_for_serving(str(saved["root"] / "run"), step=5)
    with pytest.raises(LoadError, match="floating-point"):
        load_for_serving(str(saved["root"] / "moray"), dtype=torch.int8)


def test_configs_that_do_not_fit_their_weights_fail_clearly(saved, tmp_path):
    import shutil

    # A moray directory whose config was edited: same tensor names, other shapes.
    shutil.copytree(saved["root"] / "moray", tmp_path / "moray")
    cfg_file = tmp_path / "moray" / "moray_config.yaml"
    raw = json.loads(cfg_file.read_text())
    raw["model"]["ffn_hidden"] = 128
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(LoadError, match=r"experts.w1 is \(4, 64, 96\) but its config wants \(4, 64, 128\)"):
        load_for_serving(str(tmp_path / "moray"))
    # A Hugging Face config with more layers than its weights.
    shutil.copytree(saved["root"] / "hf", tmp_path / "hf")
    hf_cfg = tmp_path / "hf" / "config.json"
    hf_cfg.write_text(json.dumps({**json.loads(hf_cfg.read_text()), "num_hidden_layers": 3}))
    with pytest.raises(LoadError, match="missing .*model.layers.2"):
        load_for_serving(str(tmp_path / "hf"))
    # A run whose config.yaml describes another model than its checkpoint holds.
    shutil.copytree(saved["root"] / "run", tmp_path / "run")
    write_run(tmp_path / "run", {**MODEL, "d_model": 128})
    with pytest.raises(LoadError, match="does not hold the model its config describes"):
        load_for_serving(str(tmp_path / "run"))
