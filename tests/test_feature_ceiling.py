"""scripts/feature_ceiling.py: its AUC is the pairwise one, and its network fits what a
linear score cannot (so an equal AUC on real samples means the features ran out)."""

from __future__ import annotations

import numpy as np
import pytest
from script_loader import load_script

from mlx_pager.sim.learn import fit_logistic


def test_auc_is_the_share_of_pairs_ranked_right_ties_half():
    auc = load_script("feature_ceiling").auc
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    assert auc(scores, labels) == pytest.approx(pairs.mean())
    assert auc(np.arange(10.0), np.arange(10) >= 5) == 1.0


def test_network_fits_a_target_no_linear_score_can():
    script = load_script("feature_ceiling")
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.normal(size=20000), rng.normal(size=20000), np.ones(20000)])
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)) * 1.0  # XOR of two signs
    train, test = slice(0, 16000), slice(16000, None)
    linear = x[test] @ fit_logistic(x[train], y[train])
    network = script.fit_mlp(x[train], y[train], hidden=16, epochs=10, batch=256)(x[test])
    assert abs(script.auc(linear, y[test]) - 0.5) < 0.05
    assert script.auc(network, y[test]) > 0.9


def test_features_weighed_by_the_shipped_weights_replay_as_the_policy():
    """The script's feature matrix is what the policy weighs: with the shipped weights as
    the scorer, the replay makes the policy's own decisions."""
    from test_simulate import random_trace

    from mlx_pager.paging.learned import default_params
    from mlx_pager.sim.replay import replay

    script = load_script("feature_ceiling")
    weights = default_params().weights
    for seed in range(3):
        trace = random_trace(seed, tokens=400, experts=12)
        swapped = script.replayed_with(trace, 4, lambda f: f @ weights)
        assert swapped == replay(trace, 4, "learned").hit_rate
        assert script.replayed_with(trace, 4, lambda f: -(f @ weights)) < swapped
