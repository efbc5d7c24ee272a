"""Routing traces: which experts each token chose at each MoE layer, in the shared format.

The format (``docs/trace-format.md``) is one ``.npz``: ``expert_ids`` int16
``[T, L, K]`` (-1 = not recorded), optional ``weights`` float32 ``[T, L, K]``,
``offsets`` int64 ``[S+1]`` (sequence boundaries), optional ``labels``/``text`` ``[S]``,
and scalars ``num_experts``, ``phase`` (``prefill`` or ``decode``), ``model``, optional
``label_source``. The simulator replays these; the engine records its own runs with
``TraceRecorder``, which keeps a run's prompt and reply tokens apart: one trace each.
"""

from __future__ import annotations

import math
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REQUIRED_KEYS = ("expert_ids", "offsets", "num_experts", "phase", "model")
OPTIONAL_KEYS = ("weights", "labels", "text", "label_source")
PHASES = ("prefill", "decode")  # a trace holds one: a recorded run writes one of them
MAX_EXPERTS = 2**15  # expert ids are int16
MAX_TRACE_BYTES = 4 * 2**30  # arrays of one trace, unpacked: refused above, before loading
# numpy writes members stored or deflated; deflate unpacks at most about 1,032 bytes per
# byte, so a member claiming more than that came from no numpy (a "zip bomb").
MAX_DEFLATE_RATIO = 1032


@dataclass
class Trace:
    expert_ids: np.ndarray  # int16 [T, L, K]
    offsets: np.ndarray  # int64 [S + 1]
    num_experts: int
    phase: str
    model: str
    weights: np.ndarray | None = None  # float32 [T, L, K]
    labels: np.ndarray | None = None  # str [S]
    text: np.ndarray | None = None  # str [S]
    label_source: str | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def sequences(self, start: int, stop: int) -> Trace:
        """Sequences ``start:stop`` as a trace of their own (held-out halves, one prompt)."""
        start, stop, _ = slice(start, stop).indices(self.num_sequences)
        lo, hi = int(self.offsets[start]), int(self.offsets[max(start, stop)])
        pick = slice(start, max(start, stop))
        return replace(
            self,
            expert_ids=self.expert_ids[lo:hi],
            weights=None if self.weights is None else self.weights[lo:hi],
            offsets=self.offsets[start : max(start, stop) + 1] - lo,
            labels=None if self.labels is None else self.labels[pick],
            text=None if self.text is None else self.text[pick],
        )


def validate(trace: Trace, source: str = "trace") -> None:
    """Raise ValueError naming what is wrong, so a bad file fails before a long replay."""
    ids = trace.expert_ids
    if ids.ndim != 3:
        raise ValueError(f"{source}: expert_ids must be [tokens, layers, k], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{source}: expert_ids must be integers, got {ids.dtype}")
    if not 1 <= trace.num_experts <= MAX_EXPERTS:
        raise ValueError(
            f"{source}: num_experts must be from 1 to {MAX_EXPERTS}, got {trace.num_experts}"
        )
    if ids.size and (ids.min() < -1 or ids.max() >= trace.num_experts):
        raise ValueError(
            f"{source}: expert_ids must lie in -1..{trace.num_experts - 1}, "
            f"found {ids.min()}..{ids.max()}"
        )
    if trace.weights is not None and trace.weights.shape != ids.shape:
        raise ValueError(
            f"{source}: weights shape {trace.weights.shape} differs from expert_ids {ids.shape}"
        )
    off = trace.offsets
    if off.ndim != 1:
        raise ValueError(f"{source}: offsets must be a list of token positions, got {off.shape}")
    if len(off) < 1 or off[0] != 0 or off[-1] != len(ids):
        raise ValueError(
            f"{source}: offsets must run from 0 to the {len(ids)} tokens, got "
            f"{off[:1].tolist()}..{off[-1:].tolist()} ({len(off)} values)"
        )
    if np.any(np.diff(off) < 0):
        raise ValueError(f"{source}: offsets must not decrease")
    for name in ("labels", "text"):
        value = getattr(trace, name)
        if value is not None and np.ndim(value) != 1:
            raise ValueError(f"{source}: {name} must be a list of strings, one per sequence")
        if value is not None and len(value) != trace.num_sequences:
            raise ValueError(
                f"{source}: {name} has {len(value)} entries for {trace.num_sequences} sequences"
            )
    if trace.phase not in PHASES:
        raise ValueError(f"{source}: phase must be one of {', '.join(PHASES)}, not {trace.phase!r}")


def _refuse(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path} is not a routing trace ({what}): pass a .npz written by "
        "`mlx-pager generate --record-trace` or `mlx-pager profile --export-trace`."
    )


