"""`tidar-export serve`: the OpenAI-compatible HTTP server over an artifact (docs/SERVING.md).

Parsing and printing only: the engine is tidar_runtime.engine, the HTTP app tidar_runtime.server.
Torch is imported only with `--backend torch`.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from tidar_export.errors import TiDARError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args) -> int:
    from tidar_runtime.chat import artifact_chat
    from tidar_runtime.engine import open_engine
    from tidar_runtime.server import Limits, bind, create_app, make_server  # fastapi, uvicorn: the `serve` extra

    if args.max_queue < 0:
        raise TiDARError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.drain_timeout <= 3600:
        raise TiDARError(f"--drain-timeout must lie in 0..3600 seconds, got {args.drain_timeout}")
    if not 1024 <= args.max_body_bytes <= 1 << 30:
        raise TiDARError(f"--max-body-bytes must lie in 1024..{1 << 30}, got {args.max_body_bytes}")
    if not 0 <= args.port <= 65535:
        raise TiDARError(f"--port must lie in 0..65535, got {args.port}")
    if args.checkpoint is not None and args.backend != "torch":
        raise TiDARError("--checkpoint is read only by --backend torch (the other backends run the artifact)")
    sock = bind(args.host, args.port)  # before loading: a taken port fails fast
    kwargs = {"checkpoint": args.checkpoint} if args.backend == "torch" else {}
    try:
        engine = open_engine(args.artifact, args.backend, args.mode, args.max_queue, **kwargs)
    except BaseException:
        sock.close()
        raise
    name = args.model_name or Path(args.artifact).resolve().name
    try:
        chat = artifact_chat(args.artifact, engine.tokenizer)  # None without one: chat requests answer 400
    except BaseException:
        engine.close()
        sock.close()
        raise
    app = create_app(engine, name, chat=chat, limits=Limits(max_body_bytes=args.max_body_bytes,
                                                                     drain_timeout_s=args.drain_timeout))
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}, not loopback: anyone who can reach it can use it", file=sys.stderr)
    print(f"serving {name!r} ({args.mode}/{args.backend}, batch {engine.max_batch}, queue {args.max_queue}"
          f"{', chat' if chat is not None else ''}) on http://{where}:{port}/v1", file=sys.stderr, flush=True)
    # uvicorn drains on SIGINT/SIGTERM (make_server), then raises the signal again: the CLI's one
    # line and exit status 130 / 143
    try:
        make_server(app, args.log_level).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    print("stopped", file=sys.stderr)
    return 0


def register(sub) -> None:
    from tidar_runtime.backends.select import BACKENDS

    p = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API (in-flight batching)")
    p.add_argument("artifact", help="artifact directory written by `tidar-export export`")
    p.add_argument("--backend", default="ort", help=f"{' | '.join(BACKENDS)} (default: ort)")
    p.add_argument("--checkpoint", help="--backend torch: the checkpoint the artifact was exported from")
    p.add_argument("--mode", choices=["tidar", "ar"], default="tidar",
                   help="tidar: draft and verify in one pass (default); ar: one token per pass")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stderr)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a batch row; more are refused with 503 (default: 64)")
    p.add_argument("--model-name", help="the model id of /v1/models (default: the artifact folder's name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C: seconds the requests in flight may finish in before their streams "
                        "are ended with finish_reason abort (default: 30)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body; larger ones get 413 unread (default: 1 MiB)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: warning)")
    p.set_defaults(func=run_serve)
