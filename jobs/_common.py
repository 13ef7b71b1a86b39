"""Shared argument handling for the jobs: `--config FILE [--set section.key=value ...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the job runs from Ray's copy of the
# working directory; make the package importable there without an install.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set train.max_steps=50")
    return p


def load(args):
    from moray.platform.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(f"error: {err}")
