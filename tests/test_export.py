"""`moray export` and `train.init_from`: checkpoints of any layout <-> Hugging Face and moray dirs.

One spawn of 4 ranks builds real checkpoints: pp 2 x ep 2 (float32) trains two steps and
saves each into a run directory; tp 2 x dp 2 starts from that run and from an HF directory
(init_from); tp 2 x ep 2 in bf16 starts from the run and saves a bf16 checkpoint (with its
fp32 masters). Everything else runs in this process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_utils import OPTIM, SEED, batches, spawn, tiny_config
from moray.model import build_model
from moray.model.hf import load_moray_dir, save_hf_dir
from moray.platform.cli import main as moray_cli
from moray.platform.init_weights import InitFromError, check_init_from

# transformers (a test dependency: a missing one fails, never skips) is imported where it is
# used: the spawned ranks import this module, and importing Mixtral in each of them costs more
# than the training they do.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

# init_std 0.1 (not 0.02): logits of order 1, so a 1e-4 agreement means something.
MODEL = dict(init_std=0.1)
TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def write_run(run_dir: Path, model: dict, parallel: dict, dtype: str = "float32") -> None:
    """The run's config.yaml, as the controller writes it."""
    from moray.platform.config import build_config

    cfg = build_config({"model": model, "parallel": parallel,
                        "train": {"run_name": run_dir.name, "runs_dir": str(run_dir.parent), "dtype": dtype}})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())


def _engine(rank: int, world: int, parallel: dict, dtype: str = "float32"):
    from moray.parallel import ParallelConfig, ParallelDims, TrainEngine

    pcfg = ParallelConfig(**parallel)
    return TrainEngine(tiny_config(**MODEL), pcfg, ParallelDims.from_config(pcfg, world), rank, "cpu", seed=SEED,
                       dtype=dtype, **OPTIM)


def _store(rank: int, world: int, root: str):
    from moray.platform.checkpoint import CheckpointStore

    return CheckpointStore(root, keep=3, rank=rank, world_size=world, async_save=False)


def _make_checkpoints(rank: int, world: int, run_dir: str, hf_dir: str, bf16_run: str):
    """One spawn (processes are the expensive part on 2 cores), three layouts in turn."""
    from torch.distributed.tensor import DTensor

    from moray.platform.init_weights import load_initial_weights

    out = {}
    # pp 2 x ep 2, float32: two steps of training, each saved.
    engine = _engine(rank, world, dict(pp=2, ep=2, microbatches=2))
    store, out["states"] = _store(rank, world, f"{run_dir}/checkpoints"), {}
    for step, tokens in enumerate(batches(2), start=1):
        n = tokens.shape[0] // engine.dims.dp
        engine.step(tokens[engine.coords.dp * n:(engine.coords.dp + 1) * n])
        store.save(step, engine.state_dict(), extra={"step": step, "layout": engine.dims.describe()})
        out["states"][step] = engine.full_state_dict()
    store.close()
    # tp 2 x dp 2: init_from that run, then from a Hugging Face directory.
    engine = _engine(rank, world, dict(tp=2, microbatches=2))
    out["from_run"] = (load_initial_weights(engine, run_dir), engine.full_state_dict())
    out["from_hf"] = (load_initial_weights(engine, hf_dir), engine.full_state_dict())
    # tp 2 x ep 2, bf16 (fp32 masters): init_from the float32 run, then saved.
    bf16 = _engine(rank, world, dict(tp=2, ep=2, microbatches=2), dtype="bfloat16")
    load_initial_weights(bf16, run_dir)
    sd = bf16.state_dict()
    masters = {}
    for fqn, _ in bf16.named_parameters():  # ZeRO-1: each master lives on its owner; gather them all
        v = sd.get(f"optim.{fqn}.master")
        v = v.full_tensor() if isinstance(v, DTensor) else v
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, None if v is None else v.cpu())
        masters[fqn] = next(g for g in gathered if g is not None)
    out["bf16"] = (bf16.full_state_dict(), masters)
    store = _store(rank, world, f"{bf16_run}/checkpoints")
    store.save(7, sd, extra={"step": 7, "layout": bf16.dims.describe()})
    store.close()
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run, bf16_run, hf_dir = root / "pp2_ep2", root / "tp2_ep2_bf16", root / "hf_source"
    write_run(run, tiny_config(**MODEL).to_dict(), dict(pp=2, ep=2, microbatches=2))
    write_run(bf16_run, tiny_config(**MODEL).to_dict(), dict(tp=2, ep=2, microbatches=2), dtype="bfloat16")
    source = build_model(tiny_config(**MODEL), seed=99)  # weights no engine of this run would make
    save_hf_dir(hf_dir, source.cfg, source.state_dict())
    out = spawn(_make_checkpoints, 4, str(run), str(hf_dir), str(bf16_run))[0]
    return dict(root=root, run=run, bf16_run=bf16_run, hf_dir=hf_dir, hf_state=source.state_dict(), **out)


