"""`mlx-pager generate`: the same tokens as mlx-lm, streamed text, stats, JSON."""

from __future__ import annotations

import json

import pytest
from checkpoints import budget_for_slots

from mlx_pager.cli import main
from mlx_pager.sim.synthetic import make_checkpoint

STATS_KEYS = {
    "budget_bytes",
    "peak_rss_bytes",
    "resident_bytes",
    "cache_bytes",
    "hits",
    "misses",
    "bytes_read",
    "prompt_tps",
    "decode_tps",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("m") / "m", "qwen3_moe", num_experts=16)


def test_json_output_matches_mlx_lm(model, capsys):
    from mlx_lm import generate, load

    reference, tokenizer = load(str(model))
    expected = generate(reference, tokenizer, "The experts", max_tokens=12)
    budget = str(budget_for_slots(model, 3, 4096))
    args = [
        "generate",
        "--model",
        str(model),
        "--prompt",
        "The experts",
        "--max-tokens",
        "12",
        "--budget",
        budget,
        "--ignore-chat-template",
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == expected and out["paged"] is True
    assert len(out["tokens"]) == 12
    assert STATS_KEYS <= out["stats"].keys()
    stats = out["stats"]
    assert stats["misses"] > 0 and stats["budget_bytes"] == int(budget)
    # Reserved at the context length (4096), filled by 2 + 12 tokens (in steps of 256).
    assert 0 < stats["kv_used_bytes"] <= stats["kv_bytes"] * 256 / 4096
    # Activations per (layer, expert): every token that went through the model (mlx-lm
    # runs one step ahead, so the prompt and every generated one) picked top-2 in each of
    # the 2 MoE layers.
    counts = stats["expert_counts"]
    assert len(counts) == 2 and all(len(row) == 16 for row in counts)
    tokens = stats["prompt_tokens"] + stats["generation_tokens"]
    assert sum(map(sum, counts)) == tokens * 2 * 2


def test_streamed_text_then_one_stats_line(model, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(model),
                "--prompt",
                "Hi",
                "--max-tokens",
                "5",
                "--budget",
                "1GB",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out.strip()
    assert "decode 5 tok" in err and "hit" in err and "budget" in err


def test_reply_stops_at_the_context_length(model, capsys):
    """The budget holds the KV cache of context_length tokens: generation ends there."""
    prompt = "The experts " * 40  # 120 tokens: the reply has room for 8
    args = ["generate", "--model", str(model), "--prompt", prompt, "--max-tokens", "50",
            "--context-length", "128", "--budget", "1GB", "--ignore-chat-template",
            "--json"]  # fmt: skip
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["prompt_tokens"] == 120
    assert stats["prompt_tokens"] + stats["generation_tokens"] == 128


def test_dense_model_says_it_runs_fully_resident(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "dense", "qwen3")
    assert main(["generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "3"]) == 0
    assert "no routed experts: running fully resident" in capsys.readouterr().err
    args = ["generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "3", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["paged"] is False


def test_errors_are_one_line_with_exit_code_2(model, capsys):
    assert main(["generate", "--model", str(model), "--prompt", "Hi", "--budget", "1MB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlx-pager: error:") and "below the minimum" in err
    assert "Traceback" not in err


def test_record_trace_replays_in_the_simulator(model, tmp_path, capsys):
    from mlx_pager.sim.trace import load_trace

    trace_path = tmp_path / "run.npz"
    assert (
        main(
            [
                "generate",
                "--model",
                str(model),
                "--prompt",
                "Hi there",
                "--max-tokens",
                "6",
                "--budget",
                "1GB",
                "--record-trace",
                str(trace_path),
            ]
        )
        == 0
    )
    trace = load_trace(trace_path)
    capsys.readouterr()
    assert trace.num_layers == 2 and trace.top_k == 2 and trace.num_experts == 16
    assert main(["simulate", "--trace", str(trace_path), "--capacity", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["policies"]["lru"] <= report["belady"] <= 1
