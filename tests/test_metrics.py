"""Classification metrics, thresholds, and MURA's study rule (the one that serving, bulk
scoring and the study-level metrics share)."""

import pytest

from fracray.metrics.classification import binary_metrics, choose_threshold
from fracray.metrics.study import STUDY_RULE, study_decision, study_level


def test_binary_metrics_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.1, 0.05]
    m = binary_metrics(y, p, threshold=0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 4)
    assert m["accuracy"] == 6 / 8 and m["precision"] == 2 / 3 and m["sensitivity"] == 2 / 3
    assert m["specificity"] == 4 / 5 and m["f1"] == pytest.approx(2 / 3)
    # AUROC: of 15 positive/negative pairs the positive ranks higher in 5 + 4 + 3 = 12
    # (0.6 loses to 0.7; 0.2 loses to 0.7 and 0.3).
    assert m["auroc"] == pytest.approx(12 / 15)
    assert binary_metrics([0, 0], [0.1, 0.2])["auroc"] is None


def test_threshold_choices():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.6, 0.4, 0.8, 0.9]
    t = choose_threshold(y, p, target="sensitivity", value=1.0)
    assert binary_metrics(y, p, t)["sensitivity"] == 1.0 and t == pytest.approx(0.4)
    t = choose_threshold(y, p, target="specificity", value=1.0)
    assert binary_metrics(y, p, t)["specificity"] == 1.0
    assert choose_threshold([1, 1], [0.2, 0.3]) == 0.5
    with pytest.raises(ValueError):
        choose_threshold(y, p, target="sensitivity")


def test_study_level_kappa_uses_the_mean_probability_per_study():
    studies = ["a", "a", "b", "b", "c", "d"]
    labels = [1, 1, 0, 0, 1, 0]
    probs = [0.9, 0.3, 0.2, 0.4, 0.7, 0.6]  # a: 0.6 -> 1, b: 0.3 -> 0, c: 1, d: 1 (wrong)
    out = study_level(studies, labels, probs, 0.5)
    assert out["studies"] == 4 and (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 1, 1, 0)
    # Cohen's kappa: po = 3/4, pe = (3/4*2/4 + 1/4*2/4) = 1/2 -> (0.75 - 0.5) / 0.5.
    assert out["kappa"] == pytest.approx(0.5)


def test_the_study_rule_mean_probability_against_the_mean_threshold_majority_body_part():
    decision = study_decision([0.9, 0.3, 0.42], [0.5, 0.4, 0.6], ["wrist", "hand", "wrist"])
    assert decision == {"fracture_probability": pytest.approx(0.54), "threshold": pytest.approx(0.5), "label": 1,
                        "body_part": "wrist"}
    # Below the mean threshold, though one image alone is far above its own.
    assert study_decision([0.95, 0.1], [0.5, 0.7])["label"] == 0
    # One threshold for every image is used as it is; the label is at or above it.
    assert study_decision([0.25, 0.75], 0.5) == {"fracture_probability": 0.5, "threshold": 0.5, "label": 1,
                                                  "body_part": None}
    assert "mean probability" in STUDY_RULE
    with pytest.raises(ValueError):
        study_decision([], [])


def test_study_level_with_each_images_own_threshold():
    studies = ["a", "a", "b", "b"]
    labels = [1, 1, 0, 0]
    # a: mean 0.45 against mean threshold 0.4 -> 1; b: 0.35 against 0.3 -> 1 (a false positive).
    out = study_level(studies, labels, [0.5, 0.4, 0.3, 0.4], [0.3, 0.5, 0.2, 0.4])
    assert out["studies"] == 2 and (out["tp"], out["fp"], out["tn"], out["fn"]) == (1, 1, 0, 0)
    assert out["kappa"] == pytest.approx(0.0) and isinstance(out["threshold"], str)
