"""API keys: `Authorization: Bearer <key>` on every /v1 route once any key is set.

Keys come from MORAY_API_KEYS (comma-separated) in the environment of the process
that serves HTTP (the ingress replica: set it where Ray runs, e.g. from a Kubernetes
Secret in the RayService's pod template) and from the file `serve.api_keys_file` (one
key per line, `#` comments). Neither travels through Ray: the ingress reads them
itself, so they are not in the Serve config, the dashboard or any log.

Only SHA-256 digests are kept; an offered key is hashed and compared with every
digest by `hmac.compare_digest` (constant time, and no early exit on the first match),
so neither timing nor a memory dump gives a key away. `/health` and `/metrics` stay
open: load balancers and Prometheus probe them without a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Iterable, List, Optional

from moray.serve.openai.errors import APIError

ENV_VAR = "MORAY_API_KEYS"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class APIKeys:
    def __init__(self, keys: Iterable[str]):
        self._digests: List[bytes] = [_digest(k) for k in {k.strip() for k in keys} if k]

    @classmethod
    def load(cls, keys_file: Optional[str] = None, environ=os.environ) -> "APIKeys":
        keys = [k for k in environ.get(ENV_VAR, "").split(",")]
        if keys_file:
            path = Path(keys_file)
            if not path.is_file():
                raise ValueError(f"serve.api_keys_file {keys_file}: no such file; write one API key per line there, "
                                 f"or leave the key out and set {ENV_VAR}")
            keys += [line.split("#", 1)[0] for line in path.read_text().splitlines()]
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never the keys, nor their digests
        return f"APIKeys({len(self)} keys)"

    def accepts(self, key: str) -> bool:
        offered = _digest(key)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(offered, d)
        return ok

    def check(self, key: Optional[str]) -> None:
        """401 unless `key` (the bearer token offered, None when there was none) is one of the keys."""
        if not self.enabled:
            return
        if not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not self.accepts(key):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
