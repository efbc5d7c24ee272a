"""Soak: 5,000 greedy tokens at the minimum budget on the embedded model, then 200 chat
turns through the app; resident memory, open files and threads after warm-up, and the
tokens against stock mlx-lm's.

    python scripts/soak.py [--replies 10] [--tokens 500] [--turns 200] [--json]

Passes when resident memory grows under 1 MB per 1,000 tokens after warm-up (least
squares: the engine over samples every 100 tokens after its first reply; the app over
the end of each chat after the first, when the screen holds the same conversation, so
what a chat's content holds while it is open does not count as growth), open files and
threads do not change after warm-up, and the replies equal stock mlx-lm's. Exit status
1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from soak_checks import (
    PROMPTS,
    soak_app,
    soak_engine,
    stock_chat_replies,
    stock_outputs,
)

MAX_SLOPE_MB = 1.0  # per 1,000 tokens
TOKENS_PER_TURN = 8  # the app's replies in the soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=500, help="tokens per reply")
    parser.add_argument("--turns", type=int, default=200, help="chat turns in the app")
    parser.add_argument("--turns-per-chat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report: dict = {}
    ok = True

    start = time.perf_counter()
    soak = soak_engine(args.replies, args.tokens)
    seconds = time.perf_counter() - start
    same = soak.outputs == stock_outputs(args.replies, args.tokens)
    warm = args.tokens  # after the first reply
    slope = soak.rss_slope_mb_per_1000(warm)
    engine = {
        "tokens": sum(len(o) for o in soak.outputs),
        "replies": args.replies,
        "seconds": round(seconds, 1),
        "rss_first_mb": round(soak.samples[0].rss / 1e6, 1),
        "rss_after_warmup_mb": round(soak.after_warmup(warm)[0].rss / 1e6, 1),
        "rss_last_mb": round(soak.samples[-1].rss / 1e6, 1),
        "rss_slope_mb_per_1000_tokens": round(slope, 3),
        "open_files_spread": soak.spread(warm, "fds"),
        "threads_spread": soak.spread(warm, "threads"),
        "open_files": soak.samples[-1].fds,
        "threads": soak.samples[-1].threads,
        "equal_to_stock_mlx_lm": same,
    }
    ok &= slope < MAX_SLOPE_MB and same
    ok &= engine["open_files_spread"] == 0 and engine["threads_spread"] == 0
    report["engine"] = engine

    if args.turns:
        with tempfile.TemporaryDirectory() as tmp:
            from mlx_pager.settings import Settings, save_settings

            settings = Path(tmp) / "settings.toml"
            save_settings(Settings(context_length=4096), settings)
            start = time.perf_counter()
            app_soak, firsts = asyncio.run(
                soak_app(
                    args.turns,
                    args.turns_per_chat,
                    Path(tmp) / "data",
                    settings,
                    max_tokens=TOKENS_PER_TURN,
                )
            )
            seconds = time.perf_counter() - start
            from mlx_pager_app.conversations import conversations_dir, list_conversations

            chats = list_conversations(conversations_dir(Path(tmp) / "data"))
            saved_turns = sum(len(c.messages) // 2 for c in chats)
        replies = stock_chat_replies([p for p, _ in firsts], TOKENS_PER_TURN)
        per_chat = args.turns_per_chat
        ends = app_soak.ends(per_chat)  # the same conversation on screen at each
        # per 1,000 generated tokens: samples are per turn, TOKENS_PER_TURN tokens a turn
        per_token = 1 / TOKENS_PER_TURN
        slope = app_soak.rss_slope_mb_per_1000(per_chat, every=per_chat) * per_token
        # what an open chat holds (its content, by design): resident memory from the
        # chat's lowest to its end, and Python objects a turn
        chats_open = [app_soak.samples[e.tokens - per_chat : e.tokens] for e in ends[1:]]
        chat_mb = [(c[-1].rss - min(x.rss for x in c)) / 1e6 for c in chats_open]
        turn_objects = [(c[-1].objects - c[0].objects) / (per_chat - 1) for c in chats_open]
        app = {
            "turns": args.turns,
            "seconds": round(seconds, 1),
            "rss_chat_ends_mb": [round(e.rss / 1e6, 1) for e in ends],
            "python_objects_chat_ends": [e.objects for e in ends],
            # (widgets, render caches) alive at each chat's end though their chat is gone
            "kept_from_chats_gone": [[w, c] for _, w, c in app_soak.kept],
            "rss_slope_mb_per_1000_tokens": round(slope, 3),
            "rss_slope_every_turn_mb_per_1000_tokens": round(
                app_soak.rss_slope_mb_per_1000(per_chat) * per_token, 3
            ),
            "rss_of_an_open_chat_mb": round(float(np.mean(chat_mb)), 1),
            "python_objects_per_turn_of_an_open_chat": round(float(np.mean(turn_objects))),
            "open_files_spread": app_soak.spread(per_chat, "fds"),
            "threads_spread": app_soak.spread(per_chat, "threads"),
            "open_files": app_soak.samples[-1].fds,
            "threads": app_soak.samples[-1].threads,
            "conversations_saved": len(chats),
            "turns_saved": saved_turns,
            "first_replies_equal_to_stock": [r for _, r in firsts] == replies,
            "samples": "turn, resident MB, Python objects, open files, threads",
            "per_turn": [
                [x.tokens, round(x.rss / 1e6, 2), x.objects, x.fds, x.threads]
                for x in app_soak.samples
            ],
        }
        ok &= app["first_replies_equal_to_stock"] and saved_turns == args.turns
        ok &= app["open_files_spread"] == 0 and app["threads_spread"] == 0
        ok &= slope < MAX_SLOPE_MB and all(w == c == 0 for _, w, c in app_soak.kept)
        report["app"] = app
    report["passed"] = bool(ok)
    report["prompts"] = len(PROMPTS)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for part, figures in report.items():
            if isinstance(figures, dict):
                figures = {k: v for k, v in figures.items() if k not in ("samples", "per_turn")}
            print(f"{part}: {figures}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
