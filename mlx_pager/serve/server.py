"""mlx-lm's HTTP server on the paged model: its handler, generator and prompt cache, with
the model from the Engine and the KV cache held to the budget's share.

mlx-lm batches requests whose caches can merge; here each request is served alone, in
arrival order, while the others wait in mlx-lm's queue: the budget reserves the KV cache
of one sequence at the context length, and the expert cache's slots are sized for one
stream (a batch of B sequences routes up to B x top_k experts per layer per step).
mlx-lm's prompt cache (the KV caches of earlier requests, so that a conversation's next
turn reads only its new tokens) shares that reservation: before a request runs, the
prompt cache is trimmed to what the reply's own KV cache (as mlx-lm grows it) leaves of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from queue import Queue
from types import SimpleNamespace

from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.server import (
    APIHandler,
    GenerationContext,
    ModelProvider,
    Response,
    ResponseGenerator,
    get_system_fingerprint,
)

from ..engine import Engine
from ..units import format_bytes

KV_STEP = 256  # mlx-lm's KVCache grows its buffers by this many tokens at a time
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STATS_PATH = "/mlx-pager/stats"

# mlx_lm.server's options that `mlx-pager serve` does not offer, at mlx-lm's defaults.
MLX_LM_DEFAULTS = dict(
    adapter_path=None,
    draft_model=None,
    num_draft_tokens=3,
    trust_remote_code=False,
    chat_template="",
    use_default_chat_template=False,
    decode_concurrency=1,
    prompt_concurrency=1,
    kv_bits=None,
    kv_group_size=64,
    quantized_kv_start=0,
    pipeline=False,
)


def exposure_warning(host: str, port: int) -> str | None:
    """What to tell a user who serves beyond this machine; None for a loopback host."""
    if host in LOCAL_HOSTS:
        return None
    return (
        f"warning: listening on {host}, not only on this machine: anyone who can reach "
        f"port {port} can use the model. mlx-lm's server has only basic security "
        "checks; pass --host 127.0.0.1 to serve this machine alone."
    )


class KVShare:
    """The budget's KV reservation, and what a request of so many tokens takes of it."""

    def __init__(self, kv_bytes: int, context_length: int):
        self.kv_bytes = kv_bytes
        self.context_length = context_length
        self.per_token = kv_bytes / context_length

    def bytes_for(self, tokens: int) -> int:
        """The KV buffers of ``tokens`` tokens, as mlx-lm allocates them (in steps)."""
        return int(self.per_token * -(-tokens // KV_STEP) * KV_STEP)


class BudgetedPromptCache(LRUPromptCache):
    """mlx-lm's prompt cache, inside the KV share with the reply being served.

    A request that continues a cached sequence takes that entry (mlx-lm copies it, and
    drops the original once the longer sequence is stored): one copy of the prefix, not
    two. The reply's KV cache then grows to at most ``reply_bound`` bytes, and the rest
    of the prompt cache is trimmed to what that leaves of the share. ``on_fetch`` learns
    how many prompt tokens are left to read.
    """

    def __init__(self, max_size: int, max_bytes: int, kv: KVShare):
        super().__init__(max_size, min(max_bytes, kv.kv_bytes))
        self.kv = kv
        self.need_tokens = 0  # prompt + max_tokens of the request being served
        self.on_fetch = None

    def fetch_nearest_cache(self, model, tokens):
        found = self._trie.search(model, tokens)
        prefix = found.exact if found.exact is not None else found.shorter
        longer_wins = found.longer is not None and found.common_prefix > len(prefix or ())
        if prefix and not (found.exact is None and longer_wins):
            cache, rest = self._take(found.model, prefix).prompt_cache, tokens[len(prefix) :]
        else:  # nothing, or a longer sequence mlx-lm trims a copy of: its own way
            cache, rest = super().fetch_nearest_cache(model, tokens)
        fresh = self.kv.bytes_for(self.need_tokens)
        bound = self.reply_bound(cache, len(tokens) - len(rest))
        if bound > max(fresh, self.kv.kv_bytes):  # reusing it would outgrow the share
            cache, rest, bound = None, tokens, fresh
        self.trim_to(n_bytes=min(self.max_bytes, self.kv.kv_bytes - bound))
        if self.on_fetch is not None:
            self.on_fetch(len(rest))
        return cache, rest

    def reply_bound(self, cache, cached: int) -> int:
        """The most bytes the reply's KV cache reaches from this cache. mlx-lm's KVCache
        keeps its buffer while it has room, and past it keeps the cached tokens and adds
        whole steps: off a step boundary, that is more than a fresh cache's."""
        fresh = self.kv.bytes_for(self.need_tokens)
        if cache is None:
            return fresh
        held = sum(c.nbytes for c in cache)
        if self.need_tokens * self.kv.per_token <= held:
            return held
        grown = self.kv.per_token * cached + self.kv.bytes_for(self.need_tokens - cached)
        return max(held, int(grown))

    def _take(self, model, tokens):
        """Remove an entry and return it, with the byte counts trim_to keeps."""
        entry = self._trie.pop(model, tokens)
        self._lru.remove(model, tokens)
        self._n_bytes -= entry.nbytes
        self._n_bytes_by_type[entry.cache_type] -= entry.nbytes
        return entry


class RunMeter:
    """Stands in for a request's response queue in mlx-lm's generator: passes everything
    on, and counts the reply into the engine's stats (mlx-lm decodes it, not
    ``Engine.generate``)."""

    def __init__(self, engine: Engine, queue: Queue, prompt_tokens: int, kv: KVShare):
        self.engine, self.queue, self.kv = engine, queue, kv
        self.prompt_tokens = prompt_tokens
        self.read = prompt_tokens  # what the prefill reads; fewer with a cached prefix
        self.start = self.first = time.perf_counter()
        self.tokens = 0
        self.ctx: GenerationContext | None = None

    def begin(self, uncached_tokens: int) -> None:
        self.read = uncached_tokens
        self.engine.begin_run(uncached_tokens)
        self.start = time.perf_counter()

    def put(self, item) -> None:
        if isinstance(item, GenerationContext):
            self.ctx = item
        elif isinstance(item, Response):
            now = time.perf_counter()
            self.tokens += 1
            if self.tokens == 1:
                self.first = now
            ttft = self.first - self.start
            decode = now - self.first
            self.engine.note_progress(
                prompt_tokens=self.read,
                generation_tokens=self.tokens,
                prompt_tps=self.read / ttft if ttft > 0 else 0.0,
                decode_tps=(self.tokens - 1) / decode if decode > 0 else 0.0,
                ttft_seconds=ttft,
                kv_used_bytes=int(self.kv.per_token * (self.prompt_tokens + self.tokens)),
            )
        elif item is None or isinstance(item, Exception):  # mlx-lm's end of a reply, any end
            self.engine.end_run()
        self.queue.put(item)


class PagedModelProvider(ModelProvider):
    """The one model this server serves, opened by mlx-pager under the budget; mlx-lm's
    provider would load (and swap in) any model a request names."""

    def __init__(self, cli_args: argparse.Namespace, engine: Engine):
        cli_args.model = engine.info.name
        super().__init__(cli_args)
        self.engine = engine
        self.model_id = engine.info.name
        path = engine.info.path
        self._names = {"default_model", self.model_id, str(path), str(path.resolve())}
        self.model_key = (self.model_id, None, None)
        self.model = engine.paged.model
        self.tokenizer = engine.tokenizer
        self.processor = None
        self.is_batchable = False  # one reply at a time: see the module docstring

    def unknown_model(self, name: str) -> str | None:
        """Why a request's model cannot be served, or None."""
        if name in self._names:
            return None
        return (
            f"Unknown model {name!r}: this server serves {self.model_id!r} (GET /v1/models). "
            "Set model to that id, or start another `mlx-pager serve --model` for this one."
        )

    def load_default(self) -> None:
        pass  # opened before the server started, so a bad budget fails before it listens

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        problem = self.unknown_model(model_path)
        if problem:
            raise ValueError(problem)
        if adapter_path is not None:
            raise ValueError("This server does not load adapters: leave out 'adapters'.")
        if draft_model_path not in (None, "default_model"):
            raise ValueError("This server has no draft model: leave out 'draft_model'.")
        return self.model, self.tokenizer


class PagedResponseGenerator(ResponseGenerator):
    """mlx-lm's generator, serving one request at a time, with the prompt cache trimmed
    before each reply to what the reply's KV cache leaves of the budget's share."""

    def __init__(
        self, provider: PagedModelProvider, prompt_cache: BudgetedPromptCache, kv: KVShare
    ):
        self.kv = kv
        self.active: RunMeter | None = None
        super().__init__(provider, prompt_cache)

    def _serve_single(self, request, stream):
        rqueue, body, args = request
        engine = self.model_provider.engine
        try:
            prompt = self._tokenize(engine.tokenizer, body, args)[0]
        except Exception as e:
            rqueue.put(e)
            return
        self.prompt_cache.need_tokens = len(prompt) + args.max_tokens
        meter = RunMeter(engine, rqueue, len(prompt), self.kv)
        self.prompt_cache.on_fetch = meter.begin
        self.active = meter
        try:
            super()._serve_single((meter, body, args), stream)
        finally:
            self.active = None
            self.prompt_cache.on_fetch, self.prompt_cache.need_tokens = None, 0

    def cancel_active(self) -> None:
        """Stop the reply being generated (when the server shuts down)."""
        meter = self.active
        if meter is not None and meter.ctx is not None:
            meter.ctx.stop()


class Admission:
    """Counts the requests waiting or running; past the limit, new ones are refused."""

    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self.count = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.count > self.max_queued:  # one runs, max_queued wait
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


def error_body(status: int, message: str) -> dict:
    """An error as OpenAI's API shapes it: clients show ``message`` to their user."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


class OpenAIErrors:
    """The handler's output stream; rewrites mlx-lm's errors, ``{"error": "text"}`` or
    plain text, into OpenAI's shape, which clients read the message from."""

    def __init__(self, stream, handler: PagedAPIHandler):
        self.stream, self.handler = stream, handler

    def write(self, data: bytes) -> int:
        status = self.handler.status
        if status >= 400 and self.handler.headers_done:
            try:
                payload = json.loads(data)
            except ValueError:
                payload = {"error": data.decode(errors="replace")}
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                data = json.dumps(error_body(status, payload["error"])).encode()
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class PagedAPIHandler(APIHandler):
    """mlx-lm's request handler, plus: the model's one id, requests checked against the
    context length and the queue before they are queued, and the paging stats."""

    admission: Admission  # set on the subclass each server makes

    status = 200  # of the response being written
    headers_done = False  # the body is being written

    def setup(self):
        super().setup()
        self.wfile = OpenAIErrors(self.wfile, self)

    def _set_completion_headers(self, status_code: int = 200):
        self.status, self.headers_done = status_code, False
        super()._set_completion_headers(status_code)

    def end_headers(self):
        super().end_headers()
        self.headers_done = True

    @property
    def provider(self) -> PagedModelProvider:
        return self.response_generator.model_provider

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, error_body(status, message))

    def do_GET(self):
        if self.path == STATS_PATH:
            self._send_json(200, self.provider.engine.stats.to_dict())
        else:
            super().do_GET()

    def handle_models_request(self):
        model = {"id": self.provider.model_id, "object": "model", "created": self.created}
        self._send_json(200, {"object": "list", "data": [{**model, "owned_by": "mlx-pager"}]})

    def handle_completion(self, request, stop_words):
        provider = self.provider
        problem = provider.unknown_model(self.requested_model)
        if problem:
            return self._error(404, problem)
        try:
            args = SimpleNamespace(chat_template_kwargs=self.chat_template_kwargs)
            prompt = self.response_generator._tokenize(provider.tokenizer, request, args)[0]
        except Exception as e:
            return self._error(400, f"Could not make a prompt of the request ({e}): fix it.")
        context = provider.engine.context_length
        if len(prompt) >= context:
            return self._error(
                400,
                f"The prompt is {len(prompt)} tokens, longer than the context length "
                f"{context} this server holds the KV cache for: shorten it, or restart "
                "`mlx-pager serve` with a larger --context-length (and a budget that fits it).",
            )
        # As `mlx-pager generate` does: the reply ends where the context is full.
        self.max_tokens = min(self.max_tokens, context - len(prompt))
        if not self.admission.enter():
            kv = self.response_generator.kv
            return self._error(
                503,
                f"Busy: {self.admission.count} requests are running or waiting for the KV "
                f"cache the budget reserves ({format_bytes(kv.kv_bytes)} for {context} "
                "tokens, one reply at a time). Retry later, or start the server with a "
                "larger --max-queued.",
            )
        try:
            super().handle_completion(request, stop_words)
        except (BrokenPipeError, ConnectionResetError):
            # mlx-lm's handler stopped the generation on its way out (ctx.stop()).
            logging.info("The client went away; its reply was stopped.")
        finally:
            self.admission.leave()

    def log_message(self, format, *args):
        logging.debug(format, *args)


class PagedServer:
    """mlx-lm's HTTP server around an open engine. ``serve_forever`` blocks; ``start``
    serves from a thread (tests, benchmarks); ``close`` stops the threads."""

    def __init__(self, engine: Engine, args: argparse.Namespace):
        for name, value in MLX_LM_DEFAULTS.items():
            if not hasattr(args, name):
                setattr(args, name, value)
        self.engine = engine
        self.kv = KVShare(engine.plan.kv_bytes, engine.context_length)
        share = self.kv.kv_bytes
        cache_bytes = share if args.prompt_cache_bytes is None else args.prompt_cache_bytes
        self.prompt_cache = BudgetedPromptCache(args.prompt_cache_size, cache_bytes, self.kv)
        args.prompt_cache_bytes = self.prompt_cache.max_bytes
        self.provider = PagedModelProvider(args, engine)
        self.generator = PagedResponseGenerator(self.provider, self.prompt_cache, self.kv)
        self.admission = Admission(args.max_queued)
        handler = type("Handler", (PagedAPIHandler,), {"admission": self.admission})
        family, *_, address = socket.getaddrinfo(
            args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        fingerprint = get_system_fingerprint()
        try:
            self.httpd = server_class(
                address[:2],
                lambda *a, **kw: handler(self.generator, *a, system_fingerprint=fingerprint, **kw),
            )
        except OSError as e:
            self.generator.stop_and_join()
            raise OSError(
                f"Cannot listen on {args.host}:{args.port} ({e.strerror or e}): another "
                "server may hold that port; pick another --port (0: any free one)."
            ) from e
        except BaseException:
            self.generator.stop_and_join()
            raise
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        self._serving = True
        self.httpd.serve_forever()

    def start(self) -> PagedServer:
        self._thread = threading.Thread(target=self.serve_forever, name="serve", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._serving:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.generator.cancel_active()
        self.generator.stop_and_join()


def describe(server: PagedServer) -> str:
    """What the server holds, for its first line of output."""
    kv, engine = server.kv, server.engine
    return (
        f"Serving {engine.info.name} at {server.url}/v1 (OpenAI API; paging stats at "
        f"{server.url}{STATS_PATH}). KV cache: {format_bytes(kv.kv_bytes)} for "
        f"{kv.context_length} tokens, prompt cache up to "
        f"{format_bytes(server.prompt_cache.max_bytes)} of it; one reply at a time."
    )
