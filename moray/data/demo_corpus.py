"""The demo corpus: made from what every Python installation ships, no download.

code = a deterministic subset of the standard library's .py files;
text = the English prose of `pydoc_data.topics` plus the docstrings of other
standard-library modules (not those in the code subset, so text does not
repeat code). Written as plain files under `<data.dir>/sources/{text,code}`
and then prepared like any other source; mixed as the seed did, text 2
epochs and code 4.

Default sizes (~3 MB code, ~2 MB text, ~5M byte tokens; one pass ~16M tokens)
prepare in seconds and give a tiny model a few hundred steps of fresh data.
Rebuilding is idempotent: files are written only when their content changes,
and a stamp skips the work entirely when nothing that shapes the corpus did.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Callable, Dict, List

from moray.data import storage
from moray.data.config import SourceConfig

DEMO_VERSION = 1
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data", "ensurepip"}


def build_demo_corpus(
    root: str,
    *,
    code_bytes: int = 3_000_000,
    docstring_bytes: int = 1_500_000,
    max_file_bytes: int = 100_000,
    log: Callable[[str], None] = print,
) -> List[SourceConfig]:
    """Write the demo sources under `root` and return their configs (text 2 epochs, code 4)."""
    text_dir, code_dir = storage.join(root, "text"), storage.join(root, "code")
    sources = [
        SourceConfig(name="text", path=text_dir, format="text", epochs=2),
        SourceConfig(name="code", path=code_dir, format="code", epochs=4),
    ]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    stamp_key = {"version": DEMO_VERSION, "python": sys.version, "stdlib": str(stdlib), "code_bytes": code_bytes,
                 "docstring_bytes": docstring_bytes, "max_file_bytes": max_file_bytes}
    stamp_path = storage.join(root, "demo_corpus.json")
    if storage.stat(stamp_path) is not None:
        stamp = json.loads(storage.read_bytes(stamp_path))
        present = len(storage.list_files(text_dir)) + len(storage.list_files(code_dir))
        if stamp.get("key") == stamp_key and stamp.get("files") == present:
            return sources

    files = _stdlib_files(stdlib, max_file_bytes)
    wanted: Dict[str, bytes] = {}  # path under root -> content
    taken = 0
    rest = []
    for rel, path in files:
        if taken < code_bytes:
            data = path.read_bytes()
            wanted[f"code/{rel}"] = data
            taken += len(data)
        else:
            rest.append((rel, path))
    from pydoc_data.topics import topics

    for name in sorted(topics):
        wanted[f"text/topics/{name}.txt"] = topics[name].strip().encode() + b"\n"
    taken = 0
    for rel, path in rest:
        if taken >= docstring_bytes:
            break
        doc = _docstrings(path.read_bytes(), rel)
        if doc:
            wanted[f"text/docstrings/{rel[:-3].replace('/', '.')}.txt"] = doc.encode()
            taken += len(doc)

    written = sum(storage.write_if_changed(storage.join(root, rel), data) for rel, data in wanted.items())
    for folder, prefix in ((text_dir, "text/"), (code_dir, "code/")):
        for entry in storage.list_files(folder):
            if prefix + entry.rel not in wanted:
                storage.delete(storage.join(folder, entry.rel))
    storage.write_atomic(stamp_path, json.dumps({"key": stamp_key, "files": len(wanted)}, indent=1).encode())
    size = sum(len(d) for d in wanted.values())
    log(f"demo corpus: {len(wanted)} files, {size / 1e6:.1f} MB under {root} ({written} written)")
    return sources


def _stdlib_files(stdlib: Path, max_file_bytes: int) -> List[tuple]:
    """Eligible standard-library files, in an order fixed by a hash of their relative path."""
    out = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib).as_posix()
        if SKIP_DIRS.intersection(rel.split("/")[:-1]) or not path.is_file():
            continue
        if 0 < path.stat().st_size <= max_file_bytes:
            out.append((hashlib.blake2b(rel.encode(), digest_size=8).hexdigest(), rel, path))
    return [(rel, path) for _, rel, path in sorted(out)]


def _docstrings(source: bytes, rel: str) -> str:
    """A module's docstrings as prose: one paragraph block per documented object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return ""
    module = rel[:-3].replace("/", ".").removesuffix(".__init__")
    blocks = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                blocks.append(f"{title}\n\n{doc.strip()}\n")
    return "\n\n".join(blocks)
