"""Evaluation metrics: MOSI/MOSEI sentiment metrics in both conventions papers report — MAG-BERT's,
which MIM publishes (SPEC §4), and MMSA's — each under its own name, and how well the purification gates
find known impurity (synthetic data).

All functions take numpy arrays or torch tensors (any device/dtype; they are copied to the host as float64)
and return plain Python floats. No scikit-learn: weighted F1 is implemented here with sklearn's exact
``f1_score(average="weighted")`` semantics.
"""
import math
from typing import Dict, Mapping

import numpy as np


def _numpy(name: str, value, dtype=np.float64) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor (bf16/fp16 upcast first)
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.double()
        value = value.numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError("%s must be numeric (a numpy array or torch tensor); got %s"
                        % (name, type(value).__name__)) from None


def _vector(name: str, value) -> np.ndarray:
    arr = _numpy(name, value).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError("%s has %d NaN/inf values" % (name, int(np.count_nonzero(~np.isfinite(arr)))))
    return arr


def weighted_f1(y_true, y_pred) -> float:
    """F1 per class, averaged with the class supports as weights: sklearn's
    ``f1_score(y_true, y_pred, average="weighted")`` with its default zero_division (0).

    The classes are the union of the labels in y_true and y_pred; a class's F1 is 2·tp / (2·tp + fp + fn)
    (equal to 2PR/(P+R), and 0 where tp = 0, which is where sklearn's zero_division applies); a class that
    is predicted but never true has weight 0. Empty input gives NaN.
    """
    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred must have the same number of elements; got %d and %d"
                         % (t.size, p.size))
    if t.size == 0:
        return float("nan")
    total = 0.0
    for c in np.union1d(t, p):
        is_t, is_p = t == c, p == c
        tp = int(np.count_nonzero(is_t & is_p))
        fp = int(np.count_nonzero(~is_t & is_p))
        fn = int(np.count_nonzero(is_t & ~is_p))
        denom = 2 * tp + fp + fn
        total += (2.0 * tp / denom if denom else 0.0) * int(np.count_nonzero(is_t))
    return float(total / t.size)


def pearson(x, y) -> float:
    """Pearson correlation in float64, clipped to [-1, 1].

    Where it is undefined (fewer than 2 samples, or x or y constant) it is 0.0, silently: a model that
    predicts a constant has no linear relation with the labels (np.corrcoef would warn and give NaN).
    Empty input gives NaN.
    """
    x = _numpy("x", x).reshape(-1)
    y = _numpy("y", y).reshape(-1)
    if x.shape != y.shape:
        raise ValueError("x and y must have the same number of elements; got %d and %d" % (x.size, y.size))
    if x.size == 0:
        return float("nan")
    # test constancy exactly: the mean of equal values may not round to that value, leaving dx ~ 1e-17
    if x.size < 2 or x.max() == x.min() or y.max() == y.min():
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if not denom > 0 or not math.isfinite(denom):
        return 0.0
    return float(min(1.0, max(-1.0, float(dx @ dy) / denom)))


# The keys of regression_metrics, in the order the README's table lists them (each convention by name).
METRIC_KEYS = ("mae_all", "corr_all", "mae_non0", "corr_non0", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0",
               "acc2_non0_mmsa", "f1_non0_mmsa", "acc5", "acc7")


def _binary(pred_pos, label_pos):
    """(accuracy, weighted F1) of two boolean vectors; NaN for empty ones."""
    if pred_pos.size == 0:
        return float("nan"), float("nan")
    return float(np.mean(pred_pos == label_pos)), weighted_f1(label_pos, pred_pos)


