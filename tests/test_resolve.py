"""Opening a model by folder or by Hub id from the local cache, never downloading."""

from __future__ import annotations

import pytest
from test_reads import hf_cache_layout

from mlx_pager.hub.resolve import resolve_model
from mlx_pager.sim.synthetic import make_checkpoint


def test_folder_hub_id_and_missing(tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "src", "olmoe")
    assert resolve_model(str(src)) == src
    hub = tmp_path / "hub"
    snapshot = hf_cache_layout(src, hub, "org/tiny-moe")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert resolve_model("org/tiny-moe") == snapshot
    elsewhere = tmp_path / "elsewhere"
    hf_cache_layout(src, elsewhere, "org/custom")
    assert resolve_model("org/custom", cache_dir=elsewhere).is_relative_to(elsewhere)
    with pytest.raises(FileNotFoundError, match="mlx-pager download org/other"):
        resolve_model("org/other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
