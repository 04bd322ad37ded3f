"""mim_fast.metrics: both conventions (MAG-BERT's, MMSA's) against hand-computed cases and against
plain-Python re-implementations on random data (weighted F1 against an independent brute force of sklearn's
definition), the edge cases (all labels 0, constant predictions, ties at 0, rounding ties), and the
purification metrics."""
import math
import warnings

import numpy as np
import pytest
import torch

from mim_fast import metrics
from mim_fast.data import synthetic
from mim_fast.metrics import pearson, purification_metrics, regression_metrics, weighted_f1

KEYS = {"mae_all", "corr_all", "mae_non0", "corr_non0", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0",
        "acc2_non0_mmsa", "f1_non0_mmsa", "acc5", "acc7"}


def brute_weighted_f1(y_true, y_pred):
    """sklearn's f1_score(average="weighted", zero_division default) from its definition: per label of
    the sorted union, precision and recall with 0 for 0/0, F1 = 2PR/(P+R) with 0 for 0/0, averaged
    with the true counts as weights."""
    y_true, y_pred = list(y_true), list(y_pred)
    labels = sorted(set(y_true) | set(y_pred))
    total, n = 0.0, len(y_true)
    for c in labels:
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        pred_c = sum(1 for p in y_pred if p == c)
        true_c = sum(1 for t in y_true if t == c)
        precision = tp / pred_c if pred_c else 0.0
        recall = tp / true_c if true_c else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total += f1 * true_c
    return total / n


def plain_metrics(preds, labels):
    """Both protocols written out sample by sample in Python floats (MAG-BERT's test_score_model with
    use_zero False/True, MMSA's MetricsTop regression metrics)."""
    preds, labels = [float(p) for p in preds], [float(y) for y in labels]

    def acc(bound):
        clip = lambda v: min(bound, max(-bound, v))  # noqa: E731
        return sum(round(clip(p)) == round(clip(y)) for p, y in zip(preds, labels)) / len(labels)

    out = {"acc7": acc(3.0), "acc5": acc(2.0)}
    pairs = [(p, y) for p, y in zip(preds, labels) if y != 0]
    out["acc2_non0"] = sum((p >= 0) == (y >= 0) for p, y in pairs) / len(pairs)
    out["f1_non0"] = brute_weighted_f1([y >= 0 for _, y in pairs], [p >= 0 for p, _ in pairs])
    out["acc2_non0_mmsa"] = sum((p > 0) == (y > 0) for p, y in pairs) / len(pairs)
    out["f1_non0_mmsa"] = brute_weighted_f1([y > 0 for _, y in pairs], [p > 0 for p, _ in pairs])
    out["mae_non0"] = sum(abs(p - y) for p, y in pairs) / len(pairs)
    out["corr_non0"] = float(np.corrcoef([p for p, _ in pairs], [y for _, y in pairs])[0, 1])
    out["mae_all"] = sum(abs(p - y) for p, y in zip(preds, labels)) / len(labels)
    out["corr_all"] = float(np.corrcoef(preds, labels)[0, 1])
    out["acc2_has0"] = sum((p >= 0) == (y >= 0) for p, y in zip(preds, labels)) / len(labels)
    out["f1_has0"] = brute_weighted_f1([y >= 0 for y in labels], [p >= 0 for p in preds])
    return out


