"""Routing traces: the shared format read, written and recorded; bad files refused clearly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mlx_pager.sim.trace import Trace, TraceRecorder, attach_recorder, load_trace, save_trace


def small_trace(tokens: int = 6, layers: int = 2, k: int = 2, experts: int = 8) -> Trace:
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens * layers)])
    return Trace(
        expert_ids=ids.reshape(tokens, layers, k).astype(np.int16),
        offsets=np.array([0, 4, tokens]),
        num_experts=experts,
        phase="decode",
        model="tiny",
        weights=rng.random((tokens, layers, k), dtype=np.float32),
        labels=np.array(["code", "prose"]),
        text=np.array(["def f():", "Once upon a time"]),
        label_source="test",
    )


def write_npz(path, **arrays) -> str:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def test_round_trip(tmp_path):
    trace = small_trace()
    save_trace(tmp_path / "t.npz", trace)
    back = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)
    np.testing.assert_array_equal(back.weights, trace.weights)
    assert back.expert_ids.dtype == np.int16 and back.weights.dtype == np.float32
    assert (back.num_experts, back.phase, back.model) == (8, "decode", "tiny")
    assert list(back.labels) == ["code", "prose"] and back.text[1] == "Once upon a time"
    assert back.label_source == "test"
    # readable the way docs/trace-format.md promises: plain numpy, no pickle
    with np.load(tmp_path / "t.npz", allow_pickle=False) as z:
        assert z["expert_ids"].shape == (6, 2, 2) and z["offsets"].dtype == np.int64


def test_any_suffix_is_kept(tmp_path):
    save_trace(tmp_path / "run.trace", small_trace())
    assert (tmp_path / "run.trace").exists() and load_trace(tmp_path / "run.trace").num_tokens == 6


def test_sequences_slice():
    trace = small_trace()
    second = trace.sequences(1, 2)
    assert second.num_tokens == 2 and list(second.offsets) == [0, 2]
    np.testing.assert_array_equal(second.expert_ids, trace.expert_ids[4:])
    assert list(second.labels) == ["prose"] and second.weights.shape == (2, 2, 2)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No trace"):
        load_trace(tmp_path / "nope.npz")


def test_not_an_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("hello, not a zip")
    with pytest.raises(ValueError, match="not a routing trace"):
        load_trace(path)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array"):
        load_trace(tmp_path / "array.npy")


def test_missing_keys_are_named(tmp_path):
    path = write_npz(tmp_path / "t.npz", expert_ids=np.zeros((2, 1, 1), np.int16))
    with pytest.raises(ValueError, match="missing offsets, num_experts, phase, model"):
        load_trace(path)


def _fields(**changes):
    fields = dict(
        expert_ids=np.zeros((3, 2, 2), np.int16),
        offsets=np.array([0, 3]),
        num_experts=np.array(4),
        phase=np.array("prefill"),
        model=np.array("m"),
    )
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"expert_ids": np.zeros((3, 2), np.int16)}, "must be \\[tokens, layers, k\\]"),
        ({"expert_ids": np.full((3, 2, 2), 4, np.int16)}, "must lie in -1..3"),
        ({"expert_ids": np.zeros((3, 2, 2), np.float32)}, "must be integers"),
        ({"weights": np.zeros((3, 2, 3), np.float32)}, "weights shape"),
        ({"offsets": np.array([0, 2])}, "offsets must run from 0 to the 3 tokens"),
        ({"offsets": np.array([0, 2, 1, 3])}, "must not decrease"),
        ({"labels": np.array(["a", "b"])}, "labels has 2 entries for 1 sequences"),
        ({"phase": np.array("training")}, "phase must be one of"),
        ({"phase": np.array("mixed")}, "phase must be one of prefill, decode, not 'mixed'"),
        ({"num_experts": np.array([4, 4])}, "malformed field"),
    ],
)
def test_bad_fields(tmp_path, changes, message):
    path = write_npz(tmp_path / "t.npz", **_fields(**changes))
    with pytest.raises(ValueError, match=message):
        load_trace(path)


def test_recorder_tokens_sequences_and_phase(tmp_path):
    recorder = TraceRecorder(num_experts=8, model="tiny", text="first prompt")
    # a prefill chunk of 3 tokens through 2 layers, router weights known
    for layer in range(2):
        ids = np.array([[[0, 1], [2, 3], [4, 5]]]) + layer  # [batch, tokens, k]
        recorder.record(layer, ids, np.full((1, 3, 2), 0.5), phase="prefill")
    for step in range(2):  # then two decode tokens
        for layer in range(2):
            recorder.record(layer, [[[6 - step, 7]]], [[[0.75, 0.25]]], phase="decode")
    recorder.end_sequence(label="code")
    for layer in range(2):  # a second prompt, one token, and no reply
        recorder.record(layer, np.array([1, 2]), np.array([0.6, 0.4]), phase="prefill")
    recorder.save(tmp_path / "rec.npz")  # the recorder's phase: decode
    recorder.save(tmp_path / "prompts.npz", phase="prefill")
    # One phase per file, as docs/trace-format.md allows, and each replays as it was routed.
    trace = load_trace(tmp_path / "rec.npz")
    assert trace.expert_ids.shape == (2, 2, 2) and trace.phase == "decode"
    assert list(trace.offsets) == [0, 2] and trace.expert_ids[1, 0].tolist() == [5, 7]
    assert trace.weights[1, 1].tolist() == [0.75, 0.25]
    assert list(trace.labels) == ["code"] and trace.text[0] == "first prompt"
    prompts = load_trace(tmp_path / "prompts.npz")
    assert prompts.expert_ids.shape == (4, 2, 2) and prompts.phase == "prefill"
    assert list(prompts.offsets) == [0, 3, 4] and prompts.expert_ids[1, 1].tolist() == [3, 4]
    assert prompts.expert_ids[3, 0].tolist() == [1, 2]
    assert prompts.weights[0, 0].tolist() == [0.5, 0.5]
    assert list(prompts.labels) == ["code", ""] and prompts.text[0] == "first prompt"
    with pytest.raises(ValueError, match="phase must be one of prefill, decode"):
        TraceRecorder(num_experts=8, phase="mixed")


def test_recorder_phase_decode_and_no_weights(tmp_path):
    recorder = TraceRecorder(num_experts=4)
    for _ in range(3):
        recorder.record(0, [1, 2])
    trace = recorder.to_trace()
    assert trace.phase == "decode" and trace.weights is None and trace.num_tokens == 3
    with pytest.raises(ValueError, match="Nothing was recorded in the prefill phase"):
        recorder.to_trace("prefill")


def test_recorder_refuses_ragged_layers():
    recorder = TraceRecorder(num_experts=4)
    recorder.record(0, [[0, 1], [1, 2]])
    recorder.record(1, [0, 1])
    with pytest.raises(ValueError, match="different token counts"):
        recorder.to_trace()
    with pytest.raises(ValueError, match="Nothing was recorded"):
        TraceRecorder(num_experts=4).to_trace()


def test_attach_recorder_hooks_the_run():
    cache = SimpleNamespace(on_tokens=None, phase="prefill")  # the run: its hook, its phase
    engine = SimpleNamespace(
        paged=SimpleNamespace(run=cache),
        info=SimpleNamespace(experts_per_layer=16, name="org/model"),
    )
    recorder = attach_recorder(engine, "hi")
    cache.on_tokens(0, np.array([[[1, 2], [5, 6]]]))  # the prompt, tagged by the run
    cache.phase = "decode"
    cache.on_tokens(0, np.array([[[3, 4]]]))
    trace = recorder.to_trace()
    assert trace.model == "org/model" and trace.num_experts == 16 and trace.text[0] == "hi"
    assert trace.phase == "decode" and trace.expert_ids[:, 0].tolist() == [[3, 4]]
    assert recorder.to_trace("prefill").expert_ids[:, 0].tolist() == [[1, 2], [5, 6]]
    engine.paged.run = None
    with pytest.raises(ValueError, match="no routed experts"):
        attach_recorder(engine)
