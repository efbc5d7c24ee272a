"""The parsers of untrusted files, fuzzed (tests/fuzz_targets.py): a few hundred cases
each here, 100,000 in scripts/fuzz_parsers.py. Plus the cases fuzzing must never reach
by luck: length fields of 2**60 refused before anything of that size is allocated."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile

import pytest
from fuzz_targets import TARGETS, _forged_npy
from hypothesis import HealthCheck, given, settings

from mlx_pager.sim.trace import load_trace
from mlx_pager.storage.checkpoint import CheckpointError, read_header

CASES = 500  # per parser: 3,000 in all, about 20 s on a shared 2-core machine


@pytest.mark.parametrize("name", list(TARGETS))
def test_parser_fails_cleanly(name):
    strategy, check = TARGETS[name]

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(data: bytes) -> None:
        check(data)

    run()


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("length", [2**60, 2**64 - 1, 100 * 2**20 + 1])
def test_huge_header_length_is_refused_before_reading(tmp_path, length):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}")

    def parse():
        with pytest.raises(CheckpointError, match="header length .* does not fit"):
            read_header(path)

    assert _peak_bytes(parse) < 2**20


@pytest.mark.parametrize("descr", ["<i2", "<U1000000"])
def test_trace_array_announcing_more_than_it_holds_is_refused_before_loading(tmp_path, descr):
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("expert_ids.npy", _forged_npy((2**40,), descr, b"\0" * 16))

    def parse():
        with pytest.raises(ValueError, match="announces .* bytes but holds"):
            load_trace(path)

    assert _peak_bytes(parse) < 2**20


def test_pickled_trace_is_refused_without_advice_to_unpickle(tmp_path):
    import pickle

    path = tmp_path / "t.npz"
    path.write_bytes(pickle.dumps({"expert_ids": [1, 2]}))
    with pytest.raises(ValueError) as e:
        load_trace(path)
    message = str(e.value).replace(str(path), "FILE")
    assert message.startswith("FILE is not a routing trace") and "pickle" not in message
