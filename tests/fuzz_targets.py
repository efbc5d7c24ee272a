"""Fuzz targets for the parsers that read what a stranger's repository (or a hand-edited
file) holds: one hypothesis strategy and one check per parser. The suite runs a few
hundred cases of each (tests/test_fuzz.py); scripts/fuzz_parsers.py runs 100,000.

Every case must end in success or in a ValueError (CheckpointError, ConversationError...)
whose message names the file: never another exception type, a crash or a hang.
FileNotFoundError naming the model folder is allowed for a shard index whose shards are
not there (that message says to download again).
"""

from __future__ import annotations

import atexit
import io
import json
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tomli_w
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlx_pager_app.conversations import load_conversation

from mlx_pager.settings import Settings, load_settings, save_settings
from mlx_pager.sim.trace import REQUIRED_KEYS, load_trace
from mlx_pager.storage.checkpoint import (
    CONFIG_COUNTS,
    DTYPE_SIZES,
    kv_bytes_per_layer_token,
    read_config,
    read_header,
    text_config,
    weight_files,
)

# ---- shared pieces -------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
odd_numbers = st.one_of(
    st.integers(-5, 70),
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, 2**31, 2**32, 2**60, 2**63 - 1, 2**64 - 1, -1]),
    st.booleans(),
    st.floats(),
    st.text(max_size=4),
    st.none(),
)


