"""Routing traces: which experts each token chose at each MoE layer, in the shared format.

The format (``../shared/traces/FORMAT.md``) is one ``.npz``: ``expert_ids`` int16
``[T, L, K]`` (-1 = not recorded), optional ``weights`` float32 ``[T, L, K]``,
``offsets`` int64 ``[S+1]`` (sequence boundaries), optional ``labels``/``text`` ``[S]``,
and scalars ``num_experts``, ``phase``, ``model``, optional ``label_source``. The
simulator replays these; the engine records its own runs with ``TraceRecorder``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REQUIRED_KEYS = ("expert_ids", "offsets", "num_experts", "phase", "model")
PHASES = ("prefill", "decode", "mixed")  # "mixed": a recorded run with both


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
    if trace.num_experts < 1:
        raise ValueError(f"{source}: num_experts must be positive, got {trace.num_experts}")
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
    if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(ids):
        raise ValueError(
            f"{source}: offsets must run from 0 to the {len(ids)} tokens, got "
            f"{off[:1].tolist()}..{off[-1:].tolist()} ({len(off)} values)"
        )
    if np.any(np.diff(off) < 0):
        raise ValueError(f"{source}: offsets must not decrease")
    for name in ("labels", "text"):
        value = getattr(trace, name)
        if value is not None and len(value) != trace.num_sequences:
            raise ValueError(
                f"{source}: {name} has {len(value)} entries for {trace.num_sequences} sequences"
            )
    if trace.phase not in PHASES:
        raise ValueError(f"{source}: phase must be one of {', '.join(PHASES)}, not {trace.phase!r}")


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No trace at {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a routing trace (.npz): {e}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not a routing trace (.npz)")
    with data:
        missing = [k for k in REQUIRED_KEYS if k not in data.files]
        if missing:
            raise ValueError(
                f"{path} is missing {', '.join(missing)}; see traces/FORMAT.md for the keys"
            )
        try:
            trace = Trace(
                expert_ids=data["expert_ids"],
                offsets=data["offsets"].astype(np.int64),
                num_experts=int(data["num_experts"]),
                phase=str(data["phase"]),
                model=str(data["model"]),
                weights=data["weights"].astype(np.float32) if "weights" in data.files else None,
                labels=data["labels"] if "labels" in data.files else None,
                text=data["text"] if "text" in data.files else None,
                label_source=str(data["label_source"]) if "label_source" in data.files else None,
            )
        except (TypeError, ValueError) as e:  # a scalar that is an array, a non-number
            raise ValueError(f"{path}: malformed field: {e}") from None
    validate(trace, str(path))
    return trace


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


class TraceRecorder:
    """Collects the engine's routing, one MoE layer call at a time, and saves a trace.

    ``record(layer, ids)`` takes one token's ``[K]`` choices or a prefill chunk's
    ``[..., K]``; a token is complete when every layer has recorded it. ``end_sequence``
    closes a prompt (the next record starts a new one).
    """

    def __init__(self, num_experts: int, model: str = "", phase: str | None = None, text: str = ""):
        self.num_experts = num_experts
        self.model = model
        self.phase = phase  # None: decided from what was recorded
        self._ids: dict[int, list[np.ndarray]] = {}
        self._weights: dict[int, list[np.ndarray]] = {}
        self._chunk_sizes: list[int] = []  # tokens per layer-0 call: 1 = decode
        self._bounds: list[int] = [0]
        self._labels: list[str] = []
        self._text: list[str] = []
        self.pending_text = text  # the prompt of the open sequence, when known

    def record(self, layer_index: int, expert_ids, weights=None) -> None:
        ids = np.asarray(expert_ids)
        k = ids.shape[-1] if ids.ndim else 1
        ids = ids.reshape(-1, k).astype(np.int16)
        self._ids.setdefault(layer_index, []).append(ids)
        if weights is not None:
            w = np.asarray(weights, np.float32).reshape(ids.shape)
            self._weights.setdefault(layer_index, []).append(w)
        if layer_index == min(self._ids):
            self._chunk_sizes.append(len(ids))

    def _tokens(self) -> int:
        return sum(len(a) for a in self._ids[min(self._ids)]) if self._ids else 0

    def end_sequence(self, label: str | None = None, text: str | None = None) -> None:
        if self._tokens() > self._bounds[-1]:
            self._bounds.append(self._tokens())
            self._labels.append(label or "")
            self._text.append(text or self.pending_text or "")
            self.pending_text = ""

    def to_trace(self) -> Trace:
        self.end_sequence()
        if not self._ids:
            raise ValueError("Nothing was recorded: the model routed no tokens.")
        layers = sorted(self._ids)
        k = max(a.shape[1] for chunks in self._ids.values() for a in chunks)
        columns = []
        for layer in layers:
            ids = np.concatenate([_pad(a, k, -1) for a in self._ids[layer]])
            columns.append(ids)
        tokens = {len(c) for c in columns}
        if len(tokens) != 1:
            raise ValueError(f"Layers recorded different token counts: {sorted(tokens)}")
        weights = None
        if self._weights and sorted(self._weights) == layers:
            weights = np.stack(
                [np.concatenate([_pad(a, k, 0.0) for a in self._weights[x]]) for x in layers], 1
            )
        phase = self.phase
        if phase is None:
            sizes = set(self._chunk_sizes)
            phase = "decode" if sizes == {1} else "prefill" if 1 not in sizes else "mixed"
        has_text = any(self._text)
        return Trace(
            expert_ids=np.stack(columns, 1),
            offsets=np.asarray(self._bounds, np.int64),
            num_experts=self.num_experts,
            phase=phase,
            model=self.model,
            weights=weights if weights is None or weights.shape[0] == len(columns[0]) else None,
            labels=np.asarray(self._labels) if any(self._labels) else None,
            text=np.asarray(self._text) if has_text else None,
        )

    def save(self, path: str | Path) -> None:
        save_trace(path, self.to_trace())


def _pad(a: np.ndarray, k: int, fill) -> np.ndarray:
    if a.shape[1] == k:
        return a
    return np.concatenate([a, np.full((len(a), k - a.shape[1]), fill, a.dtype)], 1)


def attach_recorder(engine, text: str | None = None) -> TraceRecorder:
    """Record every routed token of ``engine`` from now on (its cache's ``on_tokens`` hook)."""
    cache = engine.paged.cache
    if cache is None:
        raise ValueError("This model has no routed experts: there is no routing to record.")
    recorder = TraceRecorder(engine.info.experts_per_layer, engine.info.name, text=text or "")
    cache.on_tokens = recorder.record
    return recorder
