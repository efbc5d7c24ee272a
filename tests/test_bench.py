"""`mlx-pager bench` end to end on a small checkpoint: every section measured, in one run."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx

from mlx_pager.cli import main
from mlx_pager.cli.bench import print_report
from mlx_pager.sim.synthetic import make_checkpoint


def test_bench_reports_every_section(tmp_path, capsys):
    # Stored in bf16, as checkpoints ship: the CPU's float32 slots widen its scales.
    path = make_checkpoint(
        tmp_path / "m", "qwen3_moe", num_experts=16, quantize_bits=4, dtype=mx.bfloat16
    )
    capsys.readouterr()  # mlx-lm's quantiser prints a line
    args = [
        "bench",
        "--model",
        str(path),
        "--max-tokens",
        "6",
        "--fractions",
        "1.0,0.5,0.25",
        "--read-samples",
        "8",
        "--policies",
        "--repeats",
        "2",
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stock"]["decode_tps"] > 0
    full, half, quarter = report["paged"]
    assert (full["slots"], half["slots"], quarter["slots"]) == (32, 16, 8)
    for smaller in (half, quarter):  # fewer slots, more reads
        assert smaller["bytes_per_token"] > full["bytes_per_token"]
    prefetch = report["prefetch"]  # off and on in turn, two rounds
    assert prefetch["fraction"] == 0.25 and prefetch["repeats"] == 2
    assert prefetch["on"]["prefetch"] and not prefetch["off"]["prefetch"]
    assert prefetch["off"]["prefetch_issued"] == 0 and prefetch["ratio"] > 0
    reads = report["reads"]
    for name in ("pread", "mmap"):
        assert reads[f"{name}_cold_ms"] > 0 and reads[f"{name}_warm_ms"] > 0
    assert report["faster_read_path"] in ("pread", "mmap")
    resident = report["resident"]
    assert resident["stock_tps"] > 0 and resident["paged_tps"] > 0 and resident["ratio"] > 0
    assert 0 < resident["host_us_per_layer"] < 1e5
    chat = report["chat"]  # the five-turn chat: the kept cache holds the history
    assert chat["prompt_reused_tokens"][0] == 0
    assert all(r > 0 for r in chat["prompt_reused_tokens"][1:])
    assert all(t > 0 for t in chat["ttft_kept"] + chat["ttft_fresh"])
    layer_reads = report["layer_reads"]  # a layer's misses against the disk, per read path
    # the 4-bit experts' bf16 scales widen into float32 slots here: also read as stored
    for key in ("pread_1", "pread_8", "direct_8", "pread_8_as_stored"):
        row = layer_reads[key]
        assert row["miss_mb_s"] > 0 and row["sequential_mb_s"] > 0 and row["ratio"] > 0
        if shutil.which("fio"):  # the disk's own random reads of the pieces' size
            assert row["fio_mb_s"] > 0 and row["fio_piece_bytes"] >= 4096
            # and in bursts of a decode step's misses: 2 experts' pieces of that size
            assert row["fio_burst_mb_s"] > 0 and row["fio_burst_reads"] >= 2
    prefill = report["prefill"]  # the next layer read ahead during prefill, and not
    assert prefill["plain_ttft"] > 0 and prefill["ahead_ttft"] > 0
    assert 0 <= prefill["ahead_stall_share"] <= 1 and 0 < prefill["ahead_used_share"] <= 1
    assert set(report["policies"]) >= {"lru", "lfu", "predict"}
    assert all(0 <= hit <= 1 for hit in report["policies"].values())
    assert report["prefetch"]["prefetch_pays"] in (None, True, False)  # the gate's verdict
    print_report(report)  # the text the command prints without --json, from the same report
    text = capsys.readouterr().out
    assert "prefetch at 25% of experts, 2 interleaved rounds (without -> with; median" in text
    assert "a layer's misses (2 experts) read through the cache" in text
    assert "(_as_stored: slots in the checkpoint's dtype, as on a GPU;" in text


def test_ban_tokens_makes_end_of_text_impossible():
    """The bench times a fixed token count: end-of-text logits are -inf, others kept."""
    import mlx.core as mx

    from mlx_pager.engine import ban_tokens

    logits = mx.array([[0.5, 2.0, -1.0, 3.0]])
    out = ban_tokens({1, 3})(mx.array([0]), logits)
    assert out.tolist()[0][0] == 0.5 and out.tolist()[0][2] == -1.0
    assert out.tolist()[0][1] == float("-inf") and out.tolist()[0][3] == float("-inf")
    assert mx.argmax(out, axis=-1).item() == 0
