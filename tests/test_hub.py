"""Finding models: a folder, a cached Hub id, a missing one; what the cache holds."""

from __future__ import annotations

import pytest

from mlx_pager.hub.cache import cached_models, is_runnable
from mlx_pager.hub.fetch import download
from mlx_pager.hub.resolve import resolve_model


def test_folder_is_used_as_is(tiny_model, tmp_path):
    assert resolve_model(str(tiny_model)) == tiny_model
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a model folder: it has no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_missing_id_says_how_to_download(hf_cache):
    with pytest.raises(FileNotFoundError, match="`mlx-pager download org/absent`"):
        resolve_model("org/absent")
    assert cached_models() == []


def test_cached_id_resolves_and_is_listed(hub_server, tiny_model, hf_cache):
    commit = hub_server.add_repo("org/tiny", tiny_model)
    path = download("org/tiny", endpoint=hub_server.endpoint)
    assert resolve_model("org/tiny") == path
    assert resolve_model("org/tiny", revision=commit) == path
    (model,) = cached_models()
    assert model.repo_id == "org/tiny"
    assert model.commit == commit
    assert model.refs == ("main",)
    assert model.path == path
    assert model.runnable
    assert model.incomplete_bytes == 0
    assert model.size_bytes == sum(f.stat().st_size for f in tiny_model.iterdir())


def test_runnable_needs_config_and_every_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not is_runnable(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}'
    )
    (tmp_path / "model-1.safetensors").write_bytes(b"")
    assert not is_runnable(tmp_path)
    (tmp_path / "model-2.safetensors").write_bytes(b"")
    assert is_runnable(tmp_path)
