"""Soak runs: many replies at the minimum budget, and many chat turns through the app,
watching resident memory, open files and threads; the greedy tokens checked against
stock mlx-lm. scripts/soak.py runs the long version (5,000 tokens, 200 turns) and
prints the figures; tests/test_soak.py a short one.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

PROMPTS = [
    "The history of the printing press",
    "def fibonacci(n):",
    "Photosynthesis converts light into",
    "A mixture of experts model routes each token",
    "The river flooded the valley after",
    "In 1905, Einstein published",
    "import numpy as np\n",
    "The recipe calls for two cups of",
]


@dataclass
class Sample:
    tokens: int  # generated so far (or turns, for the app)
    rss: int
    fds: int
    threads: int
    objects: int  # Python objects the garbage collector tracks


@dataclass
class Soak:
    samples: list[Sample] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    kept: list[tuple[int, int, int]] = field(default_factory=list)  # see kept_from_gone

    def sample(self, tokens: int) -> None:
        gc.collect()
        proc = psutil.Process()
        self.samples.append(
            Sample(tokens, proc.memory_info().rss, open_files(), threading.active_count(),
                   len(gc.get_objects()))
        )  # fmt: skip

    def after_warmup(self, skip: int) -> list[Sample]:
        return [s for s in self.samples if s.tokens >= skip]

    def rss_slope_mb_per_1000(self, skip: int, every: int = 1, what: str = "rss") -> float:
        """Least-squares slope of resident memory (or ``what``) against tokens, after
        warm-up, over the samples at multiples of ``every`` (the app: each chat's end)."""
        kept = [s for s in self.after_warmup(skip) if s.tokens % every == 0]
        x = np.array([s.tokens for s in kept], float)
        y = np.array([getattr(s, what) for s in kept], float) / 1e6
        return float(np.polyfit(x, y, 1)[0] * 1000) if len(kept) > 2 else 0.0

    def ends(self, every: int) -> list[Sample]:
        """The samples at multiples of ``every``: for the app, the end of each chat, when
        the screen holds the same amount of conversation."""
        return [s for s in self.samples if s.tokens and s.tokens % every == 0]

    def spread(self, skip: int, what: str) -> int:
        values = [getattr(s, what) for s in self.after_warmup(skip)]
        return max(values) - min(values) if values else 0


def open_files() -> int:
    fd_dir = Path("/proc/self/fd") if Path("/proc/self/fd").exists() else Path("/dev/fd")
    return len(os.listdir(fd_dir))


def render_objects() -> weakref.WeakSet:
    """The widgets and render caches alive now, which kept_from_gone leaves out: in a
    test process, other tests' apps left theirs (weak: they may still go)."""
    from textual._styles_cache import StylesCache
    from textual.widget import Widget

    gc.collect()
    return weakref.WeakSet(o for o in gc.get_objects() if isinstance(o, Widget | StylesCache))


def kept_from_gone(earlier: weakref.WeakSet | None = None) -> tuple[int, int]:
    """Widgets alive though no screen holds them, and Textual render caches alive though
    their widget is gone, leaving out ``earlier`` (render_objects before the app): both
    0 unless something keeps what a chat showed (a footer recompose kept its old keys;
    an lru_cache on a method kept message widgets' rendered lines). A detached scroll
    bar is its container's, made once and kept."""
    from textual._styles_cache import StylesCache
    from textual.scrollbar import ScrollBar, ScrollBarCorner
    from textual.widget import Widget

    earlier = earlier if earlier is not None else weakref.WeakSet()
    gc.collect()
    objects = [o for o in gc.get_objects() if isinstance(o, Widget | StylesCache)]
    widgets = [o for o in objects if isinstance(o, Widget)]
    owned = {id(w._styles_cache) for w in widgets}
    dead = [w for w in widgets if not w.is_attached and w not in earlier]
    dead = [w for w in dead if not isinstance(w, (ScrollBar, ScrollBarCorner))]
    caches = [c for c in objects if isinstance(c, StylesCache) and c not in earlier]
    return len(dead), sum(id(c) not in owned for c in caches)


async def kept_once_settled(pilot, earlier: weakref.WeakSet, timeout: float = 5.0
                            ) -> tuple[int, int]:  # fmt: skip
    """kept_from_gone once it reads (0, 0) or ``timeout`` has passed: a recompose in
    flight holds the keys it just removed until it is done, a real leak for good."""
    import time

    deadline = time.monotonic() + timeout
    while (kept := kept_from_gone(earlier)) != (0, 0) and time.monotonic() < deadline:
        await pilot.pause(0.1)
    return kept


def min_budget(path: Path, context_length: int) -> int:
    from mlx_pager.paging.loader import inspect_model

    return inspect_model(path, context_length).plan(0).min_budget_bytes


def soak_engine(replies: int, tokens_per_reply: int, context_length: int = 4096) -> Soak:
    """``replies`` greedy replies of exactly ``tokens_per_reply`` tokens each (end of text
    banned) on the embedded model at its minimum budget (top-k slots per step)."""
    from mlx_pager.engine import Engine, default_model
    from mlx_pager.settings import Settings

    path = Path(default_model())
    budget = min_budget(path, context_length)
    engine = Engine.open(str(path), settings=Settings(context_length=context_length),
                         budget=budget)  # fmt: skip
    engine.learn = False  # no profile file written per reply: the soak measures the engine
    soak = Soak()
    done = 0
    try:
        soak.sample(0)
        for i in range(replies):
            prompt = PROMPTS[i % len(PROMPTS)]
            tokens = []
            for chunk in engine.generate(prompt, tokens_per_reply, chat_template=False,
                                         ignore_eos=True):  # fmt: skip
                tokens.append(chunk.token)
                done += 1
                if done % 100 == 0:
                    soak.sample(done)
            soak.outputs.append(tokens)
        soak.sample(done)
        assert engine.plan.slots == engine.plan.top_k, "not the minimum budget"
    finally:
        engine.close()
    return soak


def stock_outputs(replies: int, tokens_per_reply: int) -> list[list[int]]:
    """The same prompts through stock mlx-lm (the engine's CPU cast applied, as the
    exactness tests do), end of text banned likewise."""
    from mlx_lm import load
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_pager.engine import ban_tokens, default_model
    from mlx_pager.paging.loader import cast_floating, default_compute_dtype

    model, tokenizer = load(default_model())
    dtype = default_compute_dtype()
    if dtype is not None:
        model.update(cast_floating(model.parameters(), dtype))
    outputs = []
    for i in range(replies):
        prompt = tokenizer.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=True)
        outputs.append(
            [
                int(r.token)
                for r in stream_generate(
                    model,
                    tokenizer,
                    prompt,
                    max_tokens=tokens_per_reply,
                    sampler=make_sampler(temp=0.0),
                    logits_processors=[ban_tokens(tokenizer.eos_token_ids)],
                )
            ]
        )
    return outputs


