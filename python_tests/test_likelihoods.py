"""fisher_ext.likelihoods: draws follow p(. | output) (moments against the formulas), shapes checked."""

from __future__ import annotations

import pytest
import torch

from fisher_ext.likelihoods import Bernoulli, Categorical, Gaussian

DRAWS = 20000


def test_gaussian_draws_have_the_mean_and_variance():
    mean = torch.tensor([[-1.0, 0.5, 2.0]]).expand(DRAWS, 3)
    draws = Gaussian(variance=0.25).sample(mean, torch.Generator().manual_seed(0))
    se = 0.5 / DRAWS ** 0.5
    assert (draws.mean(0) - mean[0]).abs().max() < 5 * se
    assert (draws.var(0) - 0.25).abs().max() < 0.02


def test_bernoulli_and_categorical_draw_frequencies():
    logits = torch.tensor([[-1.0, 0.0, 2.0]]).expand(DRAWS, 3)
    draws = Bernoulli().sample(logits, torch.Generator().manual_seed(0))
    assert (draws.mean(0) - torch.sigmoid(logits[0])).abs().max() < 0.02
    labels = Categorical().sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=3).float() / DRAWS
    assert (freq - torch.softmax(logits[0], 0)).abs().max() < 0.02


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"output: expected logits \(N, \*\) with at least 1 dims"):
        Bernoulli().check(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"labels: expected shape \(5,\)"):
        Categorical().nll(torch.zeros(5, 3), torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels: expected shape \(5, 3\) like the output"):
        Gaussian().nll(torch.zeros(5, 3), torch.zeros(5, 4))


def test_outputs_must_be_floating_point_tensors():
    with pytest.raises(ValueError, match=r"output: expected a floating-point tensor .* of dtype torch.int64"):
        Categorical().check(torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"output: expected a floating-point tensor of means .* got list"):
        Gaussian().check([1.0, 2.0])


def test_no_draws_from_logits_that_describe_no_distribution():
    logits = torch.zeros(4, 3)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    g = torch.Generator().manual_seed(0)
    with pytest.raises(FloatingPointError, match=r"output: 2 of the 12 logits are NaN or \+inf"):
        Categorical().sample(logits, g)
    with pytest.raises(FloatingPointError, match=r"output: 1 of the 12 logits are NaN;"):
        Bernoulli().sample(logits, g)
    masked = torch.zeros(4, 3)
    masked[:, 0] = float("-inf")  # a masked-out class: never drawn
    assert not bool((Categorical().sample(masked, g) == 0).any())
    masked[2] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"output: 1 rows of logits are all -inf \(no class left\)"):
        Categorical().sample(masked, g)
    saturated = torch.tensor([[float("inf"), float("-inf")]])  # Bernoulli: probabilities 1 and 0
    assert Bernoulli().sample(saturated, g).tolist() == [[1.0, 0.0]]
