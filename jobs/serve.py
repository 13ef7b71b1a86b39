"""Serve a model over OpenAI's API with Ray Serve, until Ctrl-C.

    python jobs/serve.py --checkpoint runs/demo [--draft PATH] [--config FILE] [--host H] [--port P]
                         [--ingress haproxy|proxy] [--set serve.key=value ...] [--smoke-request]

PATH is anything the engine loads: a Hugging Face Mixtral directory, a `moray convert`
output, or a training run / checkpoint. With no RAY_ADDRESS a local Ray cluster is
started for this process; with one, the app is deployed there (a Ray 2.60 cluster started
by `ray start` wants RAY_AUTH_MODE=token and the token file it wrote). Listens on
127.0.0.1:8000 unless told otherwise (serve.host / serve.port, or --host / --port).

--ingress: what answers HTTP in front of the ingress replicas of the local cluster this starts
(moray/serve/cluster_env.py): "haproxy" (the default; HAProxy forwards each request straight to
the ingress replica, ~9 ms less to the first token on 2 cores than Serve's own proxy) or
"proxy" (Serve's Python proxy). A cluster named by RAY_ADDRESS has its own setting
(RAY_SERVE_ENABLE_HA_PROXY in its environment).

API keys: MORAY_API_KEYS (comma-separated) in the environment of the cluster's processes
(here, this one's) or serve.api_keys_file; with none set, the endpoint is open.
--smoke-request answers one completion and one chat through the `openai` client, then stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path

from moray.serve.cluster_env import INGRESS_MODES, apply, serve_env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the model: an HF dir, a moray dir, or a run / checkpoint")
    p.add_argument("--draft", help="a draft model for speculative decoding (same tokenizer)")
    p.add_argument("--config", help="a moray YAML whose serve section is used (default: the built-in defaults)")
    p.add_argument("--host", help="address to listen on (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default serve.port, 8000)")
    p.add_argument("--ingress", choices=INGRESS_MODES, default="haproxy",
                   help="HTTP in front of the ingress replicas of the local cluster (default haproxy)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set serve.max_num_seqs=16")
    p.add_argument("--smoke-request", action="store_true", help="answer one request through the openai client, "
                                                                "then stop")
    return p.parse_args(argv)


def _example(url: str, model: str) -> str:
    return (f"  from openai import OpenAI\n"
            f"  client = OpenAI(base_url=\"{url}/v1\", api_key=\"your key, or anything if none is set\")\n"
            f"  client.completions.create(model=\"{model}\", prompt=\"def \", max_tokens=32).choices[0].text\n"
            f"  client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": "
            f"\"hi\"}}])")


def smoke_request(url: str, model: str) -> None:
    from openai import OpenAI

    key = (os.environ.get("MORAY_API_KEYS") or "unused").split(",")[0].strip()
    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2)
    out = client.completions.create(model=model, prompt="def ", max_tokens=48, temperature=0)
    print(f"completion ({out.usage.completion_tokens} tokens, {out.choices[0].finish_reason}): "
          f"def {out.choices[0].text!r}")
    chat = client.chat.completions.create(model=model, max_tokens=32, temperature=0,
                                          messages=[{"role": "user", "content": "What does a moray eat?"}])
    print(f"chat: {chat.choices[0].message.content!r}")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    # A SIGTERM (a supervisor, `kill`) stops the server as Ctrl-C does: Serve and the local cluster
    # are shut down below, HAProxy included (it runs in a session of its own and would outlive us).
    signal.signal(signal.SIGTERM, _interrupt)
    from moray.platform.config import ConfigError, load_config

    overrides = list(args.overrides)
    overrides += [f"serve.host={args.host}"] if args.host else []
    overrides += [f"serve.port={args.port}"] if args.port else []
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if "://" not in args.checkpoint and not Path(args.checkpoint).exists():
        print(f"error: --checkpoint {args.checkpoint}: no such directory (train one with `make demo`, or point at an "
              f"HF / moray model directory)", file=sys.stderr)
        return 1
    checkpoint = args.checkpoint if "://" in args.checkpoint else str(Path(args.checkpoint).resolve())

    import ray
    from ray import serve

    from moray.platform.cluster import connect
    from moray.serve.app import AppArgs, build_app

    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        print(f"deploying onto {address}; its HTTP ingress is the cluster's own setting (--ingress applies to a "
              f"local cluster only)", flush=True)
    else:
        apply(serve_env(args.ingress))  # before ray.init: the local cluster's processes inherit it
    try:
        # "local": a cluster of this process's own, even when some other Ray runs on the machine.
        connect(address or "local")
        host, port = cfg.serve.host, cfg.serve.port
        serve.start(http_options={"host": host, "port": port})
        app = build_app(AppArgs(checkpoint=checkpoint, draft=args.draft, config=args.config, overrides=overrides))
        serve.run(app, name="moray", route_prefix="/")
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        front = "" if address else f", HTTP front: {args.ingress}"
        print(f"serving {args.checkpoint} as {cfg.serve.model_name!r} at {url}/v1 "
              f"(/health, /metrics, /docs{front}); with the openai client:\n{_example(url, cfg.serve.model_name)}",
              flush=True)
        if args.smoke_request:
            smoke_request(url, cfg.serve.model_name)
            return 0
        print("Ctrl-C stops it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # noqa: BLE001 - a failed deployment: say why in one line
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        if ray.is_initialized():  # (serve.shutdown would start a cluster to find nothing there)
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
