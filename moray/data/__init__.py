"""Data: tokenizer, tokenized parquet shards, the resumable mixture sampler.

No Ray at import time (the GPU machine has none): only `moray.data.ray_prepare`
imports it, inside its functions.
"""

from moray.data.config import DataConfig, SourceConfig
from moray.data.manifest import DataError, Manifest
from moray.data.prepare import PrepareResult, prepare
from moray.data.sampler import MixtureSampler
from moray.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "DataConfig", "SourceConfig", "DataError", "Manifest", "PrepareResult", "prepare", "MixtureSampler",
    "ByteTokenizer", "HFTokenizer", "TokenizerError", "load_tokenizer",
]
