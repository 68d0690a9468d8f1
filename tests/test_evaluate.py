"""The clinical read-out: threshold choice, decisions, rates, intervals, the positive class, ensembles."""
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score, roc_curve

from core.errors import UserError
from search.final.ensemble import ensemble_weights
from search.outputs.evaluate import (auc, confidence_intervals, decide, evaluate, paired_difference, positive_class, rates,
                                     score, stratified_resamples, wilson, youden_threshold)


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


@pytest.mark.parametrize("classes", [2, 3])
def test_the_bootstraps_metrics_are_sklearns(classes):
    """auc and score compute their figures with numpy (the bootstraps call them thousands of times):
    the same as sklearn's to 1e-12, ties, float32 probabilities and a class without images included."""
    rng = np.random.default_rng(classes)
    for k in range(150):
        n = int(rng.integers(5, 60))
        labels = rng.integers(0, classes, n)
        probs = rng.dirichlet(np.ones(classes), n)
        if k % 3 == 0:
            probs = np.round(probs, 1) + 1e-3  # many ties
        probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
        as_float64 = probs / probs.sum(1, keepdims=True, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns where a class has no image (its AUC is nan)
            expected = (roc_auc_score(labels, probs[:, 1]) if classes == 2 else
                        roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=range(classes)))
        found = auc(labels, probs)
        assert found == pytest.approx(expected, abs=1e-12, nan_ok=True)
        assert score(labels, probs, "val_loss") == pytest.approx(log_loss(labels, as_float64, labels=range(classes)),
                                                                abs=1e-12)
        assert score(labels, probs, "val_acc") == accuracy_score(labels, probs.argmax(1))
        assert score(labels, probs, "val_f1") == pytest.approx(
            f1_score(labels, probs.argmax(1), average="macro", labels=range(classes), zero_division=0), abs=1e-12)


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
    ci_small = confidence_intervals(*small, positive=1, threshold=0.5, resamples=300)
    ci_large = confidence_intervals(*large, positive=1, threshold=0.5, resamples=300)
    report = evaluate(*large, ["a", "b"], positive=1, threshold=0.5, resamples=300)
    for key in ("auc", "sensitivity", "specificity", "ppv", "npv"):
        assert ci_large[key][0] < report[key] < ci_large[key][1], key
        assert np.diff(ci_large[key]) < np.diff(ci_small[key]), key


def test_wilson_interval_matches_its_formula_and_never_collapses_at_the_edges():
    from scipy.stats import binomtest
    assert wilson(17, 20) == pytest.approx(list(binomtest(17, 20).proportion_ci(method="wilson")), abs=1e-6)
    lo, hi = wilson(20, 20)  # a perfect score on 20 cases is not certainty
    assert hi == 1.0 and 0.8 < lo < 0.85
    assert wilson(0, 0) is None
    assert np.diff(wilson(20, 20, units=5)) > np.diff(wilson(20, 20))  # 20 images of 5 patients: wider


def test_bootstrap_by_patient_draws_whole_patients():
    labels = np.repeat([0, 1, 0, 1, 0, 1], 4)
    groups = np.repeat(["p1", "p2", "p3", "p4", "p5", "p6"], 4)
    for idx in stratified_resamples(labels, 2, 20, seed=3, groups=groups):
        drawn = groups[idx]
        assert all((drawn == g).sum() % 4 == 0 for g in set(drawn))  # every patient with all 4 images
        assert set(labels[idx]) == {0, 1}  # stratified by the patients' class


