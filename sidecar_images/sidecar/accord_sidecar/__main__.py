"""accord-sidecar: messaging, retries and metrics for the workload next to it.

Configured only through ACCORD_* environment variables (see accord_sidecar.config), which
the injector writes from the pod's accord.dev/* annotations.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from accord_sidecar import __version__
from accord_sidecar.config import Config, ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accord-sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"accord-sidecar: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from accord_sidecar.server import serve

    try:
        import uvloop  # a faster event loop, when installed (the image has it)
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
