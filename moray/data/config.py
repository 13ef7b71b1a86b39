"""The data config section: where sources are, how they mix, where shards go.

Plain dataclasses (no pydantic, no Ray): `platform/config.py` validates them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import List, Literal, Optional

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SourceConfig:
    name: str  # names the source's shard folder and its entry in the manifest and sampler state
    path: str  # a folder of text/code files, a .jsonl file/folder, or a .parquet file/folder (local or URI)
    format: Literal["text", "code", "jsonl", "parquet"] = "text"
    # How much of the source one pass of the mixture holds. Set one of the two;
    # neither = 1 epoch. Epochs may be fractional (the last epoch is a random subset).
    epochs: Optional[float] = None  # times each sequence of the source is seen per pass
    weight: Optional[float] = None  # share of the pass (0..1 next to epoch sources, relative otherwise)
    text_field: str = "text"  # jsonl field / parquet column holding the document
    # fnmatch pattern on the path relative to the folder ("*" crosses "/");
    # None = by format: "*.py" for code, "*.txt" and "*.md" for text.
    glob: Optional[str] = None

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if not _NAME.match(self.name or ""):
            raise ValueError(
                f"data source name {self.name!r}: use letters, digits, '_', '-' or '.' "
                "(it names a folder under data.dir/shards)"
            )
        if self.epochs is not None and self.weight is not None:
            raise ValueError(f"data source {self.name!r}: set either epochs or weight, not both")
        for key in ("epochs", "weight"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"data source {self.name!r}: {key} must be > 0 (got {value})")


@dataclass
class DataConfig:
    dir: str = "data/demo"  # where prepared shards and manifest.json live (local path or pyarrow.fs URI)
    sources: List[SourceConfig] = field(default_factory=list)
    tokenizer: str = "byte"  # "byte" (built in) or a path to a Hugging Face tokenizer.json
    shard_sequences: int = 2048  # packed sequences per parquet shard (approximate: a shard ends on a document)
    # Shards of one source shuffled together: the sampler keeps about
    # shuffle_window shards per source in memory, so larger = better mixing, more memory.
    shuffle_window: int = 4
    seed: Optional[int] = None  # mixture order seed; None = train.seed
    demo_corpus: bool = False  # build sources from the Python standard library (make demo)

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        self.sources = [SourceConfig(**s) if isinstance(s, dict) else s for s in self.sources]
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.sources: names must be unique; repeated: {', '.join(dupes)}")
        if self.shard_sequences < 1:
            raise ValueError(f"data.shard_sequences must be >= 1 (got {self.shard_sequences})")
        if self.shuffle_window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1 (got {self.shuffle_window})")

    def to_dict(self) -> dict:
        return asdict(self)