def test_intervals_over_patients_are_wider_than_over_images():
    rng = np.random.default_rng(4)
    patients = np.repeat(np.arange(40), 10)  # 10 near-identical slices per patient
    y = np.repeat(rng.integers(0, 2, 40), 10)
    p1 = np.clip(np.repeat(rng.normal(0.4 + 0.2 * y[::10], 0.2), 10) + rng.normal(0, 0.01, 400), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    by_image = confidence_intervals(y, probs, positive=1, threshold=0.5, resamples=300)
    by_patient = confidence_intervals(y, probs, positive=1, threshold=0.5, resamples=300, groups=patients)
    for key in ("auc", "sensitivity", "specificity"):
        assert np.diff(by_patient[key]) > 1.5 * np.diff(by_image[key]), key


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


def test_an_imbalanced_read_out_gives_pr_auc_balanced_accuracy_and_the_majority_baseline():
    """600 normal, 30 pneumonia (1:20): a model that finds most pneumonia but calls about 100 normal images
    positive scores an accuracy below calling every image normal; the read-out says so."""
    from sklearn.metrics import average_precision_score, balanced_accuracy_score

    from search.final.report import _majority
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(600, int), np.ones(30, int)]
    p = np.clip(np.r_[rng.normal(0.2, 0.15, 600), rng.normal(0.7, 0.15, 30)], 0.001, 0.999)
    probs = np.c_[1 - p, p]
    out = evaluate(labels, probs, ["normal", "pneumonia"], positive=1, threshold=0.35, resamples=20)
    pred = decide(probs, 1, 0.35)
    assert out["majority_baseline"] == {"class": "normal", "accuracy": pytest.approx(600 / 630)}
    assert out["accuracy"] < out["majority_baseline"]["accuracy"]
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred)) and out["balanced_accuracy"] > 0.85
    assert out["pr_auc"] == pytest.approx(average_precision_score(labels == 1, p)) and out["pr_auc_chance"] == pytest.approx(30 / 630)
    assert out["per_class"]["normal"]["pr_auc"] == pytest.approx(average_precision_score(labels == 0, 1 - p))
    assert "Accuracy is no better than calling every image normal (0.952)" in _majority(out)


def test_a_manifest_site_column_breaks_the_test_figures_down_by_site_and_flags_a_worse_site(tmp_path, pneumonia_npz):
    """`--strata site`: the manifest's column recorded per image; per site the AUC and sensitivity with their
    intervals, as sklearn computes them on that site's images; a site whose interval lies below is flagged."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from search.final.strata import strata_figures, strata_lines
    from ingest.dataset import load_dataset
    arrays = np.load(pneumonia_npz)
    rows = []
    for label, name in enumerate(("normal", "pneumonia")):
        (tmp_path / name).mkdir()
        for k, i in enumerate(np.flatnonzero(arrays["train_labels"].ravel() == label)[:400]):
            Image.fromarray(arrays["train_images"][i]).save(tmp_path / name / f"{k}.png")
            rows.append(f"{name}/{k}.png,{name},{'north' if k % 3 else 'south'}")
    (tmp_path / "m.csv").write_text("path,label,site\n" + "\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"unknown column\(s\) \['site'\].*named as strata"):
        load_dataset(tmp_path / "m.csv", image_size=28)
    with pytest.raises(UserError, match=r"strata column\(s\) \['scanner'\] are not columns of .*columns: \['path', 'label', 'site'\]"):
        load_dataset(tmp_path / "m.csv", image_size=28, strata_columns=("scanner",))
    with pytest.raises(UserError, match=r"strata columns \['site'\] are columns of a CSV manifest"):
        load_dataset(pneumonia_npz, image_size=28, strata_columns=("site",))
    data = load_dataset(tmp_path / "m.csv", image_size=28, strata_columns=("site",))
    test = data.indices("test")
    labels, site = data.labels[test], data.strata["site"][test]
    # a score that is good on the north site and chance on the south one
    rng = np.random.default_rng(0)
    score = np.where(site == "north", labels * 0.8 + rng.random(len(test)) * 0.3, rng.random(len(test)))
    probs = np.column_stack([1 - score, score])
    from search.outputs.evaluate import evaluate
    model = {"test_probs": probs, "val": {"threshold": 0.5},
             "test": evaluate(labels, probs, data.class_names, positive=1, threshold=0.5, resamples=200)}
    figures = strata_figures(data, model, positive=1, resamples=200)["site"]
    assert set(figures) == {"north", "south"}
    for name, f in figures.items():
        mask = site == name
        assert f["images"] == mask.sum() and f["auc"] == pytest.approx(roc_auc_score(labels[mask], score[mask]))
        assert f["ci"]["auc"][0] <= f["auc"] <= f["ci"]["auc"][1]
    assert figures["north"]["below_whole"] == [] and "auc" in figures["south"]["below_whole"]
    lines = "\n".join(strata_lines({"site": figures}, model["test"]))
    assert "**site**" in lines and "| south |" in lines and "**auc" in lines
