"""`moray route`: one address in front of moray Serve endpoints in several regions.

    moray route --config regions.yaml [--host H] [--port P]

regions.yaml names the router's own region and the regions (configs/regions-example.yaml);
the router (moray/serve/router/) sends each request to a healthy region near the client
with room to spare, fails over when one goes away, and resumes streams cut mid-way. Runs
until Ctrl-C. Imports no torch and no Ray.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from moray.platform.config import ConfigError

# "The request is wrong" (cli.py prints these as one line, exit 2): a bad regions file, a key file or
# environment variable that is missing, a port that is taken.
USER_ERRORS = (ConfigError, ValueError, OSError)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "route", help="multi-region router: one address in front of serving clusters in several regions",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the regions file (router: and regions:)")
    p.add_argument("--host", help="address to listen on (default router.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default router.port, 8080)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's and the router's log level (default warning: breaker changes and errors)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import logging
    import socket

    import uvicorn

    from moray.serve.router.app import build_router
    from moray.serve.router.config import load_regions

    cfg = load_regions(args.config)
    host = args.host or cfg.router.host
    port = args.port or cfg.router.port
    app = build_router(cfg)  # reads the keys and the upstream keys' variables: a missing one fails here
    with socket.socket() as s:  # a taken port is a one-line error, not uvicorn's traceback and exit 1
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    regions = ", ".join(f"{r.name} ({r.url})" for r in cfg.regions)
    print(f"routing http://{host}:{port}/v1 to {regions}; own region {cfg.router.region}; "
          f"GET /regions for the table. Ctrl-C stops it.", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=args.log_level, access_log=False)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`moray route ...` without the rest of the CLI (same errors, same exit codes)."""
    parser = argparse.ArgumentParser(prog="moray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"moray route: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
