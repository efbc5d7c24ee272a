"""`mlx-pager generate`: stream a reply, end with one line of stats (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys

from ..paging.policies import POLICIES
from ..settings import CONTEXT_RANGE, PAGE_CACHE_MODES, READ_PATHS, ROUTE_MARGIN_RANGE
from .ranges import (
    MAX_TOKENS_ARG,
    SEED_ARG,
    TEMP_ARG,
    TOP_P_ARG,
    byte_size,
    open_engine,
    real,
    whole,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="Hub id (in the local cache) or folder; default: "
        "the last used model, else the embedded tiny model",
    )
    parser.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads stdin)")
    parser.add_argument("--max-tokens", "-m", type=MAX_TOKENS_ARG, default=100)
    parser.add_argument("--temp", type=TEMP_ARG, default=0.0, help="0 is greedy (0 to 100)")
    parser.add_argument("--top-p", type=TOP_P_ARG, default=1.0, help="above 0, up to 1")
    parser.add_argument("--seed", type=SEED_ARG, default=None)
    parser.add_argument(
        "--budget", type=byte_size, help="memory budget, e.g. 6GB (default: settings)"
    )
    parser.add_argument(
        "--context-length", type=whole(*CONTEXT_RANGE), help="tokens the KV cache is sized for"
    )
    parser.add_argument(
        "--policy", choices=list(POLICIES), help="expert cache policy (default: settings)"
    )
    parser.add_argument("--read-path", choices=READ_PATHS)
    parser.add_argument(
        "--page-cache",
        choices=PAGE_CACHE_MODES,
        help="drop an expert's pages once copied (default) or keep them cached by the OS",
    )
    parser.add_argument(
        "--route-margin",
        type=real(*ROUTE_MARGIN_RANGE),
        help="cache-aware routing (lossy, opt-in): 0 is exact routing, up to 1",
    )
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument("--record-trace", metavar="FILE", help="save the routing as a trace")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = open_engine(args)
    recorder = None
    if args.record_trace:
        from ..sim.trace import attach_recorder

        recorder = attach_recorder(engine, prompt)
    if not engine.info.paged and not args.json:
        print("[no routed experts: running fully resident]", file=sys.stderr)
    text, tokens = [], []
    try:
        for chunk in engine.generate(
            prompt,
            max_tokens=args.max_tokens,
            temp=args.temp,
            top_p=args.top_p,
            seed=args.seed,
            chat_template=not args.ignore_chat_template,
        ):
            text.append(chunk.text)
            tokens.append(chunk.token)
            if not args.json:
                print(chunk.text, end="", flush=True)
    finally:
        engine.close()
    if recorder is not None:
        recorder.save(args.record_trace)
    stats = engine.stats
    if args.json:
        out = {"text": "".join(text), "tokens": tokens, "paged": engine.info.paged}
        print(json.dumps({**out, "stats": stats.to_dict()}))
    else:
        print()
        print("=" * 10, file=sys.stderr)
        print(stats.summary(), file=sys.stderr)
    return 0
