"""The clinical read-out: threshold choice, decisions, rates, intervals, the positive class, ensembles."""
import numpy as np
import pytest
from sklearn.metrics import roc_curve

from search.evaluate import (bootstrap_ci, decide, evaluate, paired_difference, positive_class, rates,
                             youden_threshold)
from search.ensemble import ensemble_weights
from trainables import UserError


def test_youden_threshold_is_j_optimal_and_in_the_middle_of_the_gap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(bool)
    scores = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    t = youden_threshold(y, scores)
    fpr, tpr, _ = roc_curve(y, scores)
    said = scores >= t
    j = said[y].mean() - said[~y].mean()
    assert j == pytest.approx((tpr - fpr).max())
    # separable scores: the threshold sits halfway between the classes
    assert youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.6, 0.9])) == pytest.approx(0.4)


def test_decide_calls_positive_at_the_threshold_else_the_best_other_class():
    probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.1, 0.25, 0.65]])
    assert decide(probs, positive=1, threshold=0.3).tolist() == [1, 0, 2]
    assert decide(probs, positive=1, threshold=0.05).tolist() == [1, 1, 1]


def test_rates_match_their_definitions():
    truth = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    said = np.array([1, 1, 0, 1, 0, 0, 0], bool)
    r = rates(truth, said)
    assert (r["sensitivity"], r["specificity"], r["ppv"], r["npv"]) == pytest.approx((2 / 3, 3 / 4, 2 / 3, 3 / 4))
    assert rates(np.zeros(3, bool), np.zeros(3, bool))["sensitivity"] is None


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(1)

    def sample(n):
        y = rng.integers(0, 2, n)
        p1 = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
        return y, np.stack([1 - p1, p1], 1)

    small, large = sample(100), sample(2000)
    ci_small = bootstrap_ci(*small, positive=1, threshold=0.5, resamples=300)
    ci_large = bootstrap_ci(*large, positive=1, threshold=0.5, resamples=300)
    report = evaluate(*large, ["a", "b"], positive=1, threshold=0.5, resamples=300)
    assert ci_large["auc"][0] < report["auc"] < ci_large["auc"][1]
    assert ci_large["sensitivity"][0] < report["sensitivity"] < ci_large["sensitivity"][1]
    for key in ("auc", "sensitivity", "specificity"):
        assert np.diff(ci_large[key]) < np.diff(ci_small[key])


def test_paired_difference_separates_a_real_margin_from_noise():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    good = np.eye(3)[y] * 2 + rng.normal(0, 1, (300, 3))
    good = np.exp(good) / np.exp(good).sum(1, keepdims=True)
    noise = rng.dirichlet(np.ones(3), 300)
    margin = paired_difference(y, good, noise, "val_auc", resamples=200)
    assert margin["difference"] > 0.2 and 0 < margin["ci"][0] <= margin["difference"] <= margin["ci"][1]
    swapped = paired_difference(y, noise, good, "val_auc", resamples=200)
    assert swapped["difference"] == pytest.approx(-margin["difference"]) and swapped["ci"][1] < 0
    assert paired_difference(y, good, noise, "val_loss", resamples=200)["ci"][1] < 0  # lower loss: negative
    same = paired_difference(y, good, good.copy(), "val_auc", resamples=50)
    assert same == {"difference": 0.0, "ci": [0.0, 0.0]}
    # a slightly perturbed copy: the interval straddles zero
    nudged = np.clip(good + rng.normal(0, 0.01, good.shape), 1e-6, 1)
    close = paired_difference(y, good, nudged / nudged.sum(1, keepdims=True), "val_auc", resamples=200)
    assert close["ci"][0] < 0 < close["ci"][1]


def test_positive_class_defaults_and_errors():
    assert positive_class(["normal", "pneumonia"]) == 1
    assert positive_class(["COVID", "non-COVID"]) == 0
    assert positive_class(["CT_COVID", "CT_NonCOVID"]) == 0
    assert positive_class(["Covid", "Normal", "Viral Pneumonia"]) == 0
    assert positive_class(["Covid", "Normal", "Viral Pneumonia"], "viral pneumonia") == 2
    with pytest.raises(UserError, match=r"--positive-class 'flu' is not a class of this data; classes: \['a', 'b'\]"):
        positive_class(["a", "b"], "flu")


def test_greedy_ensemble_weights_favour_the_member_that_helps():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    good = np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0.01, 0.99)
    noise = rng.uniform(0.01, 0.99, 300)
    members = [np.stack([1 - p, p], 1) for p in (noise, good, noise[::-1])]
    weights = ensemble_weights(members, y, "val_auc")
    assert weights.sum() == pytest.approx(1) and weights.argmax() == 1 and weights[1] >= 0.5
