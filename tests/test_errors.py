"""Broken checkpoints and impossible budgets fail with a message that says what to do."""

from __future__ import annotations

import json
import math
import struct

import pytest
from checkpoints import budget_for_slots

from mlx_pager.budget import BudgetError
from mlx_pager.paging.loader import load_paged
from mlx_pager.sim.synthetic import make_checkpoint
from mlx_pager.storage.checkpoint import CheckpointError

GB = 10**9


def gb_up(n: int) -> str:
    """A minimum as the message states it: rounded up, so that budget runs."""
    return f"{math.ceil(n / GB * 100) / 100:.2f}"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good") / "m", "qwen3_moe")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_header(good, tmp_path):
    path = _copy(good, tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="shorter than a header.*download the model again"):
        load_paged(path, 10 * GB)


def test_broken_file_in_the_hf_cache_names_the_blob(good, tmp_path):
    """Deleting the snapshot link would leave the broken blob for the next download."""
    from app_fixtures import hf_cache_with

    snapshot = hf_cache_with(good, tmp_path / "hub", "test/broken")
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match=f"delete {blob} \\(the file behind"):
        load_paged(snapshot, 10 * GB)


def test_fp8_experts_are_refused_at_open_with_what_to_do(tmp_path):
    """An FP8 checkpoint (Hugging Face's own, not converted): said before any forward pass."""
    import numpy as np
    from safetensors.numpy import load_file

    path = make_checkpoint(tmp_path / "fp8", "qwen3_moe", per_expert=True)
    tensors = load_file(str(path / "model.safetensors"))
    header, data, offset = {}, [], 0
    for name, array in tensors.items():
        fp8 = ".experts." in name
        raw = np.zeros(array.shape, np.uint8).tobytes() if fp8 else array.tobytes()
        header[name] = {"dtype": "F8_E4M3" if fp8 else "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"".join(data))
    with pytest.raises(ValueError, match="stored as F8_E4M3.*mlx_lm.convert"):
        load_paged(path, 10 * GB)


def test_header_length_past_end(good, tmp_path):
    path = _copy(good, tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 10**7) + data[8:200])
    with pytest.raises(CheckpointError, match="header length .* does not fit"):
        load_paged(path, 10 * GB)


def test_corrupt_header_json(good, tmp_path):
    path = _copy(good, tmp_path / "m")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"#not json!#!"
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header is not JSON"):
        load_paged(path, 10 * GB)


def test_offsets_past_end_of_file(good, tmp_path):
    path = _copy(good, tmp_path / "m")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 4096])  # header intact, tail of the data gone
    with pytest.raises(CheckpointError, match="past the end of the file"):
        load_paged(path, 10 * GB)


def test_missing_shard(tmp_path):
    path = make_checkpoint(tmp_path / "m", "olmoe", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing 1 of 2 weight shards.*mlx-pager download"):
        load_paged(path, 10 * GB)


def test_unsupported_architecture(good, tmp_path):
    path = _copy(good, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "made_up_moe"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cannot run model type 'made_up_moe'.*Tested MoE types"):
        load_paged(path, 10 * GB)


@pytest.mark.parametrize("found_by", ["config", "modules"])
def test_moe_without_switch_layers_is_refused(tmp_path, monkeypatch, found_by):
    """DBRX keeps its expert count in ``ffn_config`` and its experts in a list of MLPs:
    it must not load as a dense model with every expert resident."""
    import mlx_pager.storage.checkpoint as checkpoint

    path = make_checkpoint(tmp_path / "dbrx", "dbrx")
    what = "8 routed experts per layer"  # ffn_config.moe_num_experts
    if found_by == "modules":  # a config that names its experts in a way nobody knows
        monkeypatch.setattr(checkpoint, "EXPERT_COUNT_KEYS", ())
        what = "routed experts"
    with pytest.raises(
        ValueError,
        match=rf"'dbrx' is a mixture of experts \({what}\).*SparseMoeBlock.*not mlx-lm's "
        r"SwitchGLU.*Use a model of a supported architecture: qwen3_moe",
    ):
        load_paged(path, 10 * GB)


def test_budget_below_minimum_states_minimum_in_gb(good):
    minimum = budget_for_slots(good, 2)  # top-2 routing: two slots is the least that runs
    with pytest.raises(BudgetError, match=rf"below the minimum {gb_up(minimum)} GB") as error:
        load_paged(good, minimum - 1, 256)
    # the explanation after it states the same figure, not one rounded the other way
    assert f"needs at least {gb_up(minimum)} GB" in str(error.value)
    load_paged(good, minimum, 256).close()  # exactly the minimum runs


def test_model_without_experts_runs_fully_resident(tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    path = make_checkpoint(tmp_path / "dense", "qwen3")
    paged = load_paged(path, 10 * GB)
    assert not paged.paged and paged.plan.verdict == "fits"
    reference, _ = load(str(path))
    tokens = mx.array([[1, 2, 3, 4]])
    assert mx.array_equal(reference(tokens), paged.model(tokens))


def test_dense_model_below_its_resident_size_is_too_large(tmp_path):
    path = make_checkpoint(tmp_path / "dense", "qwen3")
    minimum = budget_for_slots(path, 0)  # resident core + KV cache + headroom, no experts
    with pytest.raises(BudgetError, match=rf"below the minimum {gb_up(minimum)} GB"):
        load_paged(path, minimum - 1, 256)
    paged = load_paged(path, minimum, 256)
    assert paged.plan.verdict == "fits"
