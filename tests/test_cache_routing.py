"""Cache-aware routing: off by default, exact at margin zero, and when it reroutes, the
model's combine weighs the substitute by the substitute's own score."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import budget_for_slots, compare_with_mlx_lm, open_paged
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from mlx_pager.cli import main
from mlx_pager.engine import Engine
from mlx_pager.paging.cache_routing import (
    CacheAwareSwitch,
    combine_rule,
    combine_scale,
    enable_cache_routing,
    substitute,
)
from mlx_pager.paging.loader import TESTED_ARCHITECTURES, cast_floating, find_switch_layers
from mlx_pager.paging.paged_switch import PagedSwitch
from mlx_pager.settings import Settings, load_settings
from mlx_pager.sim.synthetic import make_checkpoint


def _blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Each MoE block with the name of its routed-expert layer, paged or wrapped."""
    kinds = (PagedSwitch, CacheAwareSwitch)
    return [
        (module, name)
        for _, module in model.named_modules()
        for name in ("switch_mlp", "experts")
        if name in module and isinstance(module[name], kinds)
    ]


def test_substitute_replaces_the_weakest_missing_expert_within_the_margin():
    z = np.array([[5.0, 4.0, 3.9, 3.0, 0.0]])  # logit range 5
    routed = np.array([[0, 1]])
    resident = np.array([True, False, True, True, False])
    assert (substitute(z, routed, resident, 0.0) == routed).all()
    # 0.1 x 5 = 0.5: expert 2 (3.9 + 0.5 > 4.0) stands in for expert 1, in its slot.
    assert substitute(z, routed, resident, 0.1).tolist() == [[0, 2]]
    # Expert 3 is not within 0.15 x 5 of expert 1: nothing changes.
    resident[2] = False
    assert (substitute(z, routed, resident, 0.15) == routed).all()
    assert substitute(z, routed, resident, 0.25).tolist() == [[0, 3]]
    # A resident routed expert is never given up, and no expert is chosen twice.
    resident[:] = True
    assert (substitute(z, routed, resident, 1.0) == routed).all()


@pytest.mark.parametrize("rule", ["chosen", "all"])
def test_combine_scale_gives_the_new_sets_weights(rule):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 8)).astype(np.float32)
    routed = np.argsort(-z, -1)[:, :2]
    new = routed.copy()
    new[:, 1] = np.argsort(-z, -1)[:, 4]  # the fifth best stands in for the second

    def weights(chosen):  # the models' own rules, written out
        if rule == "all":
            p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
            return np.take_along_axis(p, chosen, -1)
        e = np.exp(np.take_along_axis(z, chosen, -1))
        return e / e.sum(-1, keepdims=True)

    got = weights(routed) * combine_scale(z, routed, new, rule)
    np.testing.assert_allclose(got, weights(new), rtol=1e-6)


def test_every_tested_architecture_has_a_known_combine_rule(tmp_path):
    for arch in TESTED_ARCHITECTURES:
        paged = open_paged(make_checkpoint(tmp_path / arch, arch), 3)
        try:
            blocks = _blocks(paged.model)
            assert blocks, arch
            assert all(combine_rule(block) for block, _ in blocks), arch
        finally:
            paged.close()


def test_off_by_default(tmp_path):
    assert Settings().route_margin == 0.0
    path = make_checkpoint(tmp_path / "m", "qwen3_moe")
    paged = open_paged(path, 3)
    try:
        assert paged.stats.routing == "exact" and paged.stats.lossy == []
        assert all(isinstance(b[name], PagedSwitch) for b, name in _blocks(paged.model))
        worst, bitwise = compare_with_mlx_lm(path, paged)
        assert bitwise, worst
        assert paged.stats.rerouted == 0
    finally:
        paged.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"])
def test_margin_zero_is_exact(tmp_path, arch, monkeypatch):
    """The wrapper installed, its margin 0: every logit bit for bit as stock mlx-lm's."""
    path = make_checkpoint(tmp_path / arch, arch, num_experts=8)
    paged = open_paged(path, 4)
    decided = []

    def counting(logits, routed, resident, margin):
        decided.append(int((~resident[routed]).sum()))  # missing experts it could replace
        return substitute(logits, routed, resident, margin)

    monkeypatch.setattr("mlx_pager.paging.cache_routing.substitute", counting)
    try:
        assert enable_cache_routing(_blocks(paged.model), 0.0) == "cache-aware"
        assert all(isinstance(b[name], CacheAwareSwitch) for b, name in _blocks(paged.model))
        worst, bitwise = compare_with_mlx_lm(path, paged)
        assert bitwise, f"logits differ by up to {worst}"
        assert sum(decided) > 0, "no decode step met a missing expert"
        assert paged.stats.rerouted == 0
    finally:
        paged.close()


