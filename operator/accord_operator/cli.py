"""accord-operator: the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import sys

from accord_operator import __version__
from accord_operator.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accord-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reconcile Accord resources and serve the injection webhook")
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
    run.add_argument(
        "--webhook-port", type=int, help="port of the injection webhook (default 9443)"
    )
    only = run.add_mutually_exclusive_group()
    only.add_argument(
        "--webhook-only",
        action="store_true",
        help="serve the admission webhook only (safe to run as several replicas)",
    )
    only.add_argument(
        "--controller-only", action="store_true", help="run the reconcilers only (run exactly one)"
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    inject = sub.add_parser(
        "inject", help="print manifests with the sidecar injected (like kube-inject)"
    )
    inject.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    inject.add_argument(
        "--native",
        choices=["true", "false"],
        default="true",
        help="inject as a native sidecar (Kubernetes >= 1.29; default true)",
    )
    uninstall = sub.add_parser(
        "uninstall",
        help="delete every Accord resource and wait for the controller to finalize them "
        "(the chart's pre-delete hook)",
    )
    uninstall.add_argument(
        "-n", "--namespace", action="append", default=[],
        help="only this namespace (repeatable; default: ACCORD_NAMESPACES or all)",
    )  # fmt: skip
    uninstall.add_argument(
        "--timeout", type=float, default=120.0,
        help="seconds to wait before removing the finalizers of what is left (default 120)",
    )  # fmt: skip
    sub.add_parser("version", help="print the version")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides: dict[str, object] = {}
    if getattr(args, "namespace", None):
        overrides["namespaces"] = tuple(args.namespace)
    if getattr(args, "metrics_port", None) is not None:
        overrides["metrics_port"] = args.metrics_port
    if getattr(args, "webhook_port", None) is not None:
        overrides["webhook_port"] = args.webhook_port
    return dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]


def _inject(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    from accord_operator.injector.config import AnnotationError
    from accord_operator.injector.manual import inject_documents
    from accord_operator.injector.patch import Injector

    text = sys.stdin.read() if args.filename == "-" else open(args.filename).read()  # noqa: SIM115
    injector = Injector(
        image=settings.sidecar_image,
        version=__version__,
        nats_url=settings.nats_url,
        native_by_default=args.native == "true",
        broker_env=settings.broker_env,
    )
    try:
        docs = inject_documents([d for d in yaml.safe_load_all(text) if d is not None], injector)
    except AnnotationError as exc:
        print(f"accord-operator inject: {exc}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


async def _uninstall(settings: Settings, timeout: float) -> int:
    from accord_operator.kubeapi import KubeApi
    from accord_operator.uninstall import uninstall

    api = KubeApi()
    try:
        leftovers = await uninstall(api, settings.namespaces, timeout)
    finally:
        await api.close()
    print(f"accord-operator uninstall: done; {len(leftovers)} finalizer(s) removed by force")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"accord-operator: {exc}", file=sys.stderr)
        return 2
    if args.command == "inject":
        return _inject(args, settings)

    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "uninstall":
        return asyncio.run(_uninstall(settings, args.timeout))
    from accord_operator.runtime import Mode
    from accord_operator.runtime import run as run_operator

    mode = (
        Mode.WEBHOOK if args.webhook_only else Mode.CONTROLLER if args.controller_only else Mode.ALL
    )
    from accord_operator.leader import LeadershipLost

    # kopf handles SIGINT/SIGTERM itself and returns; Ctrl-C before it starts lands here.
    with contextlib.suppress(KeyboardInterrupt):
        try:
            # uvloop's TLS is native code: a burst of webhook connections costs a fraction
            # of asyncio's pure-Python handshakes.
            import uvloop
        except ImportError:
            uvloop = None
        try:
            (uvloop.run if uvloop else asyncio.run)(run_operator(settings, mode))
        except LeadershipLost as exc:
            logging.getLogger("accord.operator").error("leadership lost (%s): exiting", exc)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
