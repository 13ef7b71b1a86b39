"""Small deterministic corpora for the data tests (helpers only; no tests here)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import List

import numpy as np

from moray.data import DataConfig, Manifest, SourceConfig, prepare

WORDS = "the a of mixture expert token shard epoch river moray eel reef sand tide current light".split()


def quiet(*_args) -> None:
    pass


def write_corpus(root: Path, n_text: int = 30, n_code: int = 20, seed: int = 0) -> List[SourceConfig]:
    """Text files of random words and small .py files; text 2 epochs, code 4."""
    rng = random.Random(seed)
    (root / "text" / "sub").mkdir(parents=True, exist_ok=True)
    (root / "code").mkdir(parents=True, exist_ok=True)
    for i in range(n_text):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80)))
        folder = root / "text" / ("sub" if i % 3 == 0 else "")
        (folder / f"doc{i:03d}.txt").write_text(f"Document {i}: {words}.\n")
    for i in range(n_code):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(rng.randint(1, 5)))
        (root / "code" / f"mod{i:03d}.py").write_text(body)
    (root / "code" / "README.txt").write_text("not code: the default glob skips it\n")
    return [
        SourceConfig(name="text", path=str(root / "text"), format="text", epochs=2),
        SourceConfig(name="code", path=str(root / "code"), format="code", epochs=4),
    ]


def prepare_corpus(tmp: Path, seq_len: int = 16, shard_sequences: int = 8, **corpus) -> Manifest:
    sources = write_corpus(tmp / "src", **corpus)
    data = DataConfig(dir=str(tmp / "data"), sources=sources, shard_sequences=shard_sequences)
    return prepare(data, seq_len, log=quiet).manifest


def shard_stream(manifest: Manifest, source: int, shard: int) -> np.ndarray:
    """A shard's packed stream rebuilt from its overlapping rows."""
    rows = manifest.read_shard(source, shard).astype(np.int64)
    L = manifest.seq_len
    return np.concatenate([rows[:, :L].reshape(-1), rows[-1, L:]])


def file_states(root: Path) -> dict:
    """path -> (mtime_ns, bytes) of every file under root: proof that nothing was rewritten."""
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}
