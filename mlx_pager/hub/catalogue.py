"""The curated models (assets/catalogue.json): what the Models screen offers to download.

Sizes come from the catalogue itself, so a verdict shows before the Hub answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..assets import asset_path
from ..estimate import ModelSizes


@dataclass(frozen=True)
class CatalogueEntry:
    id: str
    name: str
    architecture: str
    sizes: ModelSizes
    description: str = ""
    notes: str = ""
    source: str = ""


def float_share(model_id: str) -> tuple[float, float]:
    """The floating-point share of (dense, expert) bytes of a checkpoint named
    ``model_id``, for catalogue entries that do not state it: MLX's affine quantisation
    at group size 64 stores a float16 scale and bias per 64 weights, 0.5 bits per weight
    next to ``bits`` packed ones ("-4bit": 0.5 / 4.5); MXFP4 experts have uint8 scales
    (no floats); no quantisation in the name: all floating point."""
    name = model_id.lower()
    bits = re.search(r"(\d+)[-_]?bits?\b", name)
    affine = 0.5 / (int(bits[1]) + 0.5) if bits and int(bits[1]) < 16 else None
    if "mxfp4" in name:
        return (affine if affine is not None else 0.5 / 4.5), 0.0
    if affine is not None:
        return affine, affine
    return 1.0, 1.0


def load_catalogue(path: str | Path | None = None) -> list[CatalogueEntry]:
    """The curated models in assets/catalogue.json. Missing numbers read as 0 (and such
    an entry gets no verdict) so that a hand-written catalogue still lists. The
    floating-point bytes (what the engine widens on a CPU) are ``dense_float_bytes`` and
    ``expert_float_bytes`` where an entry states them, else ``float_share`` of its id;
    they are float16."""
    data = json.loads(Path(path or asset_path("catalogue.json")).read_text())
    entries = []
    for m in data["models"] if isinstance(data, dict) else data:
        model_id = m.get("id") or m.get("repo_id")
        if not model_id:
            continue
        total = m.get("total_bytes") or m.get("download_bytes") or m.get("size_bytes") or 0
        dense, expert = int(m.get("dense_bytes", 0)), int(m.get("expert_bytes", 0))
        dense_share, expert_share = float_share(model_id)
        dense_float = int(m.get("dense_float_bytes", dense * dense_share)) // 2 * 2
        expert_float = int(m.get("expert_float_bytes", expert * expert_share)) // 2 * 2
        sizes = ModelSizes(
            total_bytes=int(total),
            dense_bytes=dense,
            expert_bytes=expert,
            one_expert_bytes=int(m.get("one_expert_bytes", 0)),
            moe_layers=int(m.get("moe_layers", 0)),
            experts=int(m.get("experts", 0)),
            top_k=int(m.get("top_k", 0)),
            kv_bytes_per_token=int(m.get("kv_bytes_per_token", 0)),
            dense_float_bytes=dense_float,
            dense_float_values=dense_float // 2,
            expert_float_bytes=expert_float,
            expert_float_values=expert_float // 2,
        )
        entries.append(
            CatalogueEntry(
                id=model_id,
                name=m.get("name", model_id),
                architecture=m.get("architecture", ""),
                sizes=sizes,
                description=m.get("description", ""),
                notes=m.get("notes", ""),
                source=m.get("source", ""),
            )
        )
    return entries
