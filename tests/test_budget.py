"""A model whose experts are 4x the budget runs, and peak RSS stays inside the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from rss import COMMAND, MB, TOLERANCE, baseline_script

from mlx_pager.budget import plan_budget
from mlx_pager.paging.loader import inspect_model
from mlx_pager.sim.synthetic import make_checkpoint

BASELINE = baseline_script("mlx_lm.utils, mlx_lm.generate, transformers, mlx_pager.engine")
GENERATE = COMMAND


def test_plan_divides_the_budget():
    plan = plan_budget(10**9, resident_bytes=200 * MB, kv_bytes=50 * MB, expert_bytes=5 * MB,
                       num_experts=1000, top_k=8)  # fmt: skip
    assert plan.slots == (10**9 - 200 * MB - 50 * MB - plan.headroom_bytes) // (5 * MB)
    assert plan.fixed_bytes + plan.cache_bytes <= plan.budget_bytes
    assert plan.verdict == "paged"
    assert plan_budget(10**12, 200 * MB, 50 * MB, 5 * MB, 1000, 8).verdict == "fits"
    tiny = plan_budget(300 * MB, 200 * MB, 50 * MB, 5 * MB, 1000, 8)
    assert tiny.verdict == "too_large" and "at least" in tiny.explain()
    # A dense model: no expert slots, but its fixed parts must still fit.
    dense = plan_budget(200 * MB, 200 * MB, 50 * MB, 0, 0, 1)
    assert dense.verdict == "too_large" and "expert slots" not in dense.explain()
    assert plan_budget(dense.fixed_bytes, 200 * MB, 50 * MB, 0, 0, 1).verdict == "fits"


def test_a_share_of_the_experts_buys_that_many_slots():
    """The budget the benchmarks open "25% of the experts" with: planning it back gives
    exactly that share of slots, and never fewer than top-k."""
    sizes = dict(resident_bytes=200 * MB, kv_bytes=50 * MB, expert_bytes=5 * MB,
                 num_experts=1000, top_k=8)  # fmt: skip
    plan = plan_budget(0, **sizes)
    assert plan_budget(plan.share_budget_bytes(0.25), **sizes).slots == 250
    assert plan_budget(plan.share_budget_bytes(0.001), **sizes).slots == 8  # top-k
    assert plan.share_budget_bytes(1.0) == plan.full_budget_bytes


def test_kv_budget_counts_the_real_caches_of_a_hybrid_model(tmp_path):
    """qwen3_5_moe: full-attention layers grow with the context, linear-attention layers
    hold a fixed state. The budget's KV part is what the caches hold after a full prompt."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, make_prompt_cache

    context = 128
    path = make_checkpoint(tmp_path / "m", "qwen3_5_moe")
    layout = inspect_model(path, context)
    model = layout.model
    model.load_weights(str(path / "model.safetensors"))
    caches = make_prompt_cache(model)
    model(mx.zeros((1, context), dtype=mx.int32), cache=caches)
    held = 0
    for c in caches:
        if isinstance(c, ArraysCache):  # the conv inputs and the recurrent state
            held += sum(a.nbytes for a in c.cache if a is not None)
        else:  # keys and values up to the offset (the buffer grows in steps of 256)
            held += 2 * c.keys[..., : c.offset, :].nbytes
    assert held <= layout.kv_bytes <= 1.05 * held


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_peak_rss_is_not_the_parents():
    """A process started from a large one reports its own peak (ru_maxrss would not)."""
    parent = (
        "import subprocess, sys; big = b'x' * (300 * 10**6); "
        "subprocess.run([sys.executable, '-c', 'from mlx_pager.stats import peak_rss; "
        "print(peak_rss())'], check=True)"
    )
    child_peak = int(subprocess.check_output([sys.executable, "-c", parent], text=True))
    assert child_peak < 150 * MB, child_peak


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("budget") / "big", "qwen3_moe", hidden_size=512,
        moe_intermediate_size=512, intermediate_size=512, num_experts=32,
        num_experts_per_tok=4, num_hidden_layers=4,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("read_path", ["pread", "mmap"])
@pytest.mark.parametrize("budget_mb", [100, 200])
def test_peak_rss_within_budget_plus_baseline(big_checkpoint, budget_mb, read_path):
    check_peak(big_checkpoint, budget_mb, read_path)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_prefetch_and_double_buffering_stay_inside_the_budget(big_checkpoint, tmp_path):
    """Decode prefetch on, and prefill rounds reading the next group (and the next
    layer's likely experts) into slots while one computes: still inside the budget."""
    (tmp_path / "settings.toml").write_text("prefetch = true\n")
    stats = check_peak(big_checkpoint, 100, "pread", {"MLX_PAGER_CONFIG_DIR": str(tmp_path)})
    assert stats["prefetch_issued"] > 0
    assert stats["read_ahead_issued"] > 0  # prefill read ahead into slots


def check_peak(path, budget_mb: int, read_path: str, env: dict | None = None) -> dict:
    """Peak RSS of a ``generate`` process (the kernel's VmHWM) within budget + baseline."""
    budget = budget_mb * MB
    layout = inspect_model(path, 4096)
    expert_total = layout.moe_layers * layout.experts_per_layer * layout.expert_bytes
    assert expert_total >= 2 * budget

    baseline = int(subprocess.check_output([sys.executable, "-c", BASELINE], text=True))
    out = subprocess.run(
        [sys.executable, "-c", GENERATE, "generate", "--model", str(path), "--budget",
         f"{budget_mb}MB", "--read-path", read_path, "--prompt",
         "Experts are read from disk on demand. " * 8, "--max-tokens", "24",
         "--ignore-chat-template", "--json"],
        capture_output=True, text=True, check=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    *report, peak = out.stdout.strip().splitlines()
    stats = json.loads("\n".join(report))["stats"]
    assert stats["misses"] > stats["slots"]  # it really paged
    excess = int(peak) - budget - baseline
    assert excess <= TOLERANCE, dict(peak=int(peak), baseline=baseline, excess_mb=excess / MB)
    # MLX's own accounting: the full expert tensors were never materialised.
    assert stats["peak_mlx_bytes"] < budget < expert_total
    return stats
