"""The parsers of untrusted files, fuzzed (tests/fuzz_targets.py): a few hundred cases
each here, 100,000 in scripts/fuzz_parsers.py. Plus the cases fuzzing must never reach
by luck: length fields of 2**60 refused before anything of that size is allocated."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fuzz_targets import (
    FUZZER_INPUTS,
    MEMBER_SEP,
    TARGETS,
    VALID_FILES,
    VALID_TRACE,
    _forged_npy,
    _npz_member,
    _valid_trace,
    trace_input,
    trace_seeds,
    unzip_members,
    zip_members,
)
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


# ---- found by scripts/fuzz_parsers.py (atheris), or reading numpy's loader to fix those --


def _trace_with(tmp_path, name: str, content: bytes, method: int = zipfile.ZIP_STORED):
    """A valid trace whose member ``name`` is replaced by ``content``."""
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key, value in _valid_trace().items():
            if key != name.removesuffix(".npy"):
                z.writestr(f"{key}.npy", _npz_member(value))
        z.writestr(zipfile.ZipInfo(name), content, compress_type=method)
    return path


def test_array_header_the_tokenizer_chokes_on_is_refused(tmp_path):
    # An unclosed bracket: numpy retries the header as Python 2's, and tokenize raises
    # TokenError, which is no ValueError.
    header = b"{'descr': '<i8', 'fortran_or\0\0("
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
    path = _trace_with(tmp_path, "offsets.npy", member)
    with pytest.raises(ValueError, match="is not a routing trace .an array header is malformed"):
        load_trace(path)


def test_array_without_npy_suffix_is_checked_before_loading(tmp_path):
    # numpy reads member "expert_ids" as an array too: unchecked, its header made numpy
    # allocate 2**41 bytes before finding 16.
    path = _trace_with(tmp_path, "expert_ids", _forged_npy((2**40,), "<i2", b"\0" * 16))

    def parse():
        with pytest.raises(ValueError, match="expert_ids announces .* bytes but holds"):
            load_trace(path)

    assert _peak_bytes(parse) < 2**20


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_member_packed_as_numpy_never_does_is_refused(tmp_path, method):
    # bzip2 and LZMA unpack a few KB to GB: a 456 KB file made 6.4 GB
    path = _trace_with(tmp_path, "weights.npy", _npz_member(np.zeros((6, 2, 2), np.float32)),
                       method)  # fmt: skip
    with pytest.raises(ValueError, match="weights.npy is packed with method"):
        load_trace(path)


def test_member_claiming_more_than_deflate_can_unpack_is_refused(tmp_path):
    path = _trace_with(tmp_path, "weights.npy", _npz_member(np.zeros((6, 2, 2), np.float32)),
                       zipfile.ZIP_DEFLATED)  # fmt: skip
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("weights.npy")
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # the first central directory entry...
    while data[central + 46 : central + 46 + len("weights.npy")] != b"weights.npy":
        central = data.find(b"PK\x01\x02", central + 4)  # ...until the one of weights.npy
    claimed = info.compress_size * 2000
    data[central + 24 : central + 28] = struct.pack("<I", claimed)  # uncompressed size
    path.write_bytes(bytes(data))

    def parse():
        with pytest.raises(ValueError, match=f"weights.npy claims to unpack .* to {claimed}"):
            load_trace(path)

    assert _peak_bytes(parse) < 2**20


@pytest.mark.parametrize("key", ["phase", "num_experts"])
def test_text_beyond_unicode_is_refused(tmp_path, key):
    # numpy stores each character as a 32-bit number; str() or int() of one past
    # U+10FFFF raised SystemError
    text = np.frombuffer(struct.pack("<I", 0x110000), "<U1").reshape(())
    path = _trace_with(tmp_path, f"{key}.npy", _npz_member(text))
    with pytest.raises(ValueError, match=f"{key} holds a character beyond Unicode"):
        load_trace(path)


def test_required_member_that_is_no_array_is_refused(tmp_path):
    # numpy hands a member without the npy magic over as bytes: validate() then met
    # bytes where it wanted an array (AttributeError)
    path = _trace_with(tmp_path, "expert_ids.npy", b"just bytes")
    with pytest.raises(ValueError, match="expert_ids is not a numpy array"):
        load_trace(path)


# ---- scripts/fuzz_parsers.py ---------------------------------------------------------

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_parsers.py"


@pytest.mark.parametrize("name", list(TARGETS))
def test_the_fuzzer_starts_from_a_file_each_parser_accepts(name):
    as_file, seeds = FUZZER_INPUTS.get(name, (lambda d: d, lambda f: [f]))
    for seed in seeds(VALID_FILES[name]):
        assert TARGETS[name][1](as_file(seed)) == "ok"


def test_trace_members_round_trip():
    members = trace_seeds(VALID_TRACE)[1]
    assert members.startswith(b"Z") and members.count(MEMBER_SEP) == len(_valid_trace()) - 1
    assert zip_members(members[1:]) != VALID_TRACE  # stored, not deflated: rebuilt...
    assert unzip_members(trace_input(members)) == members[1:]  # ...with the same members


def _fuzz(tmp_path, *args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("atheris")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "work"), "--seeds", "10",
         *args],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip


def test_fuzz_script_runs_its_cases(tmp_path):
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("mlx-pager-fuzz-*"))
    run = _fuzz(tmp_path, "--only", "saved conversation", "--cases", "2000")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "saved conversation: 2000 cases" in run.stdout and "FINDING" not in run.stdout
    # the child's folders for the files it parsed: made in the work folder, then removed
    assert not list((tmp_path / "work").glob("*-files"))
    assert set(temp.glob("mlx-pager-fuzz-*")) == before


PLANTED = """
import time
from hypothesis import strategies as st

def crash(data):
    if data.startswith(b"{"):
        raise TypeError("planted")
    return "ok"

def hang(data):
    if data.startswith(b"{"):
        time.sleep(60)
    return "ok"

def allocate(data):
    if data.startswith(b"{"):
        return str(len(bytearray(2**31)))  # as a length read from the file would
    return "ok"

TARGETS = {f.__name__: (st.binary(max_size=8), f) for f in (crash, hang, allocate)}
VALID_FILES = {name: b"x" for name in TARGETS}
FUZZER_INPUTS = {}
FUZZER_WORDS = ["{"]
"""


def test_fuzz_script_reports_a_crash_a_hang_and_a_huge_allocation(tmp_path):
    (tmp_path / "planted_targets.py").write_text(PLANTED)
    run = _fuzz(tmp_path, "--targets", "planted_targets", "--cases", "100000", "--hang-s", "2",
                "--jobs", "3")  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    findings = [line for line in run.stdout.splitlines() if "FINDING" in line]
    assert len(findings) == 3, run.stdout
    logs = {name: (tmp_path / "work" / f"{name}.log").read_text() for name in
            ("crash", "hang", "allocate")}  # fmt: skip
    assert "TypeError: planted" in logs["crash"]
    assert "timeout" in logs["hang"].lower()
    assert "MemoryError" in logs["allocate"]
    for finding in findings:  # each saved the input that did it
        saved = re.findall(r"'([^']+-(?:crash|timeout|oom)-[0-9a-f]+)'", finding)
        assert saved and Path(saved[0]).read_bytes().startswith(b"{"), finding
