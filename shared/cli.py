"""The `tunery` command: `up` for the embedded service, and the production pieces."""

import argparse
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence

from sqlalchemy import func, inspect, select

from shared.db import get_engine, session_scope
from shared.keys import create_key
from shared.migrate import upgrade
from shared.models import ApiKey
from shared.settings import get_settings

# Time for the worker to stop at a step boundary, write a checkpoint and hand its job back
# (Docker's stop_grace_period is the same), before it is killed.
STOP_GRACE_S = 120


def migrate_if_empty() -> None:
    """The serving commands set up a new database, but leave upgrades of a live one to
    `tunery migrate`, so that replicas starting together do not race on schema changes."""
    get_settings().home.mkdir(parents=True, exist_ok=True)
    if not inspect(get_engine()).has_table("alembic_version"):
        upgrade()


def _migrate(_args: argparse.Namespace) -> int:
    upgrade()
    print("database is at the newest schema")
    return 0


def _create_key(args: argparse.Namespace) -> int:
    migrate_if_empty()
    with session_scope() as session:
        token = create_key(session, args.name, args.project)
    print(f"API key {args.name!r} for project {args.project!r} (shown only once):")
    print(token)
    return 0


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    migrate_if_empty()
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="info",
        # Off unless asked for: a log line per request costs the hot path a good part of its
        # time, and the Prometheus metrics at /metrics count requests by route and status.
        access_log=args.access_log,
    )
    return 0


# What a worker imports beyond the API's install: the `worker` extra.
TRAINING_PACKAGES = ("torch", "transformers", "accelerate", "peft", "safetensors", "tokenizers")


def missing_training_packages() -> list[str]:
    return [name for name in TRAINING_PACKAGES if importlib.util.find_spec(name) is None]


def _needs_training_packages(command: str) -> int | None:
    """Exit status 2 with one line where the worker extra is not installed (the API's install
    has only the API's packages), else None."""
    missing = missing_training_packages()
    if not missing:
        return None
    print(
        f"tunery {command} trains models and needs the worker extra ({', '.join(missing)} "
        "missing): pip install 'tunery[worker]'",
        file=sys.stderr,
    )
    return 2


def _worker(args: argparse.Namespace) -> int:
    if (status := _needs_training_packages("worker")) is not None:
        return status
    from celery.bin.celery import celery

    from worker.device import refuse_to_start

    if (reason := refuse_to_start(get_settings().device)) is not None:
        print(f"tunery worker: {reason}", file=sys.stderr)
        return 1

    migrate_if_empty()
    # Celery's own entry points drop the worker's exit code; without `standalone_mode` its
    # command returns it: 1 after an unrecoverable error, which a supervisor must see.
    exit_code = celery.main(
        [
            "--app=worker.app",
            "worker",
            "--loglevel=INFO",
            "--concurrency=1",  # one training at a time per GPU
            "--queues=tunery",
            f"--hostname=tunery-{socket.gethostname()}-{os.getpid()}",
            # Neither needs a broadcast channel, which the local queue does not have.
            "--without-mingle",
            "--without-gossip",
        ],
        standalone_mode=False,
    )
    # Celery has stopped its pool and closed the broker connection. The interpreter's own
    # teardown, with torch and transformers loaded, would take seconds more and do nothing a
    # restart needs.
    get_engine().dispose()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code or 0)


def _stop(children: Sequence[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _answers(host: str, port: int) -> bool:
    """Whether the API answers on its port (a wildcard host is asked on loopback)."""
    address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    address = f"[{address}]" if ":" in address else address
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _up(args: argparse.Namespace) -> int:
    if (status := _needs_training_packages("up")) is not None:
        return status
    if _port_taken(args.host, args.port):
        print(
            f"tunery up: port {args.port} on {args.host} is in use; stop what holds it, or "
            "choose another with --port",
            file=sys.stderr,
        )
        return 1
    migrate_if_empty()
    with session_scope() as session:
        if session.scalar(select(func.count()).select_from(ApiKey)) == 0:
            token = create_key(session, "default", "default")
            print("Created an API key for project 'default' (shown only once):")
            print(token, flush=True)
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    command = [sys.executable, "-m", "shared.cli"]
    api = subprocess.Popen([*command, "api", "--host", args.host, "--port", str(args.port)])
    children = [api, subprocess.Popen([*command, "worker"])]

    def running() -> bool:
        return not stopping and all(child.poll() is None for child in children)

    # Up means answering: the port can still be taken between the check above and the bind.
    while running() and not _answers(args.host, args.port):
        time.sleep(0.2)
    if running():
        print(f"Tunery is up on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    while running():
        time.sleep(0.2)
    if not stopping:
        which = "API" if api.poll() is not None else "worker"
        print(f"tunery up: the {which} stopped (see above); stopping the rest", file=sys.stderr)
    _stop(children)
    return 0 if stopping else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunery", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="API and one worker on the embedded defaults")
    api = commands.add_parser("api", help="the HTTP API")
    for serving in (up, api):
        serving.add_argument("--host", default="127.0.0.1")
        serving.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="API processes")
    api.add_argument("--access-log", action="store_true", help="log a line per request")
    commands.add_parser("worker", help="a training worker")
    commands.add_parser("migrate", help="bring the database to the newest schema")
    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key; it is printed on the last line")
    create.add_argument("name")
    create.add_argument("--project", default="default")

    up.set_defaults(run=_up)
    api.set_defaults(run=_api)
    commands.choices["worker"].set_defaults(run=_worker)
    commands.choices["migrate"].set_defaults(run=_migrate)
    create.set_defaults(run=_create_key)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
