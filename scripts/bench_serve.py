"""Time to first token of a conversation's second turn on `mlx-pager serve`, with mlx-lm's
prompt cache and without it.

Each conversation opens with a long document (calibration texts from assets/prompts) and
a question, gets a reply, then asks a short follow-up: with the prompt cache, the server
reads only the follow-up's new tokens; without it (--prompt-cache-size 0), the whole
history again. The server runs in this process on a loopback port; the client is the
real `openai` one, streaming (time to the first chunk that carries text or a finish).

    .venv/bin/python scripts/bench_serve.py [--model ID_OR_PATH] [--budget 2GB]
        [--doc-tokens 800] [--conversations 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import openai

from mlx_pager.cli import build_parser
from mlx_pager.engine import Engine, default_model
from mlx_pager.serve.server import PagedServer
from mlx_pager.settings import Settings

CALIBRATION = Path(default_model()).parent / "prompts" / "calibration.jsonl"


def documents(tokenizer, count: int, tokens: int) -> list[str]:
    """``count`` documents of about ``tokens`` tokens each, none sharing a prefix."""
    texts = [json.loads(line)["text"] for line in CALIBRATION.read_text().splitlines()]
    docs, i = [], 0
    for _ in range(count):
        parts: list[str] = []
        while len(tokenizer.encode("\n\n".join(parts))) < tokens:
            parts.append(texts[i % len(texts)])
            i += 1
        docs.append("\n\n".join(parts))
    return docs


def timed_turn(client, messages, max_tokens: int) -> tuple[float, str, int]:
    """Seconds to the first streamed chunk, the reply, and the prompt tokens it reused."""
    start = time.perf_counter()
    first, text, cached = None, [], 0
    stream = client.chat.completions.create(
        model="default_model",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter() - start
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage and chunk.usage.prompt_tokens_details:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
    return first or 0.0, "".join(text), cached


def run_conversations(engine, docs, cache_size: int, reply_tokens: int) -> list[dict]:
    args = build_parser().parse_args(
        ["serve", "--port", "0", "--prompt-cache-size", str(cache_size)]
    )
    server = PagedServer(engine, args).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    rows = []
    try:
        timed_turn(client, [{"role": "user", "content": "Hello."}], 4)  # warm up
        for doc in docs:
            history = [{"role": "user", "content": f"{doc}\n\nWhat is this text about?"}]
            ttft1, reply, _ = timed_turn(client, history, reply_tokens)
            history += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "Say more about the first part."},
            ]
            ttft2, _, cached = timed_turn(client, history, reply_tokens)
            rows.append({"ttft_first": ttft1, "ttft_second": ttft2, "cached_tokens": cached})
    finally:
        server.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the embedded tiny model")
    parser.add_argument("--budget", default="2GB")
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--doc-tokens", type=int, default=800)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    settings = Settings(context_length=args.context_length)
    engine = Engine.open(args.model or default_model(), settings, budget=args.budget)
    try:
        docs = documents(engine.tokenizer, args.conversations, args.doc_tokens)
        result = {}
        for label, size in (("with prompt cache", 10), ("without prompt cache", 0)):
            rows = run_conversations(engine, docs, size, args.reply_tokens)
            result[label] = rows
            first = statistics.median(r["ttft_first"] for r in rows)
            second = statistics.median(r["ttft_second"] for r in rows)
            cached = statistics.median(r["cached_tokens"] for r in rows)
            print(
                f"{label:22} turn 1 TTFT {first * 1000:7.1f} ms | turn 2 TTFT "
                f"{second * 1000:7.1f} ms | turn 2 reused {cached:.0f} prompt tokens "
                f"(median of {len(rows)})"
            )
    finally:
        engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