def test_hand_computed_case():
    preds = [2.6, -0.4, 0.0, 0.0, -2.5, 1.2, 10.0, 0.3]
    labels = [3.0, 0.0, 1.0, -0.6, -2.0, -1.4, 3.0, 0.0]
    m = regression_metrics(preds, labels)
    assert set(m) == KEYS and all(type(v) is float for v in m.values())
    assert tuple(m) == metrics.METRIC_KEYS
    # acc7: round(clip(., ±3)): preds 3, -0, 0, 0, -2 (half to even), 1, 3, 0; labels 3, 0, 1, -1, -2, -1, 3, 0
    assert m["acc7"] == 5 / 8
    # acc5: round(clip(., ±2)): preds 2, -0, 0, 0, -2, 1, 2, 0; labels 2, 0, 1, -1, -2, -1, 2, 0
    assert m["acc5"] == 5 / 8
    # non-0 samples (y != 0): indices 0, 2, 3, 4, 5, 6; pred >= 0: T, T, T, F, T, T; y >= 0: T, T, F, F, F, T
    assert m["acc2_non0"] == 4 / 6
    # classes True (support 3; tp 3, fp 2, fn 0 -> 6/8) and False (support 3; tp 1, fp 0, fn 2 -> 2/4)
    assert m["f1_non0"] == pytest.approx((3 * 6 / 8 + 3 * 2 / 4) / 6, abs=1e-15)
    # MMSA's non-0: pred > 0: T, F, F, F, T, T (the two exact 0s now negative); y > 0: T, T, F, F, F, T
    assert m["acc2_non0_mmsa"] == 4 / 6  # sample 2 (0 vs 1) now wrong, sample 3 (0 vs -0.6) now right
    # True: support 3, tp 2, fp 1, fn 1 -> 4/6; False: support 3, tp 2, fp 1, fn 1 -> 4/6
    assert m["f1_non0_mmsa"] == pytest.approx(4 / 6, abs=1e-15)
    assert m["mae_non0"] == pytest.approx((0.4 + 1.0 + 0.6 + 0.5 + 2.6 + 7.0) / 6, abs=1e-12)
    assert m["mae_all"] == pytest.approx((0.4 + 0.4 + 1.0 + 0.6 + 0.5 + 2.6 + 7.0 + 0.3) / 8, abs=1e-12)
    p, y = np.array([2.6, 0.0, 0.0, -2.5, 1.2, 10.0]), np.array([3.0, 1.0, -0.6, -2.0, -1.4, 3.0])
    assert m["corr_non0"] == pytest.approx(np.corrcoef(p, y)[0, 1], abs=1e-12)
    assert m["corr_all"] == pytest.approx(np.corrcoef(preds, labels)[0, 1], abs=1e-12)
    # has-0, all 8: pred >= 0: T F T T F T T T; y >= 0: T T T F F F T T -> 5 agree
    assert m["acc2_has0"] == 5 / 8
    # True: support 5, tp 4, fp 2, fn 1 -> 8/11; False: support 3, tp 1, fp 1, fn 2 -> 2/5
    assert m["f1_has0"] == pytest.approx((5 * 8 / 11 + 3 * 2 / 5) / 8, abs=1e-15)


def test_against_plain_reimplementation_on_random_data():
    for trial in range(20):
        n = int(torch.randint(2, 300, ()))
        labels = torch.round(torch.empty(n, dtype=torch.float64).uniform_(-3.4, 3.4) * 5) / 5  # with 0s and ties
        preds = labels * torch.rand(()) + torch.randn(n, dtype=torch.float64) * float(torch.rand(()) * 2)
        if trial % 4 == 0:
            preds = torch.round(preds * 2) / 2  # exact .5 ties for the rounding
        nz = labels != 0
        if nz.sum() < 2 or len(set(preds[nz].tolist())) < 2 or len(set(labels[nz].tolist())) < 2:
            continue  # np.corrcoef is undefined there (covered by the constant-input test)
        got, want = regression_metrics(preds, labels), plain_metrics(preds.tolist(), labels.tolist())
        for k in KEYS:
            assert got[k] == pytest.approx(want[k], abs=1e-12), (k, trial)


def test_weighted_f1_matches_brute_force():
    # sklearn's documented example: f1_score([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], average="weighted")
    assert weighted_f1([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1]) == pytest.approx(0.26666666666666666, abs=1e-15)
    assert weighted_f1([1, 1, 1], [1, 1, 1]) == 1.0
    assert weighted_f1([1, 1, 1], [0, 0, 0]) == 0.0  # class 1 never predicted: 0 (zero_division)
    assert weighted_f1([True, False], [True, True]) == pytest.approx(2 / 3 / 2)  # False never predicted
    assert math.isnan(weighted_f1([], []))
    for _ in range(200):
        n = int(torch.randint(1, 40, ()))
        k_true, k_pred = int(torch.randint(1, 5, ())), int(torch.randint(1, 5, ()))
        t, p = torch.randint(0, k_true, (n,)).tolist(), torch.randint(0, k_pred, (n,)).tolist()
        assert weighted_f1(t, p) == pytest.approx(brute_weighted_f1(t, p), abs=1e-14)
        tb, pb = [v > 0 for v in t], [v > 0 for v in p]
        assert weighted_f1(tb, pb) == pytest.approx(brute_weighted_f1(tb, pb), abs=1e-14)
    with pytest.raises(ValueError, match="same number of elements"):
        weighted_f1([1, 0], [1])