def mutate(data: bytes, draw) -> bytes:
    """A few byte flips, cuts and insertions of a valid file."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del buf[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[at:]
    return bytes(buf)


def expect_clean(fn: Callable[[], object], path: Path, also: tuple[type, ...] = ()) -> str:
    """Run a parser: 'ok', or the name of the clean error; anything else propagates."""
    try:
        fn()
    except ValueError as e:
        message = str(e)
        assert str(path) in message or path.name in message, f"error names no file: {message}"
        assert "allow_pickle" not in message and "pickle.load" not in message, message
        return type(e).__name__
    except also as e:
        assert str(path.parent) in str(e) or str(path) in str(e), str(e)
        return type(e).__name__
    return "ok"


_FOLDERS: dict[str, Path] = {}


def folder(name: str, setup: Callable[[Path], None] | None = None) -> Path:
    """One folder per parser and process, made (and ``setup`` run) once and removed when
    the process exits; each case overwrites the one file it parses. A fresh folder per
    case cost more than most parsers do (scripts/fuzz_parsers.py runs 100,000 cases of
    each)."""
    path = _FOLDERS.get(name)
    if path is None or not path.is_dir():
        path = _FOLDERS[name] = Path(tempfile.mkdtemp(prefix=f"mlx-pager-fuzz-{name}-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        if setup is not None:
            setup(path)
    return path


# ---- safetensors header --------------------------------------------------------------


@st.composite
def tensor_entry(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_value)
    entry = {}
    if draw(st.integers(0, 12)):
        entry["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), json_value))
    if draw(st.integers(0, 12)):
        entry["shape"] = draw(st.one_of(st.lists(odd_numbers, max_size=4), json_value))
    if draw(st.integers(0, 12)):
        entry["data_offsets"] = draw(st.one_of(st.lists(odd_numbers, max_size=3), json_value))
    return entry


def _valid_safetensors() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(32))


VALID_SAFETENSORS = _valid_safetensors()


@st.composite
def safetensors_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "structured", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "mutated":
        return mutate(VALID_SAFETENSORS, draw)
    header = draw(
        st.one_of(
            st.dictionaries(st.text(max_size=8), tensor_entry(), max_size=4),
            json_value,
        )
    )
    raw = json.dumps(header).encode()
    length = draw(
        st.one_of(
            st.just(len(raw)),
            st.integers(0, 2**64 - 1),
            st.sampled_from([2**60, 2**63, 2**64 - 1, len(raw) + 1, max(len(raw) - 1, 0)]),
        )
    )
    data = draw(st.binary(max_size=64))
    return struct.pack("<Q", length) + raw + data


def check_safetensors(data: bytes) -> str:
    path = folder("safetensors") / "model.safetensors"
    path.write_bytes(data)

    def parse() -> None:
        tensors = read_header(path)
        size = path.stat().st_size
        for t in tensors.values():
            assert 0 <= t.offset and t.offset + t.nbytes <= size, t
            assert all(d >= 0 for d in t.shape), t

    return expect_clean(parse, path)


# ---- model.safetensors.index.json ----------------------------------------------------

shard_name = st.one_of(
    st.sampled_from(
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "../outside.safetensors",
            "/etc/passwd",
            "sub/../../x.safetensors",
            "C:\\x.safetensors",
            "",
            ".",
            "model.safetensors",
        ]
    ),
    st.text(max_size=12),
    json_value,
)


@st.composite
def index_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "structured", "json"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "json":
        return json.dumps(draw(json_value)).encode()
    weight_map = draw(
        st.one_of(st.dictionaries(st.text(max_size=6), shard_name, max_size=4), json_value)
    )
    body = {"metadata": draw(json_value), "weight_map": weight_map}
    return json.dumps(body).encode()


def check_index(data: bytes) -> str:
    model = folder("index", _model_folder) / "model"
    path = model / "model.safetensors.index.json"
    path.write_bytes(data)

    def parse() -> None:
        for f in weight_files(model):
            assert f.resolve().parent == model.resolve(), f"escaped the folder: {f}"

    return expect_clean(parse, path, also=(FileNotFoundError,))


def _model_folder(root: Path) -> None:
    """A model folder with one of its two shards, and a shard outside it to escape to."""
    (root / "model").mkdir()
    (root / "outside.safetensors").write_bytes(VALID_SAFETENSORS)
    (root / "model" / "model-00001-of-00002.safetensors").write_bytes(VALID_SAFETENSORS)
    (root / "model" / "model.safetensors").write_bytes(VALID_SAFETENSORS)


# ---- config.json ---------------------------------------------------------------------


@st.composite
def config_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "structured", "structured"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "json":
        return json.dumps(draw(json_value)).encode()
    keys = draw(st.lists(st.sampled_from(sorted(CONFIG_COUNTS)), max_size=8, unique=True))
    config = {k: draw(st.one_of(st.integers(-2, 5000), odd_numbers)) for k in keys}
    if draw(st.booleans()):
        config["model_type"] = draw(st.one_of(st.just("qwen3_moe"), json_leaf))
    if draw(st.integers(0, 3)) == 0:
        sub = {k: draw(odd_numbers) for k in draw(st.lists(st.sampled_from(sorted(CONFIG_COUNTS))))}
        config["text_config"] = draw(st.one_of(st.just(sub), json_value))
    return json.dumps(config).encode()


def check_config(data: bytes) -> str:
    path = folder("config") / "config.json"
    path.write_bytes(data)

    def parse() -> None:
        config = read_config(path.parent)
        assert isinstance(text_config(config), dict)
        assert kv_bytes_per_layer_token(config, 2) >= 0

    return expect_clean(parse, path)


# ---- routing traces (.npz) -----------------------------------------------------------

small_arrays = st.one_of(
    hnp.arrays(
        st.sampled_from([np.int16, np.int64, np.uint8, np.float32, np.bool_, np.float64]),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
    ),
    hnp.arrays(hnp.unicode_string_dtypes(max_len=4), hnp.array_shapes(min_dims=0, max_dims=1)),
    st.integers(-(2**40), 2**40).map(np.asarray),
    st.sampled_from(["prefill", "decode", "x"]).map(np.asarray),
)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _valid_trace() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "expert_ids": rng.integers(0, 8, (6, 2, 2)).astype(np.int16),
        "offsets": np.array([0, 3, 6], np.int64),
        "num_experts": np.asarray(8),
        "phase": np.asarray("decode"),
        "model": np.asarray("m"),
        "weights": rng.random((6, 2, 2)).astype(np.float32),
    }


VALID_TRACE = _npz(_valid_trace())


def _forged_npy(shape: tuple[int, ...], descr: str, body: bytes) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - len(header) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


@st.composite
def trace_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "arrays", "valid-changed", "mutated", "forged"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "mutated":
        return mutate(VALID_TRACE, draw)
    if kind == "forged":  # a header that announces more than the member holds
        buf = io.BytesIO()
        shape = tuple(draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=3)))
        descr = draw(st.sampled_from(["<i2", "<f4", "|O", "<U1000", "|V8"]))
        name = draw(st.sampled_from(list(REQUIRED_KEYS) + ["weights", "labels"]))
        with zipfile.ZipFile(buf, "w") as z:
            for key, value in _valid_trace().items():
                if key != name:
                    z.writestr(f"{key}.npy", _npz_member(value))
            z.writestr(f"{name}.npy", _forged_npy(shape, descr, draw(st.binary(max_size=32))))
        return buf.getvalue()
    arrays = _valid_trace() if kind == "valid-changed" else {}
    keys = list(REQUIRED_KEYS) + ["weights", "labels", "text", "label_source", "junk"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=5, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            arrays.pop(key, None)
        else:
            arrays[key] = draw(small_arrays)
    if draw(st.integers(0, 10)) == 0:  # pickled objects: must be refused, never loaded
        arrays[draw(st.sampled_from(keys))] = np.array([{"a": 1}, None], dtype=object)
    return _npz(arrays)


def _npz_member(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def check_trace(data: bytes) -> str:
    path = folder("trace") / "trace.npz"
    path.write_bytes(data)

    def parse() -> None:
        trace = load_trace(path)
        assert trace.expert_ids.ndim == 3
        assert trace.num_sequences >= 0
        trace.sequences(0, trace.num_sequences)

    return expect_clean(parse, path)


# ---- settings (TOML) -----------------------------------------------------------------

toml_leaf = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["auto", "6GB", "1.5GB", "0", "0GB", "1e9", "lru", "pread", "4bit", "-1"]),
)
toml_value = st.recursive(
    toml_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
SETTING_NAMES = [f for f in Settings.__dataclass_fields__]


@st.composite
def settings_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "text", "structured", "structured"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "text":
        return draw(st.text(max_size=120)).encode()
    keys = draw(st.lists(st.sampled_from([*SETTING_NAMES, "junk"]), max_size=6, unique=True))
    body = {k: draw(toml_value) for k in keys}
    try:
        return tomli_w.dumps(body).encode()
    except (TypeError, ValueError):  # a value TOML cannot hold
        return b"budget = 'auto'\n"


def check_settings(data: bytes) -> str:
    path = folder("settings") / "settings.toml"
    path.write_bytes(data)

    def parse() -> None:
        settings = load_settings(path)
        assert settings.budget_bytes(8 * 10**9) > 0
        save_settings(settings, path)
        assert load_settings(path) == settings

    return expect_clean(parse, path)


# ---- saved conversations (JSON) ------------------------------------------------------

message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": st.text()}
    ),
    json_value,
)


@st.composite
def conversation_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "structured", "structured"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "json":
        return json.dumps(draw(json_value)).encode()
    body: dict = {}
    for key in ("id", "model", "created", "updated"):
        if draw(st.booleans()):
            body[key] = draw(
                st.one_of(
                    st.text(max_size=10),
                    st.sampled_from(["../../x", "/tmp/x", "20260101-000000-abcdef"]),
                    json_leaf,
                )
            )
    body["messages"] = draw(st.one_of(st.lists(message, max_size=4), json_value))
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode()


def check_conversation(data: bytes) -> str:
    chats = folder("conversation")
    path = chats / "20260101-000000-abcdef.json"
    path.write_bytes(data)

    def parse() -> None:
        chat = load_conversation(path)
        assert (chats / f"{chat.id}.json").resolve().parent == chats.resolve()
        assert isinstance(chat.title, str)

    return expect_clean(parse, path)


# ---- what scripts/fuzz_parsers.py starts from -----------------------------------------

MEMBER_SEP = b"\n--member--\n"


def zip_members(data: bytes) -> bytes:
    """An .npz holding the members ``data`` lists (``NAME\\0CONTENT``, separated by
    MEMBER_SEP), stored with correct checksums: a byte-level fuzzer mutating these reaches
    numpy's array headers, where mutating the archive itself mostly breaks a CRC."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for member in data.split(MEMBER_SEP):
            name, _, content = member.partition(b"\0")
            z.writestr(name.decode("latin-1") or "x", content)
    return buf.getvalue()


