"""Shared by the serving endpoint's tests and bench/serve_http.py: a tiny random MoE saved
as a moray directory with a Hugging Face tokenizer.json beside it that has the chat
role tokens (so the loader's real path finds both), a free port, and a uvicorn server
running an app on a background thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from moray.model import ModelConfig, build_model
from moray.model.safetensors_io import save_moray_dir

TINY = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=64, mlp="swiglu",
                   n_experts=4, top_k=2, max_seq_len=128, init_std=0.1)
SPECIALS = ["<unk>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = ["the moray hides in the reef at night and hunts small fish", "def f(x):\n    return x + 1\n"]


def save_tiny_model(path: Path, cfg: ModelConfig = TINY, seed: int = 7) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    model = build_model(cfg, seed=seed)
    save_moray_dir(path, cfg, model.state_dict())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 from a daemon thread, until stop()."""

    def __init__(self, app, port: int = 0, root_path: str = ""):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off", root_path=root_path))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            time.sleep(0.01)
        raise RuntimeError(f"uvicorn did not start on {self.url}")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