def regression_metrics(preds, labels) -> Dict[str, float]:
    """MOSI/MOSEI sentiment metrics, every convention the literature mixes, each under its own name.

    Two codebases define the conventions papers report: MAG-BERT's ``test_score_model(use_zero=False)``
    (github WasifurRahman/BERT_multimodal_transformer), which MIM's released code copies and whose
    numbers MIM publishes (SPEC §4), and MMSA's ``MetricsTop`` (github thuiar/MMSA), which many later
    papers use. They differ in which samples MAE/Corr see and in how a prediction of exactly 0 is
    classified.

    Args:
        preds, labels: N predictions and labels (any shapes with N elements each; numpy or torch), finite.

    Returns a dict of Python floats (no rounding; MMSA rounds to 4 decimals):
        mae_all, corr_all:   mean |pred - y| and Pearson correlation on all samples (MMSA; MAG-BERT with
                             use_zero=True).
        mae_non0, corr_non0: the same on the samples with y != 0 (MAG-BERT's default, what MIM reports).
        acc2_has0, f1_has0:  accuracy and weighted F1 (:func:`weighted_f1`) of pred >= 0 vs y >= 0 on all
                             samples ("Has0": MMSA; MAG-BERT with use_zero=True: the same rule).
        acc2_non0, f1_non0:  pred >= 0 vs y >= 0 on the samples with y != 0: MAG-BERT's rule, what MIM
                             reports ("Non0"; a prediction of exactly 0 counts as positive).
        acc2_non0_mmsa, f1_non0_mmsa: pred > 0 vs y > 0 on the samples with y != 0: MMSA's "Non0" rule
                             (a prediction of exactly 0 counts as negative). Differs from acc2_non0 only
                             where a prediction is exactly 0.
        acc5:                on all samples, round(clip(pred, -2, 2)) == round(clip(y, -2, 2)) (MMSA's
                             Mult_acc_5, the older MAG-BERT's mult_a5).
        acc7:                on all samples, round(clip(pred, -3, 3)) == round(clip(y, -3, 3)) (MIM, MMSA).
        Rounding is numpy's (half to even: 2.5 -> 2, -0.5 -> -0), as in all three codebases. Pearson
        correlation is 0 where it is undefined (:func:`pearson`: constant predictions or labels; numpy
        would give NaN). The *_non0 values are NaN when every label is 0.
    Raises ValueError for different sizes, no samples, or NaN/inf values.
    """
    p = _vector("preds", preds)
    y = _vector("labels", labels)
    if p.size != y.size:
        raise ValueError("preds and labels must have the same number of elements; got %d and %d"
                         % (p.size, y.size))
    if p.size == 0:
        raise ValueError("regression_metrics needs at least one sample")
    nz = y != 0
    pn, yn = p[nz], y[nz]
    out = {"mae_all": float(np.mean(np.abs(p - y))), "corr_all": pearson(p, y)}
    out["mae_non0"] = float(np.mean(np.abs(pn - yn))) if pn.size else float("nan")
    out["corr_non0"] = pearson(pn, yn) if pn.size else float("nan")
    out["acc2_has0"], out["f1_has0"] = _binary(p >= 0, y >= 0)
    out["acc2_non0"], out["f1_non0"] = _binary(pn >= 0, yn >= 0)
    out["acc2_non0_mmsa"], out["f1_non0_mmsa"] = _binary(pn > 0, yn > 0)
    for k, bound in ((5, 2.0), (7, 3.0)):
        out["acc%d" % k] = float(np.mean(np.round(np.clip(p, -bound, bound)) == np.round(np.clip(y, -bound, bound))))
    return {k: out[k] for k in METRIC_KEYS}


def _purification_one(prefix: str, gate, mask, lengths) -> Dict[str, float]:
    g = _numpy(prefix + "gates", gate)
    mk = _numpy(prefix + "impurity_masks", mask)
    if g.ndim != 2:
        raise ValueError("%sgates must be (N, T); got shape %s" % (prefix, g.shape))
    if mk.shape != g.shape:
        raise ValueError("%simpurity_masks must have the gates' shape %s; got %s" % (prefix, g.shape, mk.shape))
    if not np.all((mk == 0) | (mk == 1)):
        raise ValueError("%simpurity_masks must be boolean (0/1)" % prefix)
    if not np.all((g >= 0) & (g <= 1)):  # also rejects NaN
        raise ValueError("%sgates must lie in [0, 1] (1 = open)" % prefix)
    N, T = g.shape
    valid = np.ones((N, T), bool)
    if lengths is not None:
        L = _numpy(prefix + "lengths", lengths).reshape(-1)
        if L.size != N:
            raise ValueError("%slengths has %d entries for %d samples" % (prefix, L.size, N))
        if not np.all((L >= 0) & (L <= T)):
            raise ValueError("%slengths must lie in [0, T = %d]" % (prefix, T))
        valid = np.arange(T)[None, :] < L[:, None]
    impure = (mk == 1) & valid
    clean = (mk == 0) & valid
    closed = 1.0 - g
    ci = float(closed[impure].mean()) if impure.any() else float("nan")
    cc = float(closed[clean].mean()) if clean.any() else float("nan")
    return {"closed_impure": ci, "closed_clean": cc, "difference": ci - cc}


def purification_metrics(gates, impurity_masks, lengths=None):
    """How selectively the gates close on the impure steps.

    Args:
        gates: (N, T) gate values in [0, 1], 1 = open (the ``gate`` output of purify_gate; bool works
            too); a soft gate counts as closed by 1 - gate, its expected closure.
        impurity_masks: (N, T) bool, True = impure (``MultimodalSplit.impurity``).
        lengths: optional (N,): steps t >= lengths[i] are padding and ignored.
        Each may be a dict keyed by modality (gates' keys decide which modalities are scored; the masks
        must have them, lengths may leave them out), or a single array for one modality.

    Returns, per modality (a dict of dicts when gates is a dict, else one dict) of Python floats:
        closed_impure: mean closure over the valid impure steps (NaN if there are none),
        closed_clean:  mean closure over the valid clean steps (NaN if there are none),
        difference:    closed_impure - closed_clean (1 = perfect purification, 0 = no better than chance
                       at the same closing rate, < 0 = closing the informative steps).
    """
    if isinstance(gates, Mapping):
        if not isinstance(impurity_masks, Mapping):
            raise TypeError("gates is a dict by modality, so impurity_masks must be one too")
        if lengths is not None and not isinstance(lengths, Mapping):
            raise TypeError("gates is a dict by modality, so lengths must be one too (or None)")
        out = {}
        for m, g in gates.items():
            if m not in impurity_masks:
                raise ValueError("impurity_masks has no entry for modality %r (has: %s)"
                                 % (m, sorted(impurity_masks)))
            out[m] = _purification_one("%r: " % m, g, impurity_masks[m], None if lengths is None else lengths.get(m))
        return out
    return _purification_one("", gates, impurity_masks, lengths)