def unzip_members(data: bytes) -> bytes | None:
    """The inverse of zip_members for a readable archive; None for anything else."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return MEMBER_SEP.join(
                i.filename.encode("latin-1", "replace") + b"\0" + z.read(i) for i in z.infolist()
            )
    except Exception:  # zipfile raises many types on odd archives: not a seed, then
        return None


def trace_input(data: bytes) -> bytes:
    """A fuzzer's bytes as a trace file: after a ``Z``, the members zip_members packs."""
    return zip_members(data[1:]) if data[:1] == b"Z" else data


def trace_seeds(trace: bytes) -> list[bytes]:
    """A trace file as trace_input's seeds: itself, and its members after a ``Z``."""
    members = unzip_members(trace)
    return [trace] if members is None else [trace, b"Z" + members]


def _valid_json(value: object) -> bytes:
    return json.dumps(value).encode()


# A file each parser accepts: the fuzzer's first seed, so its mutations start deep.
VALID_FILES = {
    "safetensors header": VALID_SAFETENSORS,
    "shard index": _valid_json(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}}
    ),
    "config.json": _valid_json(
        {
            "model_type": "qwen3_moe",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "text_config": {"hidden_size": 64},
        }
    ),
    "routing trace": VALID_TRACE,
    "settings TOML": tomli_w.dumps(
        {k: v for k, v in Settings().__dict__.items() if v is not None}
    ).encode(),
    "saved conversation": _valid_json(
        {
            "id": "20260101-000000-abcdef",
            "model": "org/model",
            "created": "2026-01-01T00:00:00",
            "updated": "2026-01-01T00:00:00",
            "messages": [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi **there**"},
            ],
        }
    ),
}


