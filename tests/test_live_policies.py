"""The live cache drives a policy exactly as the simulator does, so the policy measured
on replayed traces is the policy users run."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from checkpoints import open_paged

from mlx_pager.engine import Engine
from mlx_pager.paging import expert_cache
from mlx_pager.paging.policies import LFU, POLICIES
from mlx_pager.sim import replay as simulate
from mlx_pager.sim.replay import replay, replay_reference
from mlx_pager.sim.synthetic import make_checkpoint
from mlx_pager.sim.trace import Trace, attach_recorder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("m") / "m", "qwen3_moe", num_experts=16, num_hidden_layers=3
    )


def whole_run(recorder) -> Trace:
    """The prompt's tokens, then the reply's, as one stream for the simulator."""
    prefill, decode = recorder.to_trace("prefill"), recorder.to_trace("decode")
    tokens = prefill.num_tokens + decode.num_tokens
    ids = np.concatenate([prefill.expert_ids, decode.expert_ids])
    return replace(decode, expert_ids=ids, offsets=np.array([0, tokens]), text=None)


@pytest.mark.parametrize(
    "queue_limit", [0, 5, None], ids=["told-at-once", "short-queue", "default"]
)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_live_hits_equal_simulated_hits(model, policy, queue_limit, monkeypatch):
    """Also whether the cache tells the policy each request at once or queues them until
    a decision needs them: the same hits."""
    if queue_limit is not None:
        monkeypatch.setattr(expert_cache, "QUEUE_LIMIT", queue_limit)
    per_layer = 4
    paged = open_paged(model, per_layer * 3, policy=policy)  # one shared cache, 3 layers
    engine = Engine(paged, "m", 256)
    recorder = attach_recorder(engine)
    prompt_tokens = len(engine.encode("a", chat_template=False))
    try:
        # One-token prompt: every forward pass is one token, as the simulator steps.
        for _ in engine.generate("a", max_tokens=40, chat_template=False):
            pass
        live = (engine.stats.hits, engine.stats.misses)
        live_decode = (engine.stats.decode_hits, engine.stats.decode_misses)
    finally:
        engine.close()
    assert recorder.to_trace("prefill").num_tokens == prompt_tokens
    trace = whole_run(recorder)
    assert trace.num_tokens >= 40  # mlx-lm computes one token ahead of what it yields
    simulated = replay(trace, per_layer, policy, shared=True, split=prompt_tokens)
    assert live == (simulated.hits, simulated.misses)
    # Decode counts start right after the prompt, the first decode step included.
    assert live_decode == simulated.held_out


def test_live_lfu_counts_requests_as_the_simulator_does(model, monkeypatch):
    """A multi-token prompt reaches the live cache as one prefill chunk: one call per
    expert with the tokens it serves; LFU must count those tokens, as the replay does."""
    per_layer = 4
    paged = open_paged(model, per_layer * 3, policy="lfu")
    engine = Engine(paged, "m", 256)
    recorder = attach_recorder(engine)
    prompt = "Experts are paged from disk while the model reads a long prompt."
    prompt_tokens = len(engine.encode(prompt, chat_template=False))
    try:
        for _ in engine.generate(prompt, max_tokens=8, chat_template=False):
            pass
        live = paged.cache.policy
    finally:
        engine.close()
    prefill = recorder.to_trace("prefill")
    assert prefill.num_tokens == prompt_tokens > 2
    # Some expert served several tokens of the chunk, so the test tells the two apart.
    chunk = prefill.expert_ids[: prompt_tokens - 1]
    assert max(np.unique(chunk[:, 0], return_counts=True)[1]) > 1

    made = []

    def make_policy(name):
        made.append(POLICIES[name]())
        return made[-1]

    monkeypatch.setattr(simulate, "make_policy", make_policy)
    # the Python replay: it drives policy objects whose counts can be compared
    replay_reference(whole_run(recorder), per_layer, "lfu", shared=True)
    assert isinstance(live, LFU) and isinstance(made[0], LFU)
    assert live._counts == made[0]._counts


def test_decode_counts_start_after_the_prompts_last_token(model):
    """mlx-lm runs the first decode step before it yields the first token: the decode
    counts must include it, and nothing of the prompt."""
    paged = open_paged(model, 6)
    run = paged.run
    engine = Engine(paged, "m", 256)
    prompt = "A prompt of several tokens, then a reply."
    prompt_tokens = len(engine.encode(prompt, chat_template=False))
    passes, counted = [0], []  # tokens through every layer; (tokens before, hits, misses)
    count, passed = run.count, run.passed

    def logged_count(hits, misses, waited):
        counted.append((passes[0], hits, misses))
        count(hits, misses, waited)

    def logged_passed(n):
        passes[0] += n
        passed(n)

    paged.cache.on_fetch, run.passed = logged_count, logged_passed
    try:
        for _ in engine.generate(prompt, max_tokens=5, chat_template=False):
            pass
        stats = engine.stats
    finally:
        engine.close()
    after = [(h, m) for done, h, m in counted if done >= prompt_tokens]
    assert passes[0] - prompt_tokens == stats.generation_tokens == 5  # one pass per token
    assert (stats.decode_hits, stats.decode_misses) == tuple(np.sum(after, 0).tolist())


@pytest.mark.parametrize("policy", ["lru", "predict"])
def test_hits_recorded_later_keep_the_books_of_each_layer(model, policy):
    """A decode step whose experts were all resident writes its books (the policy's
    requests, the counts, the trace) once ``HIT_TOKENS`` tokens have passed, a later layer
    misses or the reply ends, in order with the token ends between them: the same hits,
    misses, counts, routing order and residents as the books ``fetch`` and ``run.routed``
    wrote layer by layer before. (Read-aheads off:
    their threads' timing would make two runs differ; they have a test of their own.)"""

    def run(defer: bool):
        paged = open_paged(model, 36, policy=policy)  # of 48: speculated steps hit and miss
        cache, pager = paged.cache, paged.run
        cache.reads_ahead = False
        if not defer:  # the books as the layer wrote them before they waited

            def at_once(layer, indices):
                routed = np.array(indices, np.intp)
                cache.fetch(layer, routed.reshape(-1))
                pager.routed(layer, routed, routed.reshape(-1), 1)

            cache.defer_hit = at_once
        routing, deferred = [], []
        pager.on_tokens = lambda layer, routed: routing.append((layer, routed.tolist()))
        written = cache.on_hits
        cache.on_hits = lambda layers, routed: (
            deferred.append(len(layers)) or written(layers, routed)
        )
        engine = Engine(paged, "m", 256)
        try:
            for prompt in ("Experts are paged from disk.", "Then another prompt."):
                for _ in engine.generate(prompt, 24, chat_template=False, ignore_eos=True):
                    pass
            s = paged.stats
            resident = (cache.slot_table >= 0).tolist()
            books = (s.hits, s.misses, s.expert_counts.tolist(), resident)
        finally:
            engine.close()
        return books, routing, max(deferred, default=0)

    (books, routing, most), (books_then, routing_then, _) = run(True), run(False)
    assert most > 3, "some hits must wait for later tokens (3 layers a token)"
    assert books == books_then and routing == routing_then


@pytest.mark.parametrize("cut_short", [False, True], ids=["finished", "caller-stopped"])
def test_a_replys_last_chunk_has_every_hit_counted(model, cut_short):
    """Hits wait up to ``HIT_TOKENS`` tokens for their books; the chunk that ends a reply,
    or the caller closing the stream, writes them: the last stats the app shows and the
    profile a reply leaves are complete, decode counts included."""
    paged = open_paged(model, 48)  # every expert fits: decode steps hit
    engine = Engine(paged, "m", 256)
    tokens = expert_cache.HIT_TOKENS + 7  # ends with hits waiting
    try:
        for _ in engine.generate("Warm the cache.", tokens, chat_template=False):
            pass
        stream = engine.generate("Experts stay.", tokens, chat_template=False, ignore_eos=True)
        for i, _ in enumerate(stream):
            shown = engine.stats.snapshot()  # what the app shows for this chunk
            if cut_short and i == tokens - 3:
                stream.close()
                shown = engine.stats.snapshot()
                break
        paged.run.books_done()  # anything still waiting
        after = engine.stats.snapshot()
    finally:
        engine.close()
    assert shown.decode_hits > expert_cache.HIT_TOKENS * 3  # 3 layers a token
    assert (shown.hits, shown.expert_counts.tolist()) == (after.hits, after.expert_counts.tolist())
    assert shown.decode_hits == shown.hits - paged.run.prefill_counts[0]


def test_a_deferred_hit_on_an_expert_read_ahead_counts_its_first_use_a_miss(model):
    """Experts read ahead (prefill) are resident but their first use counts a miss. Hits on
    them wait like any other, and are written while a later miss settles two more finished
    read-aheads (the policy is told of each as it is admitted): counted once, no error."""
    import mlx.core as mx

    paged = open_paged(model, 12, policy="lru")
    cache = paged.cache
    assert cache.views is not None, "this machine's MLX buffers are host-writable"

    def read_ahead(experts):
        cache.read_ahead(0, np.array(experts), set())
        for _, future in list(cache.ahead.values()):
            future.result()

    try:
        read_ahead([0, 1, 2])
        cache.fetch(1, np.array([5]))  # a miss elsewhere settles them: resident, fresh
        assert cache.fresh == {(0, 0), (0, 1), (0, 2)}
        read_ahead([3, 4])  # two more finished, not settled yet
        cache.defer_hit(0, mx.array([[[0, 1]]]))  # a decode step's hit on two of them
        cache.fetch(0, np.array([6]))  # settles 3 and 4, writes the hit on the way
        cache.record()
        assert cache.fresh == {(0, 2), (0, 3), (0, 4)}
        assert (paged.stats.hits, paged.stats.misses) == (0, 4)  # 5, the first uses, 6
        assert cache.ahead_used == 2 and all(cache.resident(0, e) for e in (0, 1, 2, 3, 4, 6))
    finally:
        paged.close()


def test_a_read_ahead_experts_first_use_is_counted_once_across_waiting_tokens(model):
    """Hits wait for several tokens; of two tokens that both hit an expert read ahead, only
    the first use counts a miss (its read came earlier), the second a hit, as one by one."""
    import mlx.core as mx

    paged = open_paged(model, 12, policy="lru")
    cache = paged.cache
    try:
        cache.read_ahead(0, np.array([0, 1]), set())
        for _, future in list(cache.ahead.values()):
            future.result()
        cache.fetch(1, np.array([5]))  # a miss elsewhere settles them: resident, fresh
        for _ in range(2):  # two decode steps hit both; their books wait
            cache.defer_hit(0, mx.array([[[0, 1]]]))
            cache.next_tokens(1)
        assert cache.hits_waiting
        cache.write_hits()
        assert (paged.stats.hits, paged.stats.misses) == (2, 3)  # 5; 0 and 1 first; then hits
        assert cache.ahead_used == 2 and not cache.fresh
    finally:
        paged.close()


def test_a_miss_hears_the_hits_before_it_chooses_its_victims(model):
    """Hits whose books wait (``defer_hit``) are told to the policy before a later miss
    picks its victims: least recently used, the experts just hit are kept."""
    import mlx.core as mx

    paged = open_paged(model, 4, policy="lru")
    cache = paged.cache
    try:
        cache.fetch(0, np.array([0, 1]))
        cache.fetch(0, np.array([2, 3]))  # every slot taken; 0 and 1 the oldest
        cache.defer_hit(0, mx.array([[[0, 1]]]))  # a decode step hit them again
        cache.fetch(0, np.array([4, 5]))  # two victims
        assert [cache.resident(0, e) for e in range(6)] == [True, True, False, False, True, True]
        assert paged.stats.hits == 2
    finally:
        paged.close()