class ForcedGate(nn.Module):
    """Stock mlx-lm's router with every expert outside a given set pushed out of reach:
    under a softmax over the chosen k, the set's weights are the router's own."""

    def __init__(self, gate: nn.Module, chosen: list):
        super().__init__()
        self.gate = gate
        object.__setattr__(self, "chosen", chosen)  # one [k] array per call, in order

    def __call__(self, x):
        z = self.gate(x)
        keep = np.zeros(z.shape[-1], bool)
        keep[self.chosen.pop(0)] = True
        return mx.where(mx.array(keep), z, mx.array(-1e9, z.dtype))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_rerouted_combine_uses_the_substitutes_score(tmp_path, arch, monkeypatch):
    """Decode steps rerouted at a wide margin equal stock mlx-lm told to route to the same
    experts: each substitute's output is weighed by its own router score."""
    path = make_checkpoint(
        tmp_path / arch, arch, num_experts=16, num_experts_per_tok=4, num_hidden_layers=2
    )
    paged = open_paged(path, 8, route_margin=0.6)
    chosen: dict[int, list] = {}
    try:
        assert paged.stats.routing == "cache-aware" and paged.stats.route_margin == 0.6
        original = PagedSwitch.__call__

        def record(self, x, indices):  # the routing each decode step computed with
            if x.size == x.shape[-1]:
                chosen.setdefault(self.layer, []).append(np.array(indices).reshape(-1))
            return original(self, x, indices)

        monkeypatch.setattr(PagedSwitch, "__call__", record)
        reference, _ = load(str(path))
        reference.update(cast_floating(reference.parameters(), mx.float32))
        ref_cache, cache = make_prompt_cache(reference), make_prompt_cache(paged.model)
        tokens = np.random.RandomState(0).randint(0, 300, 40)
        paged.model(mx.array(tokens[None, :8]), cache=cache)
        reference(mx.array(tokens[None, :8]), cache=ref_cache)
        paged_steps = []
        for t in tokens[8:].tolist():
            paged_steps.append(paged.model(mx.array([[t]]), cache=cache))
            mx.eval(paged_steps[-1])
        assert paged.stats.rerouted > 0, "nothing was rerouted: the test shows nothing"
        for layer, (path, _) in enumerate(find_switch_layers(reference)):
            block = reference
            for part in path.split(".")[:-1]:
                block = block[int(part)] if isinstance(block, list) else block[part]
            block.gate = ForcedGate(block.gate, chosen[layer])
        for t, got in zip(tokens[8:].tolist(), paged_steps, strict=True):
            want = reference(mx.array([[t]]), cache=ref_cache)
            np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-4, rtol=1e-4)
    finally:
        paged.close()


def test_fewer_misses_and_the_stats_say_so(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_experts_per_tok=4)
    misses = {}
    for margin in (0.0, 0.5):
        paged = open_paged(path, 10, route_margin=margin)
        engine = Engine(paged, "m", 256)
        try:
            for _ in engine.generate("a b c d", max_tokens=48, chat_template=False,
                                     ignore_eos=True):  # fmt: skip
                pass
            data = engine.stats.to_dict()
            misses[margin] = data["decode_misses"]
        finally:
            engine.close()
        if margin:
            assert data["routing"] == "cache-aware" and data["route_margin"] == margin
            assert data["rerouted"] > 0
            assert data["lossy"] == ["cache-aware routing, margin 0.5"]
        else:
            assert data["routing"] == "exact" and data["lossy"] == [] and data["rerouted"] == 0
    assert misses[0.5] < misses[0.0], misses


def test_unknown_block_stays_exact():
    class Block(nn.Module):
        pass

    block = Block()
    assert enable_cache_routing([(block, "switch_mlp")], 0.3).startswith("exact: ")
    with pytest.raises(ValueError, match="route_margin must be 0 or more"):
        enable_cache_routing([], -0.5)


def test_setting_and_generate_json(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_experts_per_tok=4)
    assert main(["settings", "set", "route_margin", "0.4"]) == 0
    assert load_settings().route_margin == 0.4
    for bad in ("-0.1", "2", "wide"):
        with pytest.raises(ValueError, match="route_margin"):
            Settings().replace(route_margin=bad)
    capsys.readouterr()
    budget = str(budget_for_slots(path, 8, 4096))
    args = ["generate", "--model", str(path), "--prompt", "a b", "--max-tokens", "24"]
    assert main([*args, "--budget", budget, "--ignore-chat-template", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["routing"] == "cache-aware" and stats["route_margin"] == 0.4
    assert stats["lossy"] == ["cache-aware routing, margin 0.4"]