def test_all_labels_zero():
    m = regression_metrics([0.2, -0.7, 0.0], [0.0, 0.0, 0.0])
    assert all(math.isnan(m[k]) for k in ("acc2_non0", "f1_non0", "acc2_non0_mmsa", "f1_non0_mmsa", "mae_non0",
                                          "corr_non0"))
    assert m["acc7"] == m["acc5"] == 2 / 3  # round(-0.7) = -1
    assert m["mae_all"] == pytest.approx(0.3) and m["corr_all"] == 0.0  # constant labels
    assert m["acc2_has0"] == 2 / 3  # y = 0 counts as positive
    assert m["f1_has0"] == pytest.approx(brute_weighted_f1([True] * 3, [True, False, True]))


def test_constant_predictions_and_labels_give_zero_corr_silently():
    labels = np.linspace(-3, 3, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for c in (0.0, 0.1, -1.7, 1e-30):  # 0.1: the float mean of 50 copies is not exactly 0.1
            m = regression_metrics(np.full(50, c), labels)
            assert m["corr_all"] == m["corr_non0"] == 0.0
        assert regression_metrics(np.full(50, 0.1), labels)["acc2_non0"] == 25 / 50  # y=0 is not in linspace(., 50)
        assert pearson(np.arange(5.0), np.full(5, 2.0)) == 0.0
        assert pearson([1.0], [2.0]) == 0.0
        assert regression_metrics([0.5], [1.0])["corr_non0"] == 0.0
        assert math.isnan(pearson([], []))


def test_ties_at_zero():
    # MAG-BERT's rule (and has-0): a prediction of exactly 0 counts as positive
    m = regression_metrics([0.0, 0.0, 0.0, -0.0], [1.0, -1.0, 0.0, 2.0])
    assert m["acc2_non0"] == 2 / 3  # (0 vs 1): ok, (0 vs -1): wrong, (-0 vs 2): ok (-0.0 >= 0)
    assert m["acc2_has0"] == 3 / 4  # (0 vs 0) agrees
    # MMSA's non-0 rule: pred > 0 vs y > 0, so an exact 0 (or -0) is negative
    assert m["acc2_non0_mmsa"] == 1 / 3  # (0 vs 1): wrong, (0 vs -1): ok, (-0 vs 2): wrong
    # away from exact zeros the two non-0 rules agree
    m = regression_metrics([0.3, -0.2, 1e-9, -1e-9], [1.0, -1.0, 0.0, 2.0])
    assert m["acc2_non0"] == m["acc2_non0_mmsa"] == 2 / 3 and m["f1_non0"] == m["f1_non0_mmsa"]
    # acc7 rounds half to even, like np.round in the reference code
    assert regression_metrics([2.5, -2.5, 0.5, 1.5], [2.0, -2.0, 0.0, 2.0])["acc7"] == 1.0
    assert regression_metrics([3.6, -9.0], [3.0, -3.3])["acc7"] == 1.0  # clipped to ±3 first


def test_pearson_matches_numpy():
    for _ in range(20):
        n = int(torch.randint(2, 100, ()))
        x, y = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
        assert pearson(x, y) == pytest.approx(float(np.corrcoef(x.numpy(), y.numpy())[0, 1]), abs=1e-12)
    for _ in range(50):
        x = torch.randn(30, dtype=torch.float64) * 10 ** float(torch.randint(-5, 5, ()))
        up, down = pearson(x, 3 * x + 1), pearson(x, -x)
        assert 1 - 1e-12 <= up <= 1.0 and -1.0 <= down <= -1 + 1e-12  # never outside [-1, 1]


def test_torch_inputs():
    y = torch.empty(64).uniform_(-3, 3)
    p = y + torch.randn(64)
    ref = regression_metrics(p.numpy(), y.numpy())
    assert regression_metrics(p, y) == ref
    assert regression_metrics(p[:, None], y) == ref  # (N, 1) predictions, as a model head returns
    assert regression_metrics(p.requires_grad_(), y) == ref
    mb = regression_metrics(p.detach().bfloat16(), y)
    assert mb["mae_all"] == pytest.approx(ref["mae_all"], abs=0.05)


@pytest.mark.parametrize("preds, labels, err, pattern", [
    ([1.0, 2.0], [1.0], ValueError, "same number of elements; got 2 and 1"),
    ([], [], ValueError, "at least one sample"),
    ([float("nan"), 1.0], [1.0, 1.0], ValueError, "preds has 1 NaN/inf"),
    ([1.0, 1.0], [1.0, float("inf")], ValueError, "labels has 1 NaN/inf"),
    (["a"], [1.0], TypeError, "preds must be numeric"),
])
def test_regression_metrics_errors(preds, labels, err, pattern):
    with pytest.raises(err, match=pattern):
        regression_metrics(preds, labels)


# -- purification ------------------------------------------------------------------------------------

def test_purification_hand_case():
    gates = np.array([[1, 0, 0, 1], [0, 1, 1, 1]], np.float32)
    mask = np.array([[0, 1, 0, 0], [1, 0, 0, 1]], bool)
    r = purification_metrics(gates, mask)
    # impure steps: (0,1) closed, (1,0) closed, (1,3) open -> 2/3; clean: (0,0) open, (0,2) closed,
    # (0,3) open, (1,1) open, (1,2) open -> 1/5
    assert r == pytest.approx({"closed_impure": 2 / 3, "closed_clean": 0.2, "difference": 2 / 3 - 0.2})
    assert all(type(v) is float for v in r.values())
    # lengths: sample 1 keeps 2 steps -> impure (0,1), (1,0); clean (0,0), (0,2), (0,3), (1,1)
    r = purification_metrics(gates, mask, lengths=[4, 2])
    assert r == pytest.approx({"closed_impure": 1.0, "closed_clean": 0.25, "difference": 0.75})
    # soft gates count 1 - gate
    r = purification_metrics(np.full((2, 4), 0.25), mask)
    assert r == pytest.approx({"closed_impure": 0.75, "closed_clean": 0.75, "difference": 0.0})
    r = purification_metrics(gates, np.zeros((2, 4), bool))
    assert math.isnan(r["closed_impure"]) and r["closed_clean"] == 3 / 8 and math.isnan(r["difference"])


def test_purification_by_modality_on_synthetic_masks():
    ds = synthetic(n_train=40, n_dev=2, n_test=2, T=(9, 11, 13), dims=4, min_length=2)
    s = ds.train
    oracle = {m: (~s.impurity[m]).float() for m in s.impurity}  # open exactly on the clean steps
    r = purification_metrics(oracle, s.impurity, s.lengths)
    assert set(r) == {"text", "audio", "vision"}
    for m in r:
        assert r[m] == {"closed_impure": 1.0, "closed_clean": 0.0, "difference": 1.0}
    inverted = {m: s.impurity[m] for m in s.impurity}  # bool gate open exactly on the impure steps
    r = purification_metrics(inverted, s.impurity, s.lengths)
    assert all(r[m]["difference"] == -1.0 for m in r)
    # padding is ignored: closing it changes nothing
    padded_closed = {m: oracle[m] * (torch.arange(oracle[m].shape[1]) < s.lengths[m][:, None]) for m in oracle}
    assert purification_metrics(padded_closed, s.impurity, s.lengths) == purification_metrics(oracle, s.impurity,
                                                                                              s.lengths)
    # random gates: no separation (only the scored modality is needed)
    g = torch.rand(4000, 20) < 0.5
    mask = torch.rand(4000, 20) < 0.3
    r = purification_metrics({"audio": g}, {"audio": mask, "text": None})["audio"]
    assert abs(r["difference"]) < 0.03 and abs(r["closed_clean"] - 0.5) < 0.03


def test_purification_errors():
    g, m = np.ones((2, 3)), np.zeros((2, 3), bool)
    with pytest.raises(ValueError, match="impurity_masks must have the gates' shape"):
        purification_metrics(g, np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="gates must be \\(N, T\\)"):
        purification_metrics(np.ones(3), np.zeros(3, bool))
    with pytest.raises(ValueError, match="gates must lie in \\[0, 1\\]"):
        purification_metrics(g * 2, m)
    with pytest.raises(ValueError, match="gates must lie in \\[0, 1\\]"):
        purification_metrics(np.full((2, 3), np.nan), m)
    with pytest.raises(ValueError, match="impurity_masks must be boolean"):
        purification_metrics(g, np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="lengths must lie in \\[0, T = 3\\]"):
        purification_metrics(g, m, lengths=[1, 4])
    with pytest.raises(ValueError, match="lengths has 1 entries for 2 samples"):
        purification_metrics(g, m, lengths=[1])
    with pytest.raises(ValueError, match="impurity_masks has no entry for modality 'vision'"):
        purification_metrics({"vision": g}, {"text": m})
    with pytest.raises(ValueError, match="'text': gates must lie"):
        purification_metrics({"text": -g}, {"text": m})
    with pytest.raises(TypeError, match="impurity_masks must be one too"):
        purification_metrics({"text": g}, m)


def test_module_exports():
    assert {"regression_metrics", "purification_metrics", "weighted_f1", "pearson"} <= set(dir(metrics))