def _check_members(path: Path) -> None:
    """Read each member's size and array header before numpy does: a member that claims
    to unpack to more than its bytes can hold, an array header announcing more bytes than
    its member holds, or Python objects (pickled data, which could run code), is refused
    before anything is allocated, unpacked or unpickled. Every member is checked: numpy
    reads ``expert_ids`` as an array whether or not its name ends in ``.npy``."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise _refuse(path, "a single .npy array, not an .npz of arrays")
    if not magic.startswith(b"PK"):
        raise _refuse(path, "not an .npz file")
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_packing(path, info)
                total += _announced_bytes(path, archive, info)
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise _refuse(path, "an array header is malformed") from None
    # numpy parses a header as a Python literal: junk there fails in the tokenizer or parser
    except (tokenize.TokenError, SyntaxError, RecursionError):
        raise _refuse(path, "an array header is malformed") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError,
            NotImplementedError, RuntimeError, KeyError, OverflowError):  # fmt: skip
        raise _refuse(path, "a broken .npz archive") from None
    if total > MAX_TRACE_BYTES:
        raise _refuse(path, f"{total} bytes of arrays, more than the {MAX_TRACE_BYTES} replayed")


def _check_packing(path: Path, info: zipfile.ZipInfo) -> None:
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _refuse(path, f"{info.filename} is packed with method {info.compress_type}, "
                      "which numpy never writes")  # fmt: skip
    limit = max(info.compress_size, 1) * (
        MAX_DEFLATE_RATIO if info.compress_type == zipfile.ZIP_DEFLATED else 1
    )
    if info.file_size > limit:
        raise _refuse(path, f"{info.filename} claims to unpack {info.compress_size} bytes "
                      f"to {info.file_size}")  # fmt: skip


def _announced_bytes(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """The bytes an array member's header announces (0 for a member that is no array)."""
    with archive.open(info) as member:
        if member.read(6) != b"\x93NUMPY":
            return 0  # numpy hands such a member over as its bytes, at most file_size
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise _refuse(path, f"{info.filename} has npy version {version}")
    if dtype.hasobject:
        raise _refuse(
            path,
            f"{info.filename} holds Python objects; mlx-pager never unpickles data from a file",
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size:
        raise _refuse(path, f"{info.filename} announces {nbytes} bytes but holds {info.file_size}")
    return nbytes


def load_trace(path: str | Path) -> Trace:
    """A trace file, checked: a ValueError naming the file for anything not a trace."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No trace at {path}")
    if not path.is_file():
        raise _refuse(path, "not a file")
    _check_members(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in REQUIRED_KEYS if k not in data.files]
            if missing:
                raise ValueError(
                    f"{path} is missing {', '.join(missing)}; see docs/trace-format.md for the keys"
                )
            keys = [k for k in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if k in data.files]
            arrays = {k: _array(data, k, path) for k in keys}
            trace = Trace(
                expert_ids=arrays["expert_ids"],
                offsets=_whole_numbers(arrays["offsets"], path, "offsets"),
                num_experts=int(arrays["num_experts"]),
                phase=str(arrays["phase"]),
                model=str(arrays["model"]),
                weights=arrays["weights"].astype(np.float32) if "weights" in arrays else None,
                labels=arrays.get("labels"),
                text=arrays.get("text"),
                label_source=str(arrays["label_source"]) if "label_source" in arrays else None,
            )
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: malformed field ({_safe(e)})") from None
    except (TypeError, OverflowError):  # a scalar that is an array, a non-number
        raise ValueError(f"{path}: malformed field (a scalar is not a single value)") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError):
        raise _refuse(path, "a broken .npz archive") from None
    validate(trace, str(path))
    return trace


def _whole_numbers(values: np.ndarray, path: Path, name: str) -> np.ndarray:
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{path}: {name} must be whole numbers, got {values.dtype}")
    return values.astype(np.int64)


def _array(data, key: str, path: Path) -> np.ndarray:
    """One member as an array: numpy hands a member that is no .npy over as its bytes,
    and stores each character of a string array as a 32-bit number, where one past
    U+10FFFF makes every later str() or int() of the array raise SystemError."""
    value = data[key]
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{path}: {key} is not a numpy array")
    if value.dtype.kind == "U" and value.size:
        codes = np.ascontiguousarray(value).reshape(-1)
        codes = codes.view(value.dtype.byteorder.replace("|", "=") + "u4")
        if codes.max() > 0x10FFFF:
            raise ValueError(f"{path}: {key} holds a character beyond Unicode")
    return value


def _safe(error: Exception) -> str:
    """numpy's message, unless it advises loading the file unsafely: never pass that on."""
    text = str(error)
    return "unreadable array" if "pickle" in text.lower() else text


def save_trace(path: str | Path, trace: Trace) -> None:
    validate(trace)
    arrays: dict[str, np.ndarray] = {
        "expert_ids": trace.expert_ids.astype(np.int16),
        "offsets": np.asarray(trace.offsets, np.int64),
        "num_experts": np.asarray(trace.num_experts, np.int64),
        "phase": np.asarray(trace.phase),
        "model": np.asarray(trace.model),
    }
    if trace.weights is not None:
        arrays["weights"] = trace.weights.astype(np.float32)
    if trace.labels is not None:
        arrays["labels"] = np.asarray(trace.labels, str)
    if trace.text is not None:
        arrays["text"] = np.asarray(trace.text, str)
    if trace.label_source is not None:
        arrays["label_source"] = np.asarray(trace.label_source)
    with open(path, "wb") as f:  # np.savez would append .npz to any other suffix
        np.savez_compressed(f, **arrays)


class _Phase:
    """The tokens of one phase a recorder has seen, layer by layer, and their sequences."""

    def __init__(self) -> None:
        self.ids: dict[int, list[np.ndarray]] = {}
        self.weights: dict[int, list[np.ndarray]] = {}
        self.bounds: list[int] = [0]
        self.labels: list[str] = []
        self.text: list[str] = []

    def tokens(self) -> int:
        return sum(len(a) for a in self.ids[min(self.ids)]) if self.ids else 0


class TraceRecorder:
    """Collects the engine's routing, one MoE layer call at a time, and saves a trace.

    ``record(layer, ids, weights, phase)`` takes one token's ``[K]`` choices or a prefill
    chunk's ``[..., K]``, of the prompt (``"prefill"``) or of the reply (``"decode"``;
    ``attach_recorder`` asks the cache which); a token is complete when every layer has
    recorded it. A trace holds one phase (docs/trace-format.md), so ``to_trace`` and ``save`` write
    the recorder's ``phase`` unless told the other. ``end_sequence`` closes a prompt (the
    next record starts a new one) in both.
    """

    def __init__(
        self, num_experts: int, model: str = "", phase: str = "decode", text: str = ""
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, not {phase!r}")
        self.num_experts = num_experts
        self.model = model
        self.phase = phase  # what ``save`` writes
        self._phases = {name: _Phase() for name in PHASES}
        self.pending_text = text  # the prompt of the open sequence, when known

    def record(self, layer_index: int, expert_ids, weights=None, phase: str | None = None) -> None:
        part = self._phases[phase or self.phase]
        ids = np.asarray(expert_ids)
        k = ids.shape[-1] if ids.ndim else 1
        ids = ids.reshape(-1, k).astype(np.int16)
        part.ids.setdefault(layer_index, []).append(ids)
        if weights is not None:
            w = np.asarray(weights, np.float32).reshape(ids.shape)
            part.weights.setdefault(layer_index, []).append(w)

    def end_sequence(self, label: str | None = None, text: str | None = None) -> None:
        closed = False
        for part in self._phases.values():
            if part.tokens() > part.bounds[-1]:
                part.bounds.append(part.tokens())
                part.labels.append(label or "")
                part.text.append(text or self.pending_text or "")
                closed = True
        if closed:
            self.pending_text = ""

    def to_trace(self, phase: str | None = None) -> Trace:
        """The tokens of ``phase`` (default: the recorder's), as one trace."""
        self.end_sequence()
        phase = phase or self.phase
        part = self._phases[phase]
        if not part.ids:
            raise ValueError(f"Nothing was recorded in the {phase} phase: no tokens routed.")
        layers = sorted(part.ids)
        k = max(a.shape[1] for chunks in part.ids.values() for a in chunks)
        columns = []
        for layer in layers:
            ids = np.concatenate([_pad(a, k, -1) for a in part.ids[layer]])
            columns.append(ids)
        tokens = {len(c) for c in columns}
        if len(tokens) != 1:
            raise ValueError(f"Layers recorded different token counts: {sorted(tokens)}")
        weights = None
        if part.weights and sorted(part.weights) == layers:
            weights = np.stack(
                [np.concatenate([_pad(a, k, 0.0) for a in part.weights[x]]) for x in layers], 1
            )
        return Trace(
            expert_ids=np.stack(columns, 1),
            offsets=np.asarray(part.bounds, np.int64),
            num_experts=self.num_experts,
            phase=phase,
            model=self.model,
            weights=weights if weights is None or weights.shape[0] == len(columns[0]) else None,
            labels=np.asarray(part.labels) if any(part.labels) else None,
            text=np.asarray(part.text) if any(part.text) else None,
        )

    def save(self, path: str | Path, phase: str | None = None) -> None:
        save_trace(path, self.to_trace(phase))


def _pad(a: np.ndarray, k: int, fill) -> np.ndarray:
    if a.shape[1] == k:
        return a
    return np.concatenate([a, np.full((len(a), k - a.shape[1]), fill, a.dtype)], 1)


def attach_recorder(engine, text: str | None = None, phase: str = "decode") -> TraceRecorder:
    """Record every routed token of ``engine`` from now on (its run's ``on_tokens`` hook),
    each tagged with the phase the run is in; ``save`` writes ``phase``'s tokens (by
    default the reply's, the ones a paged model waits on token by token)."""
    run = engine.paged.run
    if run is None:
        raise ValueError("This model has no routed experts: there is no routing to record.")
    recorder = TraceRecorder(
        engine.info.experts_per_layer, engine.info.name, phase=phase, text=text or ""
    )

    def record(layer: int, expert_ids, weights=None) -> None:
        recorder.record(layer, expert_ids, weights, phase=run.phase)

    run.on_tokens = record
    return recorder