# Words the parsers look for: scripts/fuzz_parsers.py's mutations try them.
FUZZER_WORDS = [
    *CONFIG_COUNTS, *DTYPE_SIZES, *SETTING_NAMES, "dtype", "shape", "data_offsets",
    "__metadata__", "weight_map", "text_config", "model_type", "messages", "role", "content",
    "user", "assistant", "id", "descr", "fortran_order", "\x93NUMPY", "expert_ids",
    "offsets", "num_experts", "phase", "decode", ".npy", "auto", "GB", "true", "false",
    "../", ".safetensors", "-1", "1e309",
]  # fmt: skip

# name -> (a fuzzer's bytes -> the file to parse, a file -> the fuzzer's seeds); the
# others take a fuzzer's bytes as the file
FUZZER_INPUTS = {"routing trace": (trace_input, trace_seeds)}

# name -> (strategy of file contents, check)
TARGETS: dict[str, tuple[st.SearchStrategy[bytes], Callable[[bytes], str]]] = {
    "safetensors header": (safetensors_files(), check_safetensors),
    "shard index": (index_files(), check_index),
    "config.json": (config_files(), check_config),
    "routing trace": (trace_files(), check_trace),
    "settings TOML": (settings_files(), check_settings),
    "saved conversation": (conversation_files(), check_conversation),
}
