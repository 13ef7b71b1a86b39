"""Data: tokenizer, tokenized parquet shards, the resumable mixture sampler.

No Ray at import time (the GPU machine has none): only `moray.data.ray_prepare`
imports it, inside its functions. numpy and pyarrow load on first use, so the
config (which the planner reads) stays light.
"""

from moray.data.config import DataConfig, SourceConfig

__all__ = [
    "DataConfig", "SourceConfig", "DataError", "Manifest", "PrepareResult", "prepare", "MixtureSampler",
    "ByteTokenizer", "HFTokenizer", "TokenizerError", "load_tokenizer",
]

_WHERE = {
    "DataError": "manifest", "Manifest": "manifest", "PrepareResult": "preparation", "prepare": "preparation",
    "MixtureSampler": "sampler", "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer",
    "TokenizerError": "tokenizer", "load_tokenizer": "tokenizer",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"moray.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'moray.data' has no attribute {name!r}")
