"""Calibration: the metrics against independent computations, and temperature scaling applied only
when the selection images support it."""
import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from search.outputs.calibration import apply_temperature, calibration, expected_calibration_error, fit_temperature
from search.final.ensemble import calibrate, score_model
from ingest.dataset import Dataset


def _probs(rng, labels, sharpness):
    """Binary probabilities whose log-odds are `sharpness` times the true ones (> 1: overconfident)."""
    log_odds = 2 * ((2 * labels - 1) + rng.normal(0, 1, len(labels)))
    p1 = 1 / (1 + np.exp(-sharpness * log_odds))
    return np.stack([1 - p1, p1], 1)


def _data(labels):
    split = np.zeros(len(labels), np.uint8)
    split[len(labels) // 2:] = 2  # first half: validation-like selection, second half: test
    return Dataset(images=np.zeros((len(labels), 4, 4, 1), np.uint8), labels=labels, class_names=["a", "b"],
                   split=split, groups=None, paths=None, fingerprint="x", source="synthetic", split_kind="given")


def test_ece_matches_sklearns_reliability_curve():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    probs = _probs(rng, labels, 2.0)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=10, strategy="uniform")
    counts = np.histogram(confidence, bins=np.linspace(0, 1, 11))[0]
    expected = np.sum(counts[counts > 0] / len(labels) * np.abs(accuracy - mean_confidence))
    assert expected_calibration_error(labels, probs) == pytest.approx(expected, abs=1e-9)


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 3000)
    probs = _probs(rng, labels, 2.5)
    temperature = fit_temperature(labels, probs)
    assert temperature == pytest.approx(2.5, rel=0.1)
    before, after = calibration(labels, probs), calibration(labels, apply_temperature(probs, temperature))
    assert after["ece"] < before["ece"] / 2 and after["log_loss"] < before["log_loss"]


def test_a_temperature_fitted_to_selection_images_all_classified_right_is_not_applied():
    """Seen on covid19-xray-3class with one 25-image validation split: every image right, so the log
    loss falls all the way to the low end of the range (T = 0.05), the gain is 'significant' on
    every resample, and applying it took test ECE from 0.021 to 0.090."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    data = _data(labels)
    selection, test = np.arange(100), data.indices("test")
    probs = _probs(rng, labels, 1.0)
    right = probs[selection].argmax(1) == labels[selection]
    probs[selection[~right]] = probs[selection[~right]][:, ::-1]  # every selection image classified right
    model = score_model({"kind": "member"}, probs[selection], probs[test], data, selection=selection, positive=1,
                        resamples=200)
    c = calibrate(model, data, selection=selection, positive=1, resamples=200)["calibration"]
    assert c["fitted_temperature"] == pytest.approx(0.05, rel=0.02) and c["fitted_at_range_end"]
    assert c["selection_log_loss_gain"]["ci"][0] > 0  # the bootstrap guard alone would have let it through
    assert c["temperature"] == 1.0 and c["ece"] == pytest.approx(c["before"]["ece"])


@pytest.mark.parametrize("sharpness,applied", [(3.0, True), (1.0, False)])
def test_the_final_model_is_scaled_only_when_validation_supports_it(sharpness, applied):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1200)
    data = _data(labels)
    selection, test = np.arange(600), data.indices("test")
    probs = _probs(rng, labels, sharpness)
    model = score_model({"kind": "member"}, probs[selection], probs[test], data, selection=selection, positive=1,
                        resamples=200)
    scaled = calibrate(model, data, selection=selection, positive=1, resamples=200)
    c = scaled["calibration"]
    assert (c["temperature"] != 1.0) == applied and c["fitted_temperature"] > 0 and not c["fitted_at_range_end"]
    assert (c["selection_log_loss_gain"]["ci"][0] > 0) == applied
    if applied:
        assert c["temperature"] == pytest.approx(sharpness, rel=0.2) and c["ece"] < c["before"]["ece"]
    else:
        assert np.allclose(scaled["test_probs"], probs[test], atol=1e-6) and c["ece"] == pytest.approx(c["before"]["ece"])


def test_the_temperatures_gain_is_measured_on_images_it_was_not_fitted_on():
    """On calibrated probabilities a fitted temperature only fits noise: its log-loss gain on its own
    images is never below 0, on held-out images it is a loss on average. The guard must see the latter."""
    from search.outputs.calibration import choose_temperature
    gains = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, 200)
        applied, fitted, gain = choose_temperature(labels, _probs(rng, labels, 1.0), resamples=100)
        assert applied == 1.0 and fitted != 1.0
        gains.append(gain["difference"])
    assert np.mean(gains) < 0, gains
