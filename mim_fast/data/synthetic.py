"""A synthetic multimodal sentiment dataset with known impurity, generated on the fly (no files).

Each sample i has a latent sentiment z_i ~ U(-3, 3) and the label y_i = clip(z_i + label_noise·ε, -3, 3)
(continuous). Each modality m has a fixed random unit direction u_m (d_m,) and a strength s_m. A clean step
carries the sample's own sentiment; the impure steps of a sample carry a distractor sentiment drawn from
the same distribution (one per sample and modality: a coherent off-topic stretch, like a quote or
background speech):

    clean:   x[i, t] = s_m · z_i    · u_m + noise · ε[i, t]        ε ~ N(0, I_{d_m})
    impure:  x[i, t] = s_m · z'_im  · u_m + noise · ε[i, t]        z'_im ~ U(-3, 3), independent of y_i

so an impure step has exactly the marginal distribution of a clean one (it cannot be told apart by its
magnitude or any per-step statistic) but carries no information about the label; only its disagreement
with the majority of the sequence gives it away, which is what a context-aware mask learner can pick up.
Because the distractor does not average out over the impure steps, mean pooling over all steps is
clearly worse than over the clean ones (with the defaults, a least-squares probe on the per-modality
means reaches test MAE ~0.22 on clean steps, ~0.43 on all steps; predicting the median gives ~1.47).
Default strengths follow MOSI's ordering: text strongest, then audio, then vision.

Exactly round(impurity_m · length_i) valid steps of every sample are impure, at random positions; the
ground-truth masks are kept in ``split.impurity``. Padding (t >= length) is zero and never impure.
"""
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np

from .dataset import MODALITIES, MultimodalData, MultimodalSplit

PerModality = Union[float, int, Sequence, Mapping]


def _per_modality(name: str, value: PerModality, kind=float) -> Dict[str, object]:
    if isinstance(value, Mapping):
        missing = [m for m in MODALITIES if m not in value]
        if missing or set(value) - set(MODALITIES):
            raise ValueError("%s must have exactly the keys %s; got %s" % (name, ", ".join(MODALITIES),
                                                                         sorted(value)))
        out = {m: value[m] for m in MODALITIES}
    elif isinstance(value, (list, tuple)):
        if len(value) != len(MODALITIES):
            raise ValueError("%s must have %d entries (text, audio, vision); got %d"
                             % (name, len(MODALITIES), len(value)))
        out = dict(zip(MODALITIES, value))
    else:
        out = {m: value for m in MODALITIES}
    for m, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError("%s[%r] must be a number; got %s" % (name, m, type(v).__name__))
        if kind is int and int(v) != v:
            raise TypeError("%s[%r] must be an int; got %r" % (name, m, v))
        out[m] = kind(v)
    return out


