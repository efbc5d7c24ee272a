"""Profile statistics, and `mlx-pager profile` end to end on a small model."""

from __future__ import annotations

import json

import numpy as np
from checkpoints import budget_for_slots, open_paged
from mlx_lm.utils import load_tokenizer

from mlx_pager.cli import main
from mlx_pager.cli.profile import measure_preload, run_prompts
from mlx_pager.engine import Engine
from mlx_pager.settings import Settings
from mlx_pager.sim.synthetic import make_checkpoint
from mlx_pager.sim.trace import load_trace
from mlx_pager.tasks.classifier import split_held_out
from mlx_pager.tasks.coverage import coverage_curve, layer_skew, predicted_hit_rate, task_coverage
from mlx_pager.tasks.profiles import TaskProfiles


def test_coverage_curve_and_skew():
    counts = np.zeros((2, 50), np.int64)
    counts[0, 0] = 90  # one pair takes 90% of the activations
    counts[1, :10] = 1
    curve = coverage_curve(counts)
    assert curve[0.01] == 0.9  # top 1 of 100 pairs
    assert abs(curve[0.10] - 0.99) < 1e-9 and abs(curve[0.20] - 1.0) < 1e-9
    skew = layer_skew(counts)
    assert skew[0] == 1.0 and abs(skew[1] - 1.0) < 1e-9  # 10 of 50 experts, all in the top 25%
    assert predicted_hit_rate(counts, 5) == 94 / 100
    assert predicted_hit_rate(np.zeros((2, 3)), 2) is None


def test_task_coverage_is_diagonal_for_disjoint_tasks():
    a = np.zeros((1, 8), np.int64)
    b = np.zeros((1, 8), np.int64)
    a[0, :2], b[0, 4:6] = 5, 5
    tasks, matrix = task_coverage({"code": a, "prose": b})
    assert tasks == ["code", "prose"]
    assert np.allclose(matrix, np.eye(2))


PAIRS = [(t, f"{t} prompt number {i} " * 3) for i in range(5) for t in ("code", "prose")]


def test_profile_command_learns_and_measures(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"task": t, "text": x}) for t, x in PAIRS))
    trace_path = tmp_path / "profile.npz"
    # 8 slots for 2 layers of 16 experts: the cache pages, so the two arms can differ.
    budget = budget_for_slots(path, 8, Settings().context_length)
    args = ["profile", "--model", str(path), "--prompts", str(prompts), "--max-tokens", "4",
            "--measure-preload", "--decode-tokens", "4", "--budget", str(budget), "--json",
            "--export-trace", str(trace_path)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"] == ["code", "prose"] and report["prompts"] == 10
    assert 0 < report["coverage"]["top_1pct"] <= report["coverage"]["top_20pct"] <= 1
    assert set(report["preload_hit"]) == {"with", "without"}
    assert all(0 < rate < 1 for rate in report["preload_hit"].values())  # it paged
    ttft = report["preload_ttft"]
    times = {"ttft_with", "ttft_without", "ttft_ratio", "preload_seconds"}
    assert set(ttft) == times | {"prompt_misses_with", "prompt_misses_without"}
    assert all(0 < ttft[k] < 60 for k in times)
    assert report["preload_ttft"]["preload_seconds"] < 0.5  # hidden in the typing pause
    saved = TaskProfiles.load(path, 2, 16)
    assert saved.counts["code"].sum() > 0 and saved.preload_hit == report["preload_hit"]
    assert saved.preload_ttft == ttft
    assert report["preload"].startswith(("on:", "off: measured"))
    trace = load_trace(trace_path)  # the 8 training prompts, one sequence each, labelled
    assert trace.num_sequences == 8 and trace.num_layers == 2 and trace.top_k == 2
    assert sorted(set(trace.labels)) == ["code", "prose"] and trace.phase == "prefill"
    tokenizer = load_tokenizer(path)
    train, _ = split_held_out(PAIRS)
    assert trace.num_tokens == sum(len(tokenizer.encode(text)) for _, text in train)
    routed = int(saved.counts["code"].sum() + saved.counts["prose"].sum()) // 4
    assert trace.num_tokens < routed  # the replies' tokens are not in a prefill trace


def test_preload_arms_start_from_the_same_state(tmp_path):
    """Each arm starts with an empty cache and a policy that learned nothing: measuring
    twice gives the same figures (the second arm inheriting the first's policy did not)."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    train, held = split_held_out([(t, f"{t} {i}") for i in range(5) for t in ("code", "prose")])
    engine = Engine(open_paged(path, 8, policy="predict"), "m", 256)
    # Read-ahead threads finish early or late on a loaded machine, which changes what is
    # resident when the next victim is chosen: off, so two measurements can be equal.
    engine.paged.cache.reads_ahead = False
    try:
        run_prompts(engine, train, 4)
        first = measure_preload(engine, held, 4, typing=0.01)
        again = measure_preload(engine, held, 4, typing=0.01)
        counts = ("with", "without", "prompt_misses_with", "prompt_misses_without")
        assert [again[k] for k in counts] == [first[k] for k in counts]  # times vary
        # The hot set, preloaded while the user types, is read before the prompt needs it.
        assert first["prompt_misses_with"] < first["prompt_misses_without"], first
    finally:
        engine.close()


def test_preloading_must_gain_a_point(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    engine = Engine(open_paged(path, 8), "m", 256)
    try:
        for gain, verdict in ((0.005, "off: measured"), (0.0099, "off: measured"),
                              (0.01, "on:"), (0.03, "on:")):  # fmt: skip
            engine.profiles.preload_hit = {"without": 0.5, "with": 0.5 + gain}
            assert engine.preload_status.startswith(verdict), (gain, engine.preload_status)
            assert engine.preload_active == (verdict == "on:")
    finally:
        engine.close()


def test_preloading_pays_in_time_to_first_token(tmp_path):
    """Measured with the time to first token: on where it saves 5% of it with fewer reads
    before it, or gains a hit point, losing neither; the status says by how much."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    engine = Engine(open_paged(path, 8), "m", 256)
    try:
        for hit, ratio, reads_with, verdict in (
            (0.0, 0.90, 70, "on: first token 10% sooner after a task switch (1.00 -> 0.90 s, "
                            "30% fewer reads before it), decode +0.0 hit-rate points"),
            (-0.0001, 0.97, 70, "off: measured first token 3% sooner after a task switch "
                                "(1.00 -> 0.90 s, 30% fewer reads before it), decode +0.0 "
                                "hit-rate points; it must gain 5%"),
            (0.0, 0.90, 101, "off: measured first token 10% sooner"),  # no fewer reads: noise
            (0.02, 1.00, 100, "on: first token 0% sooner"),
            (0.02, 1.10, 100, "off: measured first token 10% later"),  # a slower start
            (-0.02, 0.80, 50, "off: measured first token 20% sooner"),
        ):  # fmt: skip
            engine.profiles.preload_hit = {"without": 0.5, "with": 0.5 + hit}
            engine.profiles.preload_ttft = {
                "ttft_without": 1.0, "ttft_with": 0.9, "ttft_ratio": ratio,
                "preload_seconds": 0.2, "prompt_misses_without": 100,
                "prompt_misses_with": reads_with,
            }  # fmt: skip
            assert engine.preload_status.startswith(verdict), engine.preload_status
        engine.profiles.save()
        again = TaskProfiles.load(path, 2, 16)
        assert again.preload_ttft["ttft_ratio"] == 0.8 and abs(again.ttft_gain - 0.2) < 1e-9
        assert again.reads_saved == 0.5
    finally:
        engine.close()
