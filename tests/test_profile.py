"""Profile statistics, and `mlx-pager profile` end to end on a small model."""

from __future__ import annotations

import json

import numpy as np

from mlx_pager.cli import main
from mlx_pager.profile import coverage_curve, layer_skew, predicted_hit_rate, task_coverage
from mlx_pager.synthetic import make_checkpoint
from mlx_pager.task_profiles import TaskProfiles
from mlx_pager.trace import load_trace


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


def test_profile_command_learns_and_measures(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    prompts = tmp_path / "p.jsonl"
    lines = [{"task": t, "text": f"{t} prompt number {i} " * 3} for i in range(5)
             for t in ("code", "prose")]  # fmt: skip
    prompts.write_text("\n".join(json.dumps(x) for x in lines))
    trace_path = tmp_path / "profile.npz"
    args = ["profile", "--model", str(path), "--prompts", str(prompts), "--max-tokens", "4",
            "--measure-preload", "--decode-tokens", "4", "--budget", "1GB", "--json",
            "--export-trace", str(trace_path)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"] == ["code", "prose"] and report["prompts"] == 10
    assert 0 < report["coverage"]["top_1pct"] <= report["coverage"]["top_20pct"] <= 1
    assert set(report["preload_hit"]) == {"with", "without"}
    saved = TaskProfiles.load(path, 2, 16)
    assert saved.counts["code"].sum() > 0 and saved.preload_hit == report["preload_hit"]
    assert report["preload"].startswith(("on:", "off: measured"))
    trace = load_trace(trace_path)  # the 8 training prompts, one sequence each, labelled
    assert trace.num_sequences == 8 and trace.num_layers == 2 and trace.top_k == 2
    assert sorted(set(trace.labels)) == ["code", "prose"]
    assert trace.num_tokens == int(saved.counts["code"].sum() + saved.counts["prose"].sum()) // 4
