"""``tasker serve`` (the HTTP API) and ``tasker api openapi|docs`` (its OpenAPI document)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from tasker.cli_args import int_range, tcp_port

__all__ = ["add_serve_commands"]


def add_serve_commands(commands: Any) -> None:
    """Add ``serve`` and ``api`` to the CLI's subcommands."""
    serve = commands.add_parser(
        "serve",
        help="run the HTTP API (tasks, steps, templates, DLQ, health, metrics)",
        description="Serves the HTTP API with uvicorn until SIGTERM or SIGINT (then it finishes "
        "the requests in flight): /v1/tasks, /v1/templates, /v1/dlq, /health, /health/live, "
        "/health/ready, /metrics, and the OpenAPI document at /api-docs/openapi.json with its "
        "UI at /api-docs. Authentication ([api.auth]) is off in development and on in "
        "production, where the API refuses to start without an API key or a JWT setting. "
        "See docs/api.md.",
    )
    serve.add_argument(
        "--host", default=None, help="address to listen on (default: api.host, 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=tcp_port, default=None, help="port (default: api.port, 8080; 0: any free)"
    )
    serve.add_argument(
        "--threads",
        type=int_range(1, 1000),
        default=None,
        help="requests served at once (default: api.threads, 40)",
    )
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (uvicorn's access log)"
    )
    serve.set_defaults(handler=_cmd_serve)

    api = commands.add_parser("api", help="the HTTP API's OpenAPI document and reference")
    sub = api.add_subparsers(title="api commands", metavar="COMMAND", required=True)
    openapi = sub.add_parser(
        "openapi", help="print the OpenAPI 3.1 document (JSON) that `tasker serve` serves"
    )
    openapi.add_argument("--output", type=Path, help="write it to this file instead")
    openapi.set_defaults(handler=_cmd_openapi)
    docs = sub.add_parser(
        "docs",
        help="write the API reference (Markdown) generated from the OpenAPI document",
        description="Renders docs/api.md's reference section from the OpenAPI document: the "
        "text between the markers <!-- api-reference:start --> and <!-- api-reference:end --> "
        "is replaced; the rest of the file is kept.",
    )
    docs.add_argument(
        "--output", type=Path, default=Path("docs/api.md"), help="the file (default docs/api.md)"
    )
    docs.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 if the file is not up to date (for CI)",
    )
    docs.set_defaults(handler=_cmd_api_docs)


def _cmd_serve(args: argparse.Namespace) -> int:
    import msgspec
    import uvicorn

    from tasker import __version__
    from tasker.api.app import create_app
    from tasker.runtime.sentry import init_sentry
    from tasker.settings import load_settings

    settings = load_settings()
    overrides = {
        key: value
        for key, value in (("host", args.host), ("port", args.port), ("threads", args.threads))
        if value is not None
    }
    settings = msgspec.structs.replace(
        settings, api=msgspec.structs.replace(settings.api, **overrides)
    )
    init_sentry(settings, component="api")
    app = create_app(settings)  # refuses auth settings that do not hold, before listening
    sock = _listen(settings.api.host, settings.api.port)
    host, port = sock.getsockname()[:2]
    auth = app.state.context.authenticator.describe()
    if settings.env == "production" and not auth["enabled"]:
        logging.getLogger("tasker.api").warning(
            "Authentication is off in production (api.auth.enabled = false): every request "
            "may do everything; only run this behind a gateway that authenticates."
        )
    print(
        f"tasker api {__version__} ({settings.env}): http://{host}:{port} "
        f"(auth {'on' if auth['enabled'] else 'off'}; docs http://{host}:{port}/api-docs)",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
        server_header=False,
        timeout_graceful_shutdown=30,
        lifespan="on",
    )
    # uvicorn stops on SIGTERM, then raises it again for the handler found before it: a no-op
    # here, so a graceful stop exits 0 (as `tasker worker` and `tasker coordinator` do)
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; :class:`~tasker.exceptions.ConfigurationError`
    naming the fix when the port is taken or the address is not this machine's."""
    from tasker.health_http import listen_error

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise listen_error(
            exc,
            port,
            who="tasker serve",
            fix="pass --port with a free port (0: any free one) or --host with an address of "
            "this machine, or set api.port / api.host (TASKER_API__PORT, TASKER_API__HOST).",
        ) from None
    sock.set_inheritable(True)
    return sock


def _cmd_openapi(args: argparse.Namespace) -> int:
    from tasker.api.app import openapi_document

    text = json.dumps(openapi_document(), indent=2, sort_keys=False) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


def _cmd_api_docs(args: argparse.Namespace) -> int:
    from tasker.api.app import openapi_document
    from tasker.api.reference import render_reference, updated_document

    path: Path = args.output
    if args.check and not path.exists():
        print(f"{path} does not exist: run `tasker api docs --output {path}`.")
        return 1
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    wanted = updated_document(current, render_reference(openapi_document()))
    if args.check:
        if wanted != current:
            print(f"{path} is not up to date: run `tasker api docs --output {path}`.")
            return 1
        print(f"{path} is up to date.")
        return 0
    if wanted != current:
        path.write_text(wanted, encoding="utf-8")
        print(f"wrote {path}")
    else:
        print(f"{path} is up to date.")
    return 0
