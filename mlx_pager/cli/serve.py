"""`mlx-pager serve`: the paged model behind mlx-lm's OpenAI-compatible HTTP server.

Flags are named as `mlx_lm.server` names them where it has them. The server listens on
127.0.0.1 unless told otherwise, and says so when it is told.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..settings import PAGE_CACHE_MODES, READ_PATHS
    from ..units import parse_bytes

    parser.add_argument(
        "--model",
        help="Hub id (in the local cache) or folder; default: "
        "the last used model, else the embedded tiny model",
    )
    parser.add_argument("--budget", help="memory budget, e.g. 8GB (default: settings)")
    parser.add_argument("--context-length", type=int, help="tokens the KV cache is sized for")
    parser.add_argument("--policy", help="expert cache policy (default: settings)")
    parser.add_argument("--read-path", choices=READ_PATHS)
    parser.add_argument(
        "--page-cache",
        choices=PAGE_CACHE_MODES,
        help="drop an expert's pages once copied (default) or keep them cached by the OS",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine)")
    parser.add_argument("--port", type=int, default=8080, help="default: 8080 (0: any free)")
    parser.add_argument(
        "--allowed-origins",
        type=lambda x: x.split(","),
        default="*",
        help="CORS origins, comma-separated (default: *)",
    )
    parser.add_argument("--temp", type=float, default=0.0, help="default temperature")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=512, help="default reply length")
    parser.add_argument(
        "--chat-template-args",
        type=json.loads,
        default="{}",
        help="JSON arguments for apply_chat_template, e.g. '{\"enable_thinking\":false}'",
    )
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument(
        "--prompt-cache-size",
        type=int,
        default=10,
        help="most KV caches of earlier requests kept for reuse (default: 10; 0: none)",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=parse_bytes,
        help="most bytes those may hold (default and ceiling: the budget's KV share)",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=8,
        help="requests that may wait while one is served; more get HTTP 503 (default: 8)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )


def run(args: argparse.Namespace) -> int:
    from ..serve.server import PagedServer, describe, exposure_warning
    from ..serve.state import ServerState, remove_state, write_state
    from .ranges import open_engine

    logging.basicConfig(level=args.log_level, format="%(asctime)s - %(levelname)s - %(message)s")
    if args.max_queued < 0:
        raise ValueError("--max-queued takes 0 or more requests.")
    engine = open_engine(args)
    try:
        server = PagedServer(engine, args)
    except BaseException:
        engine.close()
        raise
    warning = exposure_warning(args.host, server.port)
    if warning:
        print(warning, file=sys.stderr)
    print(describe(server), file=sys.stderr, flush=True)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    write_state(ServerState(os.getpid(), args.host, server.port, engine.info.name))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        remove_state()
        server.close()
        engine.close()
    # Everything is closed and the state file is gone. A request thread still streaming
    # when the signal came can be inside MLX as the interpreter tears down, and MLX's
    # threads then abort the process ("terminate called without an active exception"):
    # leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