def synthetic(n_train: int = 2000, n_dev: int = 400, n_test: int = 400, T: PerModality = 20,
              dims: PerModality = (32, 16, 16), impurity: PerModality = 0.3, seed: int = 0, *,
              strength: PerModality = (0.8, 0.5, 0.35), noise: float = 1.0, label_noise: float = 0.1,
              min_length: Optional[PerModality] = None, marker: PerModality = 0.0,
              contiguous: bool = False) -> MultimodalData:
    """Generate the synthetic dataset (see the module docstring for the model).

    Args:
        n_train, n_dev, n_test: samples per split (each >= 1).
        T, dims, impurity, strength, min_length: one value for all modalities, a (text, audio, vision)
            triple, or a dict keyed by modality. ``T``: padded length; ``dims``: feature width d_m;
            ``impurity`` in [0, 1]: fraction of impure valid steps; ``strength``: s_m.
        seed: the same seed gives bit-identical data (for a given numpy version: numpy's PCG64 and its
            normal/uniform samplers); the splits use independent streams, so they differ, and changing one
            split's size does not change the others or the directions u_m.
        noise: std of the per-step Gaussian noise; label_noise: std of the label noise.
        min_length: None -> every sample uses all T_m steps (as MIM pools over all T); else lengths are
            drawn uniformly from [min_length_m, T_m] per sample and modality.
        marker: 0 (default) keeps impure steps indistinguishable step by step; a value c > 0 adds c·w_m
            to every impure step, w_m a fixed random unit direction orthogonal to u_m — a signature the
            impurity carries, as background speech or a sensor fault has its own spectrum — so a
            per-step mask learner can spot it (``mim-fast train``'s demo uses 3.0).
        contiguous: False (default) scatters the impure steps at random valid positions; True makes them
            one run of consecutive steps per sample at a uniform random start (the "off-topic stretch"
            above; same count per sample, same random stream). The demo uses True: its encoders mix
            neighbouring steps (Conv1d k=3), so a scattered impure step is mostly clean context after
            encoding, while a stretch stays impure inside.

    Returns a :class:`MultimodalData` with float text features, impurity masks on every split, and
    ``meta`` holding the parameters and the directions u_m (``meta["directions"][m]``, float64 (d_m,)).
    """
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError("n_%s must be an int >= 1; got %r" % (k, v))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError("seed must be an int >= 0; got %r" % (seed,))
    Ts = _per_modality("T", T, int)
    ds = _per_modality("dims", dims, int)
    imp = _per_modality("impurity", impurity)
    ss = _per_modality("strength", strength)
    for m in MODALITIES:
        if Ts[m] < 1 or ds[m] < 1:
            raise ValueError("T and dims must be >= 1; got T[%r] = %d, dims[%r] = %d" % (m, Ts[m], m, ds[m]))
        if not 0.0 <= imp[m] <= 1.0:
            raise ValueError("impurity[%r] must lie in [0, 1]; got %r" % (m, imp[m]))
    mins = None
    if min_length is not None:
        mins = _per_modality("min_length", min_length, int)
        for m in MODALITIES:
            if not 0 <= mins[m] <= Ts[m]:
                raise ValueError("min_length[%r] must lie in [0, T = %d]; got %d" % (m, Ts[m], mins[m]))
    for name, v in (("noise", noise), ("label_noise", label_noise)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0):
            raise ValueError("%s must be a finite number >= 0; got %r" % (name, v))

    marks = _per_modality("marker", marker)
    dir_seq, *split_seqs, mark_seq = np.random.SeedSequence(seed).spawn(2 + len(MultimodalData.SPLITS))
    dir_rng = np.random.default_rng(dir_seq)
    directions = {}
    for m in MODALITIES:
        u = dir_rng.standard_normal(ds[m])
        directions[m] = u / np.linalg.norm(u)
    # marker directions: drawn from their own stream (so marker=0 leaves every other number unchanged),
    # made orthogonal to u_m so the marker carries no sentiment
    mark_rng = np.random.default_rng(mark_seq)
    markers = {}
    for m in MODALITIES:
        w = mark_rng.standard_normal(ds[m])
        w = w - directions[m] * (w @ directions[m]) if ds[m] > 1 else w
        markers[m] = w / np.linalg.norm(w)

    splits = {}
    start = 0
    for split, seq in zip(MultimodalData.SPLITS, split_seqs):
        n = sizes[split]
        rng = np.random.default_rng(seq)
        z = rng.uniform(-3.0, 3.0, n)
        labels = np.clip(z + label_noise * rng.standard_normal(n), -3.0, 3.0)
        feats, lengths, masks = {}, {}, {}
        for m in MODALITIES:
            Tm, dm = Ts[m], ds[m]
            if mins is None:
                length = np.full(n, Tm, np.int64)
            else:
                length = rng.integers(mins[m], Tm + 1, n).astype(np.int64)
            valid = np.arange(Tm)[None, :] < length[:, None]
            # exactly round(impurity * length) impure steps per sample, at uniformly random valid positions:
            # rank random keys among the valid steps and take the lowest ranks
            keys = np.where(valid, rng.random((n, Tm)), np.inf)
            ranks = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
            n_impure = np.round(imp[m] * length).astype(np.int64)
            if contiguous:
                # one run of n_impure consecutive steps at a uniform start in [0, length - n_impure], the
                # start drawn from the same keys (so the random stream, and every other number, is unchanged)
                u0 = np.where(valid[:, 0], keys[:, 0], 0.0) if Tm else np.zeros(n)
                first = np.minimum(np.floor(u0 * (length - n_impure + 1)).astype(np.int64), length - n_impure)
                pos = np.arange(Tm)[None, :]
                mask = (pos >= first[:, None]) & (pos < (first + n_impure)[:, None]) & valid
            else:
                mask = (ranks < n_impure[:, None]) & valid
            latent = np.where(mask, rng.uniform(-3.0, 3.0, (n, 1)), z[:, None])
            x = ss[m] * latent[:, :, None] * directions[m][None, None, :]
            x = x + noise * rng.standard_normal((n, Tm, dm))
            if marks[m]:
                x = x + marks[m] * mask[:, :, None] * markers[m][None, None, :]
            x[~valid] = 0.0
            feats[m], lengths[m], masks[m] = x.astype(np.float32), length, mask
        splits[split] = MultimodalSplit(feats["text"], feats["audio"], feats["vision"],
                                        labels.astype(np.float32), lengths=lengths,
                                        index=np.arange(start, start + n, dtype=np.int64),
                                        impurity=masks, name=split)
        start += n

    meta = {"format": "synthetic", "seed": seed, "T": Ts, "dims": ds, "impurity": imp, "strength": ss,
            "noise": float(noise), "label_noise": float(label_noise), "min_length": mins, "marker": marks,
            "directions": directions, "marker_directions": markers}
    return MultimodalData(splits["train"], splits["dev"], splits["test"], name="synthetic", meta=meta)
