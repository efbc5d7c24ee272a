"""The engine's one API, shared by the CLI and the app: open a model, generate, read stats.

Prompt -> tokens (mlx-lm's tokenizer and chat template) -> ``stream_generate`` over the
paged model (``loader``) -> text chunks, while ``stats`` counts what the cache and the
disk did. Nothing here knows about terminals.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from .assets import embedded_model
from .budget import BudgetPlan
from .paging.loader import PagedModel, load_paged
from .paging.prompt_cache import PromptCache
from .settings import Settings, check_budget, load_settings
from .stats import Stats, current_rss, peak_rss
from .storage.checkpoint import read_config
from .tasks.classifier import TaskClassifier
from .tasks.profiles import TaskProfiles

DEFAULT_MODEL = embedded_model()
# Seconds between reads of the process's peak memory while a reply streams: each read
# opens /proc, too dear for every token of a small model.
MEMORY_EVERY_S = 0.25

Messages = list[dict[str, str]]


@dataclass
class Chunk:
    """One step of a reply: new text (may be empty), its token, why it ended if it did."""

    text: str
    token: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    model_type: str
    moe_layers: int
    experts_per_layer: int
    top_k: int

    @property
    def paged(self) -> bool:
        return self.moe_layers > 0


def default_model() -> str:
    return str(DEFAULT_MODEL)


def ban_tokens(token_ids) -> Callable[[mx.array, mx.array], mx.array]:
    """A logits processor that makes these tokens impossible (an end of text, for a
    benchmark that must generate a fixed count)."""
    banned = mx.array(sorted(token_ids))

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[..., banned] = -mx.inf
        return logits

    return processor


class Engine:
    def __init__(
        self, paged: PagedModel, name: str, context_length: int, task_preload: bool = True
    ):
        self.paged = paged
        self.context_length = context_length
        self.task_preload = task_preload  # the user's switch; the profile decides too
        cache = paged.cache
        self.info = ModelInfo(
            name=name,
            path=paged.path,
            model_type=paged.config.get("model_type", "?"),
            moe_layers=len(cache.map.layer_paths) if cache else 0,
            experts_per_layer=cache.map.num_experts if cache else 0,
            top_k=paged.plan.top_k,
        )
        self._stop = threading.Event()
        self.profiles = (
            TaskProfiles.load(paged.path, self.info.moe_layers, self.info.experts_per_layer)
            if cache
            else None
        )
        # How often each expert fired in earlier sessions: the cold tier's profile with
        # this session's counts (``_profile_cold``).
        self._saved_counts = sum(self.profiles.counts.values()) if self.profiles else 0
        self._classifier: TaskClassifier | None = None
        self._preload: threading.Thread | None = None
        self._preload_cancel = threading.Event()
        self.preload_seconds = 0.0  # how long the last preload took
        self.last_task = ""
        self.learn = True  # add each reply's expert counts to the task profile
        # The conversation's KV cache between replies: a chat resends its history.
        self.prompt_cache = PromptCache(paged.model, context_length)
        self.keep_prompt_cache = True

    @classmethod
    def open(
        cls,
        model: str | None = None,
        settings: Settings | None = None,
        budget: str | int | None = None,
        cache_dir: str | Path | None = None,
        **overrides,
    ) -> Engine:
        """Open a Hub id (from the local cache, or ``cache_dir``) or a folder, under the
        settings' budget.

        ``overrides`` are setting names (context_length, policy, read_path, page_cache,
        route_margin) for this run.
        """
        from .hub.resolve import resolve_model

        settings = (settings or load_settings()).replace(**overrides)
        name = model or settings.last_model or default_model()
        path = resolve_model(name, cache_dir=cache_dir)
        budget_bytes = check_budget(budget) if budget else settings.budget_bytes()
        read_config(path)  # the fields sized from, checked before mlx-lm builds the model
        paged = load_paged(
            path,
            budget_bytes,
            context_length=settings.context_length,
            policy=settings.policy,
            read_path=settings.read_path,
            page_cache=settings.page_cache,
            prefetch=settings.prefetch,
            cold_precision=settings.cold_precision,
            route_margin=settings.route_margin,
        )
        return cls(paged, name, settings.context_length, settings.task_preload)

    @property
    def stats(self) -> Stats:
        return self.paged.stats

    @property
    def plan(self) -> BudgetPlan:
        return self.paged.plan

    @property
    def tokenizer(self):
        return self.paged.tokenizer

    def encode(self, prompt: str | Messages, chat_template: bool = True) -> list[int]:
        """Tokens as `mlx_lm.generate` makes them: chat template when the model has one."""
        tokenizer = self.tokenizer
        use_template = chat_template and tokenizer.has_chat_template
        if use_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        elif isinstance(prompt, str):
            text = prompt
        else:
            text = "\n".join(m["content"] for m in prompt)
        return tokenizer.encode(text, add_special_tokens=not use_template)

    def classify(self, prompt: str | Messages) -> str:
        """The task of a prompt (its last user message), from the calibration prompts."""
        if self._classifier is None:
            try:
                self._classifier = TaskClassifier.default()
            except FileNotFoundError:  # no calibration prompts: the task stays unknown
                return ""
        if not isinstance(prompt, str):
            prompt = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
        return self._classifier.predict(prompt)

    @property
    def preload_status(self) -> str:
        """Whether task-aware preloading is on for this model, and why; for the UI."""
        if self.profiles is None:
            return "off: no routed experts"
        if not self.task_preload:
            return "off: turned off in settings"
        verdict = self.profiles.preload_verdict()
        if verdict is None:
            return "off: not measured for this model yet (mlx-pager profile --measure-preload)"
        pays, why = verdict
        return f"{'on' if pays else 'off'}: {why}"

    @property
    def preload_active(self) -> bool:
        return self.preload_status.startswith("on")

    def prepare(
        self, prompt: str | Messages, preload: bool | None = None, task: str | None = None
    ) -> str:
        """Tell the prompt's task and, when it changed, preload its hot experts in the
        background; the app calls this as soon as it knows the prompt, ``generate`` waits
        for it. ``preload`` overrides the profile's verdict and ``task`` the classifier
        (for measuring them)."""
        task = self.classify(prompt) if task is None else task
        self.stats.task = task
        active = self.preload_active if preload is None else preload
        if active and task != self.last_task and self.profiles is not None:
            hot = self.profiles.hot_set(task, self.paged.cache.slots)
            if hot:
                self.wait_preload()
                self._preload_cancel.clear()
                self._preload = threading.Thread(
                    target=self._run_preload, args=(hot,), name="preload", daemon=True
                )
                self._preload.start()
        self.last_task = task
        return task

    def _run_preload(self, keys: list[tuple[int, int]]) -> None:
        start = time.perf_counter()
        loaded = self.paged.cache.preload(keys, self._preload_cancel)
        self.preload_seconds = time.perf_counter() - start  # the last preload's
        self.paged.run.sync()  # the bytes it read
        with self.stats.lock:
            self.stats.preloaded += loaded

    def wait_preload(self, cancel: bool = False) -> None:
        if self._preload is not None:
            if cancel:
                self._preload_cancel.set()
            self._preload.join()
            self._preload = None

    def generate(
        self,
        prompt: str | Messages,
        max_tokens: int = 256,
        temp: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat_template: bool = True,
        preload: bool | None = None,
        task: str | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[Chunk]:
        """Stream a reply; ``stop()`` from another thread ends it after the current token.

        The reply ends (``finish_reason="length"``) where the context length is reached:
        the budget holds the KV cache of that many tokens and no more. The KV cache is
        kept for the next reply, which feeds only what follows the prefix they share
        (``stats.prompt_reused_tokens``); ``keep_prompt_cache = False`` turns that off.
        ``ignore_eos``: never end early (benchmarks time a fixed number of tokens)."""
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a whole number from 1, not {max_tokens!r}.")
        self._stop.clear()
        asked = time.perf_counter()  # the first token's time counts from here
        if seed is not None:
            mx.random.seed(seed)
        tokens = self.encode(prompt, chat_template)
        if len(tokens) >= self.context_length:
            raise ValueError(
                f"The prompt is {len(tokens)} tokens, longer than the context length "
                f"{self.context_length}: shorten it or raise context_length in settings."
            )
        max_tokens = min(max_tokens, self.context_length - len(tokens))
        if not self.keep_prompt_cache:
            self.prompt_cache.clear()
        kv_cache, reused = self.prompt_cache.take(tokens, max_tokens)
        stats = self.stats
        stats.reset_run()
        stats.prompt_reused_tokens = reused
        cache = self.paged.cache
        if cache is not None:
            cache.reader.refresh()  # a weight file replaced since the last reply: reopen it
            # decode counts start after the tokens fed
            self.paged.run.start(prompt_tokens=len(tokens) - reused)
            task = self.prepare(prompt, preload, task)
            self.wait_preload()  # before the first forward pass writes to the cache
            self._profile_cold()
            counts_before = stats.expert_counts.copy()
        start = time.perf_counter()
        waited = start - asked
        sampler = make_sampler(temp=temp, top_p=top_p)
        generated: list[int] = []
        measured = 0.0  # when the peak memory was last read
        no_eos = [ban_tokens(self.tokenizer.eos_token_ids)] if ignore_eos else None
        try:
            for response in stream_generate(
                self.paged.model,
                self.tokenizer,
                tokens[reused:],
                max_tokens=max_tokens,
                sampler=sampler,
                logits_processors=no_eos,
                prompt_cache=kv_cache,
            ):
                generated.append(int(response.token))
                finish = response.finish_reason
                if self._stop.is_set() and finish is None:
                    finish = "cancelled"
                if finish is not None:
                    self.end_run()  # the last chunk's counts complete
                with stats.lock:
                    stats.kv_used_bytes = sum(c.nbytes for c in kv_cache)
                    if response.generation_tokens == 1:
                        stats.ttft_seconds = time.perf_counter() - asked
                        stats.ttft_wait_seconds = waited
                        stats.ttft_read_seconds = stats.read_seconds
                    self._count_decode()
                    stats.prompt_tokens = response.prompt_tokens
                    stats.prompt_tps = response.prompt_tps
                    stats.generation_tokens = response.generation_tokens
                    stats.decode_tps = response.generation_tps
                now = time.perf_counter()
                if finish is not None or now - measured >= MEMORY_EVERY_S:
                    # The kernel keeps the peak (VmHWM): reading it now and then misses nothing.
                    measured = now
                    with stats.lock:
                        stats.peak_rss_bytes = max(peak_rss(), current_rss())
                        stats.peak_mlx_bytes = mx.get_peak_memory()
                try:
                    yield Chunk(response.text, int(response.token), finish)
                except GeneratorExit:  # the caller stopped reading: what was fed is known
                    self._keep(kv_cache, tokens + generated)
                    raise
                if finish is not None:
                    break
        finally:  # finished, stopped, cut short or failed: every hit counted
            self.end_run()
        self._keep(kv_cache, tokens + generated)
        if cache is not None and self.learn:  # the profiler learns what this task used
            self.profiles.add(task, stats.expert_counts - counts_before)
            self.profiles.save()

    def end_run(self) -> None:
        """A reply ended, however it ended: the hits whose books waited (up to 16 tokens'
        worth, ``ExpertCache.defer_hit``) are counted, decode counts included. ``generate``
        calls it; so does a server that decodes with mlx-lm itself."""
        if self.paged.cache is not None:
            self.paged.run.books_done()
            with self.stats.lock:
                self._count_decode()

    def _count_decode(self) -> None:
        """The reply's decode hits and misses (the caller holds the stats' lock): counted
        from when the prompt's last token was done, not from the first chunk (mlx-lm has run
        the first decode step before it yields the first token)."""
        stats = self.stats
        at_prefill = (self.paged.run.prefill_counts if self.paged.cache else None) or (0, 0)
        stats.decode_hits = stats.hits - at_prefill[0]
        stats.decode_misses = stats.misses - at_prefill[1]

    def begin_run(self, prompt_tokens: int) -> None:
        """Zero the run's counters for a reply that mlx-lm decodes itself (the server's):
        ``prompt_tokens`` are the ones the model will read (the rest was cached)."""
        self.stats.reset_run()
        if self.paged.cache is not None:
            self.paged.cache.reader.refresh()  # a weight file replaced since: reopen it
            self.paged.run.start(prompt_tokens=prompt_tokens)
            self._profile_cold()

    def _profile_cold(self) -> None:
        """The cold tier takes the misses of rarely used experts (cold_tier.unimportant):
        how often each fired, in the saved task profiles and this session so far."""
        if self.paged.cold is not None:
            with self.stats.lock:
                counts = self._saved_counts + self.stats.expert_counts
            self.paged.cold.format.set_profile(counts)

    def note_progress(
        self,
        prompt_tokens: int,
        generation_tokens: int,
        prompt_tps: float,
        decode_tps: float,
        ttft_seconds: float,
        kv_used_bytes: int,
    ) -> None:
        """Record a step of a reply decoded outside ``generate``, as ``generate`` does."""
        stats = self.stats
        with stats.lock:
            self._count_decode()
            stats.prompt_tokens = prompt_tokens
            stats.generation_tokens = generation_tokens
            stats.prompt_tps = prompt_tps
            stats.decode_tps = decode_tps
            if generation_tokens == 1:
                stats.ttft_read_seconds = stats.read_seconds
            stats.ttft_seconds = ttft_seconds
            stats.kv_used_bytes = kv_used_bytes
            stats.peak_rss_bytes = max(peak_rss(), current_rss())
            stats.peak_mlx_bytes = mx.get_peak_memory()

    def _keep(self, kv_cache: list, tokens: list[int]) -> None:
        if self.keep_prompt_cache:
            self.prompt_cache.keep(kv_cache, tokens)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.wait_preload(cancel=True)
        self.prompt_cache.clear()
        self.paged.close()