def moray_logits(sd, dtype=torch.float32) -> torch.Tensor:
    model = build_model(tiny_config(**MODEL)).eval()
    model.load_state_dict({k: v.to(dtype).float() for k, v in sd.items()})
    with torch.no_grad():
        return model(TOKENS)


def hf_logits(path) -> torch.Tensor:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(TOKENS).logits


def assert_same_state(got, want) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def run_cli(args, capsys):
    code = moray_cli(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- export


def test_pp2_ep2_checkpoint_exports_to_hf_with_the_same_logits(runs, tmp_path, capsys):
    code, out, err = run_cli(["export", "--run", str(runs["run"]), "--to-hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    assert "exported step 2" in out and "pp 2" in out and "ep 2" in out and "model.safetensors" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["torch_dtype"] == "float32"
    ours, theirs = moray_logits(runs["states"][2]), hf_logits(tmp_path / "hf")
    assert theirs.abs().max() > 1.0
    diff = (ours - theirs).abs().max().item()
    print(f"pp2 x ep2 float32 checkpoint -> HF: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


def test_export_to_moray_picks_the_step_and_is_exact(runs, tmp_path, capsys):
    code, out, err = run_cli(["export", "--run", str(runs["run"]), "--step", "1", "--to-moray", str(tmp_path / "m")],
                             capsys)
    assert code == 0, err
    cfg, sd = load_moray_dir(tmp_path / "m")
    assert cfg == tiny_config(**MODEL)
    assert_same_state(sd, runs["states"][1])
    assert not torch.equal(sd["norm.weight"], runs["states"][2]["norm.weight"])  # step 1, not the latest


def test_tp2_ep2_bf16_checkpoint_exports_bf16_and_its_master_weights(runs, tmp_path, capsys):
    full, masters = runs["bf16"]
    assert all(v.dtype == torch.bfloat16 for v in full.values())
    code, _, err = run_cli(["export", "--run", str(runs["bf16_run"]), "--to-hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    diff = (moray_logits(full) - hf_logits(tmp_path / "hf")).abs().max().item()
    print(f"tp2 x ep2 bf16 checkpoint -> HF (compared in float32): max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
    assert masters and all(v.dtype == torch.float32 for v in masters.values())
    code, _, err = run_cli(["export", "--run", str(runs["bf16_run"]), "--master-weights",
                            "--to-moray", str(tmp_path / "m")], capsys)
    assert code == 0, err
    assert_same_state(load_moray_dir(tmp_path / "m")[1], masters)  # --master-weights: the fp32 masters, exactly


def test_checkpoint_elsewhere_needs_its_config_and_reads_from_a_uri(runs, tmp_path, capsys):
    moved = tmp_path / "bucket" / "ckpt"
    shutil.copytree(runs["run"] / "checkpoints", moved)
    uri = f"file://{moved}/step_0000002"
    code, _, err = run_cli(["export", "--checkpoint", uri, "--to-hf", str(tmp_path / "a")], capsys)
    assert code == 2 and "--config" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["export", "--checkpoint", f"file://{moved}", "--config", str(runs["run"] / "config.yaml"),
                              "--to-moray", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert_same_state(load_moray_dir(tmp_path / "b")[1], runs["states"][2])


def _broken(kind: str, runs, tmp: Path) -> list:
    """CLI arguments that must fail, made from the real run."""
    run = runs["run"]
    if kind == "missing_run":
        return ["--run", str(tmp / "nope")]
    if kind == "not_a_run":
        (tmp / "empty").mkdir()
        return ["--run", str(tmp / "empty")]
    if kind == "no_committed":  # a save that never committed, no `latest`
        shutil.copytree(run / "checkpoints" / "step_0000001", tmp / "ckpt" / "step_0000001")
        (tmp / "ckpt" / "step_0000001" / "manifest.json").unlink()
        return ["--checkpoint", str(tmp / "ckpt")]
    if kind == "step_missing":
        return ["--run", str(run), "--step", "5"]
    if kind == "incomplete":
        shutil.copytree(run / "checkpoints", tmp / "ckpt")
        (tmp / "ckpt" / "step_0000002" / "manifest.json").unlink()
        return ["--checkpoint", str(tmp / "ckpt" / "step_0000002")]
    if kind in ("dense", "wrong_config"):  # a config HF cannot represent / one that is not the checkpoint's
        model = tiny_config(**MODEL).to_dict() | ({"n_experts": 1} if kind == "dense" else {"n_layers": 2})
        write_run(tmp / "r", model, {})
        shutil.copytree(run / "checkpoints", tmp / "r" / "checkpoints")
        return ["--run", str(tmp / "r")]
    if kind == "out_not_empty":
        (tmp / "out").mkdir()
        (tmp / "out" / "model.safetensors").write_text("x")
        return ["--run", str(run)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,needle", [
    ("missing_run", "no such run directory"),
    ("not_a_run", "not a run directory (no config.yaml)"),
    ("no_committed", "no committed checkpoint"),
    ("step_missing", "committed steps: [1, 2]"),
    ("incomplete", "incomplete checkpoint"),
    ("dense", "cannot represent"),
    ("wrong_config", "does not hold the model its config describes"),
    ("out_not_empty", "exists and is not empty"),
])
def test_bad_inputs_fail_with_one_line_and_exit_2(runs, tmp_path, capsys, kind, needle):
    args = _broken(kind, runs, tmp_path)
    code, out, err = run_cli(["export", *args, "--to-hf", str(tmp_path / "out")], capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("moray export: error:")


def test_tied_embeddings_export_from_a_single_rank_checkpoint(tmp_path):
    from moray.platform.checkpoint import CheckpointStore
    from moray.platform.export import export_checkpoint

    cfg = tiny_config(**MODEL, tie_embeddings=True)
    model = build_model(cfg, seed=3)
    write_run(tmp_path / "run", cfg.to_dict(), {})
    state = {f"model.{k}": v for k, v in model.state_dict().items() if k != "output.weight"}
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"), async_save=False)
    store.save(3, state)
    store.close()
    res = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert res.source.step == 3 and json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"]
    with torch.no_grad():
        assert (model.eval()(TOKENS) - hf_logits(tmp_path / "hf")).abs().max().item() < 1e-4


# ---------------------------------------------------------------- init_from


def test_init_from_a_pp2_ep2_run_under_tp2_dp2_is_exact(runs):
    summary, full = runs["from_run"]
    assert summary.kind == "checkpoint" and summary.step == 2 and summary.path.endswith("step_0000002")
    assert summary.notes == [] and summary.tensors > 0
    assert_same_state(full, runs["states"][2])


def test_init_from_an_hf_dir_under_tp2_dp2_is_exact(runs):
    summary, full = runs["from_hf"]
    assert summary.kind == "hf" and summary.step is None
    assert_same_state(full, runs["hf_state"])


def test_init_from_into_bf16_keeps_fp32_masters_exact(runs):
    full, masters = runs["bf16"]
    assert_same_state(full, {k: v.to(torch.bfloat16) for k, v in runs["states"][2].items()})
    assert_same_state(masters, runs["states"][2])  # the fp32 source, not its bf16 rounding


def test_check_init_from_pins_the_step_and_refuses_mismatches_by_name(runs):
    src = check_init_from(str(runs["run"]), tiny_config(**MODEL))
    assert (src.kind, src.step) == ("checkpoint", 2) and src.path.endswith("checkpoints/step_0000002")
    longer = check_init_from(str(runs["hf_dir"]), tiny_config(**MODEL, max_seq_len=512))  # context extension
    assert any("model.max_seq_len: source 256, run 512" in n for n in longer.notes)
    both = r"model\.ffn_hidden: source 256, run 128; model\.n_experts: source 4, run 8"
    with pytest.raises(InitFromError, match=both):
        check_init_from(str(runs["hf_dir"]), tiny_config(**MODEL, n_experts=8, ffn_hidden=128))
    with pytest.raises(InitFromError, match="d_model"):
        check_init_from(str(runs["run"]), tiny_config(**MODEL, d_model=64))
    with pytest.raises(InitFromError, match="no such run or checkpoint"):
        check_init_from(str(runs["root"] / "nope"), tiny_config(**MODEL))
