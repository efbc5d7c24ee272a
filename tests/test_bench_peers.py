"""The at-scale harness end to end on a tiny qwen3_moe under a real cap: every installed
arm runs in its own process, the cap was applied, mlx-pager decodes stock's tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mlx_pager.benchmark.cap import V1_MEMORY, cgroup2_mount, cgroup_version
from mlx_pager.benchmark.fixture import make_model
from mlx_pager.benchmark.harness import _arm, run_benchmark, too_big_to_hold
from mlx_pager.benchmark.plots import plot_report
from mlx_pager.cli.bench import peer_table
from mlx_pager.sim.synthetic import make_checkpoint

MiB = 2**20
CAP = 700 * MiB
PROMPTS = ["Explain how a cache of experts decides what to keep.", "def f(x):\n    return x"]
FIGURES = ("load_s", "ttft_s", "prefill_tps", "decode_tps", "disk_bytes_per_token",
           "peak_rss_bytes", "read_bytes", "exit", "cap", "tokens")  # fmt: skip


def _groups() -> set[str]:
    """This process's cgroups (a benchmark running beside the suite has its own)."""
    mine = f"mlx-pager-bench-{os.getpid()}-*"
    groups = {p.name for p in V1_MEMORY.glob(mine)} if V1_MEMORY.exists() else set()
    v2 = cgroup2_mount()  # the I/O pressure groups
    return groups | ({p.name for p in v2.glob(f"mlx-pager-psi-{os.getpid()}-*")} if v2 else set())


@pytest.mark.slow
@pytest.mark.skipif(cgroup_version()[0] is None, reason=cgroup_version()[1])
def test_harness_end_to_end(tmp_path):
    model = tmp_path / "m"
    make_model("small", model)  # the real-shaped writer's test shape: mlx-community's layout
    before = _groups()
    report = run_benchmark(model, cap_bytes=CAP, prompts=PROMPTS, max_tokens=8,
                           arms={"stock", "mlx-pager", "nunspark", "llama"})  # fmt: skip
    json.dumps(report)  # plain data
    runs = report["runs"]
    expected = {"stock-resident", "stock-capped", "mlx-pager-resident", "mlx-pager-capped",
                "mlx-pager-0.5", "mlx-pager-0.25", "mlx-pager-0.125"}  # fmt: skip
    if importlib.util.find_spec("nunspark"):
        expected |= {"nunspark-resident", "nunspark-capped"}
        assert report["nunspark_packed_extra_disk_bytes"] > 0
    assert expected <= set(runs)
    assert "llama-capped" in runs or "llama" in report["skipped"]["llama-capped"]
    if "llama-capped" in runs:  # the harness wrote the GGUF and compared the routing
        assert report["gguf"]["exported"] and report["gguf"]["bytes"] > 0
        agreement = report["gguf"]["agreement"]
        assert agreement["layers_compared"] == 4
        assert agreement["expert_slot_agreement"] > 0.9, agreement
    else:
        assert "not installed" in report["gguf"]["skipped"]
    for name, r in runs.items():
        for key in FIGURES:
            assert key in r, (name, key)
        assert r["exit"]["completed"], (name, r["exit"])
        for key in ("load_s", "ttft_s", "decode_tps", "read_bytes", "disk_bytes_per_token"):
            assert r[key] >= 0, (name, key)
        assert r["blkio_delay_s"] is None or r["blkio_delay_s"] >= 0
        if cgroup2_mount() is not None:  # PSI: wall-clock stalls, full within some
            assert 0 <= r["io_full_s_per_token"] <= r["io_some_s_per_token"], name
            assert 0 <= r["io_pressure_s"]["full"] <= r["io_pressure_s"]["some"] <= r["wall_s"]
        assert len(r["tokens"]) == len(PROMPTS) and all(len(t) == 8 for t in r["tokens"])
        if name.endswith("resident"):
            assert r["cap"] is None
        else:
            assert r["cap"]["limit_bytes"] == CAP
            assert 0 < r["cap"]["peak_bytes"] <= CAP
    for name in expected - {"stock-resident", "stock-capped"}:
        assert report["ratios"]["tokens_equal_stock"][name] is True, name
    low = runs["mlx-pager-0.125"]
    assert low["slots"] < low["num_experts"]
    assert 0 <= low["hit_rate"] <= low["belady_hit_rate"] + 1e-9 <= 1 + 1e-9
    assert low["misses_per_token"] > 0 and low["read_stall_s"] >= 0
    (cold_read,) = low["ttft_read_s_per_prompt"][:1]  # the first token's wait on reads
    assert 0 < cold_read <= low["read_stall_s"] and cold_read < low["ttft_s"]
    resident = runs["mlx-pager-resident"]  # every expert fits: misses are first uses only
    assert resident["slots"] == resident["num_experts"]
    assert resident["misses_per_token"] * resident["decoded_tokens"] <= resident["slots"]
    assert report["ratios"]["speed_kept"]["mlx-pager"] > 0
    assert _groups() == before  # every cgroup removed
    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 5 and all(g["met"] in (True, False, None) for g in goals.values())
    projection = report["projection"]
    assert projection["label"] == "projection" and projection["projected_tps"] > 0
    assert projection["self_check"]["measured_tps"] == runs["mlx-pager-capped"]["decode_tps"]
    for name, r in runs.items():  # the decode's own kernel counts, per decoded token
        assert r["disk_bytes_per_token"] >= 0 and r["decode_read_bytes"] >= 0, name
    table = peer_table(report)
    assert "PROJECTION" in table and "goals for mlx-pager" in table
    assert "first token, reading experts + the rest" in table
    assert all(name in table for name in runs)
    for png in plot_report(report, tmp_path / "plots"):
        assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(cgroup_version()[0] is None, reason=cgroup_version()[1])
def test_arm_over_the_cap_is_reported_killed(tmp_path):
    """Stock mlx-lm in a cap below what its libraries need: the kernel kills it, and the
    run says so with the cgroup's peak at the limit."""
    model = make_checkpoint(tmp_path / "m", "qwen3_moe", quantize_bits=4)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([[1, 2, 3]]))
    r = _arm("stock", model, prompts, 4, 48 * MiB)
    assert not r["exit"]["completed"]
    assert r["exit"]["oom_killed"] and r["exit"]["signal"] == "SIGKILL"
    assert r["cap"]["oom_kills"] >= 1 and r["cap"]["peak_bytes"] <= 48 * MiB
    assert "decode_tps" not in r


def test_cli_refuses_bad_input(tmp_path):
    def bench(*extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "mlx_pager.cli", "bench", "--peers", *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    missing = bench("--model", str(tmp_path / "nope"), "--corpus", str(tmp_path))
    assert missing.returncode == 2 and "--model DIR" in missing.stderr
    (tmp_path / "m").mkdir()
    no_corpus = bench("--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "none"))
    assert no_corpus.returncode == 2 and "--corpus DIR" in no_corpus.stderr
    huge = bench("--model", str(tmp_path / "m"), "--corpus", str(tmp_path), "--cap", "64TiB")
    assert huge.returncode == 2 and "this machine" in huge.stderr


def test_a_resident_run_that_cannot_fit_is_skipped_with_the_numbers():
    assert too_big_to_hold(1) is None
    why = too_big_to_hold(10**15)  # a petabyte: more than any machine has available
    assert "1000000.0 GB" in why and "available now" in why
