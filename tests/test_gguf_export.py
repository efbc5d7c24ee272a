"""The GGUF export: exact repacking, llama.cpp loads it and computes what mlx-lm does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
# The export's own tests need only gguf; running the file needs llama.cpp itself.
needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (it compiles llama.cpp: pip install -e '.[peers]')",
)

import mlx.core as mx  # noqa: E402

from mlx_pager.benchmark.gguf_agreement import routing_agreement  # noqa: E402
from mlx_pager.benchmark.gguf_export import (  # noqa: E402
    export_gguf,
    gguf_name,
    read_safetensors_index,
)
from mlx_pager.benchmark.llama_arm import open_llama, run_llama_cpp  # noqa: E402
from mlx_pager.sim.synthetic import make_checkpoint  # noqa: E402

SHAPE = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=384)  # fmt: skip
TOKENS = [(i * 37 + 11) % 384 for i in range(48)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    model = make_checkpoint(
        root / "model", "qwen3_moe", quantize_bits=4, dtype=mx.bfloat16, **SHAPE
    )
    return model, export_gguf(model, root / "model.gguf")


def _mlx_dequantized(model: Path, base: str) -> np.ndarray:
    weights = mx.load(str(model / "model.safetensors"))
    config = json.loads((model / "config.json").read_text())["quantization"]
    bits = config.get(base, config)["bits"]
    w = mx.dequantize(
        weights[f"{base}.weight"],
        weights[f"{base}.scales"].astype(mx.float32),
        weights[f"{base}.biases"].astype(mx.float32),
        group_size=64,
        bits=bits,
    )
    return np.array(w)


def test_repacked_tensors_dequantize_bit_for_bit(exported: tuple[Path, Path]) -> None:
    model, path = exported
    written = {t.name: t for t in gguf.GGUFReader(path).tensors}
    bases = sorted(n[: -len(".scales")] for n in read_safetensors_index(model) if "scales" in n)
    repacked = 0
    for base in bases:
        tensor = written[gguf_name(base) + ".weight"]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        want = _mlx_dequantized(model, base)
        assert got.shape == want.shape, base
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), base
        repacked += tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    # embedding, lm_head and 7 per layer; the routers are 8-bit (written as float32)
    assert repacked == 2 + 7 * 2 and len(bases) == repacked + 2


def test_names_and_metadata_are_llama_cpp_qwen3moe(exported: tuple[Path, Path]) -> None:
    _, path = exported
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    expected = set()
    for member in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE]:
        template = gguf.TENSOR_NAMES[member]
        for bid in range(2):
            expected.add(template.format(bid=bid) + ".weight")
    assert names == expected
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[-1]).decode() == "qwen3moe"
    assert reader.fields["qwen3moe.expert_count"].parts[-1][0] == 8
    assert reader.fields["qwen3moe.expert_used_count"].parts[-1][0] == 2
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == SHAPE["vocab_size"]


@needs_llama
def test_llama_cpp_agrees_with_mlx_lm(exported: tuple[Path, Path]) -> None:
    model, path = exported
    report = routing_agreement(model, path, TOKENS, mlx_float32=True)
    print(
        "float32 mlx-lm vs llama.cpp:",
        {k: v for k, v in report.items() if k != "top1_per_position"},
    )
    assert report["layers_routed"] == {"mlx": 2, "llama_cpp": 2}
    assert report["top1_agreement"] >= 0.9
    assert report["logits_correlation"] > 0.999
    assert report["expert_slot_agreement"] >= 0.8
    stock = routing_agreement(model, path, TOKENS)
    print(
        "stock (bfloat16) mlx-lm vs llama.cpp:",
        {k: v for k, v in stock.items() if k != "top1_per_position"},
    )
    assert stock["top1_agreement"] >= 0.7


@needs_llama
def test_llama_arm_generates_greedily_exactly_max_tokens(exported: tuple[Path, Path]) -> None:
    _, path = exported
    result = run_llama_cpp(path, TOKENS[:16], 10)
    assert result["prompt_tokens"] == 16 and len(result["tokens"]) == 10
    assert result["load_s"] > 0 and result["prefill_tps"] > 0 and result["decode_tps"] > 0
    # The reference: recompute the whole sequence and take the argmax each step.
    llm = open_llama(path, n_ctx=64, logits_all=True)
    sequence = list(TOKENS[:16])
    for _ in range(10):
        llm.reset()
        llm.eval(sequence)
        sequence.append(int(np.argmax(llm.scores[len(sequence) - 1])))
    llm.close()
    assert result["tokens"] == sequence[16:]


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "m", "mixtral", quantize_bits=4, hidden_size=128,
                            intermediate_size=128, head_dim=32, vocab_size=384)  # fmt: skip
    with pytest.raises(ValueError, match="supports model_type qwen3_moe"):
        export_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_float16_inexact_scales_are_refused(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "m", "qwen3_moe", quantize_bits=4, **SHAPE)  # float32
    with pytest.raises(ValueError, match="not exactly representable in float16"):
        export_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))