async def soak_app(turns: int, turns_per_chat: int, data_dir: Path, settings_path: Path,
                   max_tokens: int = 8) -> tuple[Soak, list[tuple[str, str]]]:  # fmt: skip
    """``turns`` chat turns through the app (Textual Pilot), a new chat every
    ``turns_per_chat``, each chat the same prompts: at each chat's end the screen holds
    the same conversation, so what grows from one end to the next is kept from chats
    gone. Returns the samples (per turn; at each chat's end, ``kept_from_gone``) and
    each chat's first (prompt, reply), for checking against stock mlx-lm."""
    import time

    from mlx_pager_app.main import create_app

    from mlx_pager.engine import default_model
    from mlx_pager.machine import MachineMemory

    model = default_model()
    earlier = render_objects()
    app = create_app(
        settings_path=settings_path,
        data_dir=data_dir,
        model=model,
        default_model=lambda: model,
        machine=lambda: MachineMemory(16 * 10**9, 9 * 10**9),
        max_tokens=max_tokens,
    )
    soak, firsts = Soak(), []

    async def until(predicate, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"the app did not get there: {predicate}")
            await pilot.pause(0.02)

    async with app.run_test(size=(140, 44)) as pilot:
        await until(lambda: app.engine_state.status in ("ready", "error"))
        assert app.engine_state.status == "ready", app.engine_state.error
        for turn in range(turns):
            if turn and turn % turns_per_chat == 0:
                await pilot.press("ctrl+n")
                await pilot.pause()
            screen = app.screen
            before = len(screen.conversation.messages)
            prompt = PROMPTS[turn % turns_per_chat % len(PROMPTS)]
            await pilot.press(*prompt, "enter")
            await until(lambda s=screen, b=before: len(s.conversation.messages) == b + 2)
            await until(lambda s=screen: not s.generating)
            if turn % turns_per_chat == 0:
                firsts.append((prompt, screen.conversation.messages[-1]["content"]))
            soak.sample(turn + 1)
            if (turn + 1) % turns_per_chat == 0:
                soak.kept.append((turn + 1, *await kept_once_settled(pilot, earlier)))
    return soak, firsts


def stock_chat_replies(prompts: list[str], max_tokens: int) -> list[str]:
    """Stock mlx-lm's greedy reply to one user message through the chat template."""
    from mlx_lm import load
    from mlx_lm.generate import generate

    from mlx_pager.engine import default_model
    from mlx_pager.paging.loader import cast_floating, default_compute_dtype

    model, tokenizer = load(default_model())
    dtype = default_compute_dtype()
    if dtype is not None:
        model.update(cast_floating(model.parameters(), dtype))
    replies = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        replies.append(generate(model, tokenizer, ids, max_tokens=max_tokens))
    return replies
