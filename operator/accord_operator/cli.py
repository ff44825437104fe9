"""accord-operator: the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from accord_operator import __version__
from accord_operator.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accord-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reconcile Accord resources on the current kubeconfig")
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: ACCORD_NAMESPACES or all)",
    )
    run.add_argument(
        "--metrics-port", type=int, help="port of /metrics and /healthz (default 8080)"
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"accord-operator: {exc}", file=sys.stderr)
        return 2
    overrides: dict[str, object] = {}
    if args.namespace:
        overrides["namespaces"] = tuple(args.namespace)
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if overrides:
        import dataclasses

        settings = dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from accord_operator.runtime import run as run_operator

    # kopf handles SIGINT/SIGTERM itself and returns; Ctrl-C before it starts lands here.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_operator(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
