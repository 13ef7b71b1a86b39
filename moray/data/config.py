"""The data config section: where sources are, how they mix, where shards go.

Plain dataclasses (no pydantic, no Ray): `platform/config.py` validates them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Literal, Optional


@dataclass
class SourceConfig:
    name: str
    path: str  # a folder of text/code files, a .jsonl file, or a .parquet file/folder
    format: Literal["text", "code", "jsonl", "parquet"] = "text"
    epochs: Optional[float] = None  # how many times the source is seen; exclusive with weight
    weight: Optional[float] = None  # share of the mixture; exclusive with epochs
    text_field: str = "text"  # jsonl field / parquet column holding the document
    glob: Optional[str] = None  # file pattern inside a folder; None = by format (*.py for code, *.txt/*.md for text)

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.epochs is not None and self.weight is not None:
            raise ValueError(f"data source {self.name!r}: set either epochs or weight, not both")


@dataclass
class DataConfig:
    dir: str = "data/demo"  # where prepared shards and the manifest live
    sources: List[SourceConfig] = field(default_factory=list)
    tokenizer: str = "byte"  # "byte" (built in) or a path to a Hugging Face tokenizer.json
    shard_sequences: int = 2048  # packed sequences per parquet shard
    seed: Optional[int] = None  # mixture order seed; None = train.seed
    demo_corpus: bool = False  # build sources from the Python standard library (make demo)

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        self.sources = [SourceConfig(**s) if isinstance(s, dict) else s for s in self.sources]

    def to_dict(self) -> dict:
        return asdict(self)
