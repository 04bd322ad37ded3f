"""The in-memory form every data source is converted to: one :class:`MultimodalSplit` per split, grouped
in a :class:`MultimodalData`, and :func:`collate` to batch samples (batch-first, fixed T per modality).

Everything is a CPU tensor: features float32, text either float32 features or int64 token ids, lengths and
the global sample index int64, labels float32, impurity masks bool.
"""
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset

MODALITIES = ("text", "audio", "vision")


def _as_tensor(value, dtype: torch.dtype) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return t.detach().to(device="cpu", dtype=dtype).contiguous()


class MultimodalSplit(Dataset):
    """N samples of text, audio and vision sequences with a sentiment label each.

    Args:
        text:   (N, T_l, d_l) float features, or (N, T_l) integer token ids (0 = padding, 1 = unknown).
        audio:  (N, T_a, d_a) float features.
        vision: (N, T_v, d_v) float features.
        labels: (N,) sentiment labels (MOSI/MOSEI: in [-3, 3]); must be finite.
        lengths: optional mapping modality -> (N,) valid steps per sample, each in [0, T_m]; steps
            t >= lengths[i] are padding. A modality left out is taken as fully valid (all T_m).
        index:  (N,) int64 global sample index, unique within a :class:`MultimodalData` and stable across
            epochs (it keys the per-sample gate noise). Default: 0..N-1.
        impurity: optional mapping modality -> (N, T_m) bool ground-truth impurity masks (synthetic data
            only); True marks an uninformative step. Padding steps are never impure.
        ids:    optional per-sample identifiers from the source (e.g. the MOSI segment names).
        name:   the split's name ("train", "dev", "test"), used in messages.

    Stored as attributes ``text``, ``audio``, ``vision``, ``labels``, ``lengths`` (dict over all three
    modalities), ``index``, ``impurity`` (dict or None), ``ids`` (list or None). ``features`` is the dict
    modality -> feature tensor.

    ``split[i]`` returns a dict of tensors (no copies; views into the split)::

        "text": (T_l, d_l) float32 or (T_l,) int64    "audio": (T_a, d_a)    "vision": (T_v, d_v)
        "text_lengths", "audio_lengths", "vision_lengths": () int64
        "label": () float32                          "index": () int64
        "text_impurity", ... : (T_m,) bool           (only when the split has impurity masks)

    :func:`collate` (or ``split.batch(indices)``, the same result without the per-sample detour) stacks
    these into a batch with the same keys except "label" -> "labels" (B,).
    """

    def __init__(self, text, audio, vision, labels, *, lengths: Optional[Mapping[str, object]] = None,
                 index=None, impurity: Optional[Mapping[str, object]] = None,
                 ids: Optional[Sequence[str]] = None, name: str = "split"):
        self.name = str(name)
        where = "split %r" % self.name
        text_t = text if isinstance(text, torch.Tensor) else torch.as_tensor(text)
        if text_t.dim() == 2 and not (text_t.dtype.is_floating_point or text_t.dtype == torch.bool):
            self.text = text_t.detach().to(device="cpu", dtype=torch.int64).contiguous()
            if self.text.numel() and int(self.text.min()) < 0:
                raise ValueError("%s: text token ids must be >= 0; got %d" % (where, int(self.text.min())))
        elif text_t.dim() == 3:
            self.text = _as_tensor(text_t, torch.float32)
        else:
            raise ValueError("%s: text must be (N, T_l, d_l) float features or (N, T_l) integer token ids; "
                             "got shape %s, dtype %s" % (where, tuple(text_t.shape), text_t.dtype))
        self.audio = _as_tensor(audio, torch.float32)
        self.vision = _as_tensor(vision, torch.float32)
        for m in ("audio", "vision"):
            if getattr(self, m).dim() != 3:
                raise ValueError("%s: %s must be (N, T, d); got shape %s"
                                 % (where, m, tuple(getattr(self, m).shape)))
        n = self.text.shape[0]
        self.labels = _as_tensor(labels, torch.float32).reshape(-1)
        for m, t in (("audio", self.audio), ("vision", self.vision), ("labels", self.labels)):
            if t.shape[0] != n:
                raise ValueError("%s: text has %d samples but %s has %d" % (where, n, m, t.shape[0]))
        if not bool(torch.isfinite(self.labels).all()):
            bad = int((~torch.isfinite(self.labels)).sum())
            raise ValueError("%s: %d labels are NaN or infinite" % (where, bad))

        self.lengths: Dict[str, torch.Tensor] = {}
        lengths = dict(lengths or {})
        unknown = set(lengths) - set(MODALITIES)
        if unknown:
            raise ValueError("%s: lengths has unknown modalities %s (expected %s)"
                             % (where, sorted(unknown), ", ".join(MODALITIES)))
        for m in MODALITIES:
            T = self.seq_len(m)
            if lengths.get(m) is None:
                self.lengths[m] = torch.full((n,), T, dtype=torch.int64)
                continue
            lt = torch.as_tensor(lengths[m])
            if lt.dtype.is_floating_point and not bool((lt == lt.round()).all()):
                raise ValueError("%s: %s lengths must be integers" % (where, m))
            lt = lt.to(torch.int64).reshape(-1).clone()  # loaders may pass one array for all modalities
            if lt.shape[0] != n:
                raise ValueError("%s: %s lengths has %d entries for %d samples" % (where, m, lt.shape[0], n))
            if n and (int(lt.min()) < 0 or int(lt.max()) > T):
                raise ValueError("%s: %s lengths must lie in [0, %d]; got [%d, %d]"
                                 % (where, m, T, int(lt.min()), int(lt.max())))
            self.lengths[m] = lt

        if index is None:
            self.index = torch.arange(n, dtype=torch.int64)
        else:
            self.index = torch.as_tensor(index).to(torch.int64).reshape(-1).contiguous()
            if self.index.shape[0] != n:
                raise ValueError("%s: index has %d entries for %d samples" % (where, self.index.shape[0], n))
            if torch.unique(self.index).numel() != n:
                raise ValueError("%s: index entries must be unique" % where)

        self.impurity: Optional[Dict[str, torch.Tensor]] = None
        if impurity is not None:
            self.impurity = {}
            for m, mask in impurity.items():
                if m not in MODALITIES:
                    raise ValueError("%s: impurity has unknown modality %r" % (where, m))
                mt = torch.as_tensor(mask).to(torch.bool).contiguous()
                if tuple(mt.shape) != (n, self.seq_len(m)):
                    raise ValueError("%s: %s impurity mask must have shape %s; got %s"
                                     % (where, m, (n, self.seq_len(m)), tuple(mt.shape)))
                pad = torch.arange(mt.shape[1]) >= self.lengths[m][:, None]
                if bool((mt & pad).any()):
                    raise ValueError("%s: %s impurity mask marks padding steps (t >= length)" % (where, m))
                self.impurity[m] = mt

        self.ids = None if ids is None else [str(i) for i in ids]
        if self.ids is not None and len(self.ids) != n:
            raise ValueError("%s: ids has %d entries for %d samples" % (where, len(self.ids), n))

    # -- description ---------------------------------------------------------------------------------
    @property
    def features(self) -> Dict[str, torch.Tensor]:
        return {"text": self.text, "audio": self.audio, "vision": self.vision}

    @property
    def text_is_tokens(self) -> bool:
        return self.text.dim() == 2

    def seq_len(self, modality: str) -> int:
        """T of one modality (the padded sequence length)."""
        return int(self.features[modality].shape[1])

    def feature_dim(self, modality: str) -> Optional[int]:
        """d of one modality; None for token-id text."""
        t = self.features[modality]
        return None if t.dim() == 2 else int(t.shape[2])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        shapes = ", ".join("%s=%s" % (m, tuple(t.shape)) for m, t in self.features.items())
        return "MultimodalSplit(%r, N=%d, %s%s)" % (self.name, len(self), shapes,
                                                    ", impurity" if self.impurity else "")

    # -- access --------------------------------------------------------------------------------------
    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError("split %r has %d samples; index %d is out of range" % (self.name, len(self), i))
        item = {m: t[i] for m, t in self.features.items()}
        for m in MODALITIES:
            item[m + "_lengths"] = self.lengths[m][i]
        item["label"] = self.labels[i]
        item["index"] = self.index[i]
        if self.impurity:
            for m, mask in self.impurity.items():
                item[m + "_impurity"] = mask[i]
        return item

    def batch(self, indices) -> Dict[str, torch.Tensor]:
        """The batch of samples ``indices`` (a sequence or 1-D tensor of positions), as :func:`collate`
        returns it, by indexing the stored tensors directly (much faster than a DataLoader)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        out = {m: t[idx] for m, t in self.features.items()}
        for m in MODALITIES:
            out[m + "_lengths"] = self.lengths[m][idx]
        out["labels"] = self.labels[idx]
        out["index"] = self.index[idx]
        if self.impurity:
            for m, mask in self.impurity.items():
                out[m + "_impurity"] = mask[idx]
        return out


def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack samples of a :class:`MultimodalSplit` into one batch (usable as a DataLoader ``collate_fn``).

    Returns a dict of batch-first tensors::

        "text": (B, T_l, d_l) float32 or (B, T_l) int64   "audio": (B, T_a, d_a)   "vision": (B, T_v, d_v)
        "text_lengths", "audio_lengths", "vision_lengths": (B,) int64
        "labels": (B,) float32                            "index": (B,) int64
        "text_impurity", ...: (B, T_m) bool               (when the samples carry impurity masks)

    Sequences keep their full padded T (MIM's mask learner mixes across a fixed T), so every sample of a
    split stacks without re-padding.
    """
    if len(items) == 0:
        raise ValueError("collate: got an empty list of samples")
    keys = list(items[0].keys())
    for j, it in enumerate(items):
        if set(it.keys()) != set(keys):
            raise ValueError("collate: sample %d has keys %s but sample 0 has %s"
                             % (j, sorted(it.keys()), sorted(keys)))
    out = {}
    for k in keys:
        out["labels" if k == "label" else k] = torch.stack([it[k] for it in items])
    return out


class MultimodalData:
    """The train/dev/test splits of one dataset and the dimensions a model is built from.

    Attributes:
        train, dev, test: :class:`MultimodalSplit`.
        vocab:  tuple of words (id -> word; 0 = "<pad>", 1 = "<unk>") when text is token ids, else None.
        name:   a short name ("mosi.pkl", "synthetic", ...); ``meta``: dict about the source
            (format, path, generation parameters).

    Derived (checked equal across the splits at construction):
        text_dim (d_l, None for token ids), vocab_size (None for features), audio_dim, vision_dim,
        seq_len: {"text": T_l, "audio": T_a, "vision": T_v}, dims: {"text": d_l or vocab_size, ...}.

    The global sample index of the splits must not collide (loaders number train, then dev, then test).
    """

    SPLITS = ("train", "dev", "test")

    def __init__(self, train: MultimodalSplit, dev: MultimodalSplit, test: MultimodalSplit, *,
                 vocab: Optional[Sequence[str]] = None, name: str = "", meta: Optional[dict] = None):
        self.train, self.dev, self.test = train, dev, test
        self.vocab = None if vocab is None else tuple(vocab)
        self.name = name
        self.meta = dict(meta or {})
        ref = train
        for s in (dev, test):
            if s.text_is_tokens != ref.text_is_tokens:
                raise ValueError("split %r has %s text but split %r has %s" % (
                    s.name, "token" if s.text_is_tokens else "feature", ref.name,
                    "token" if ref.text_is_tokens else "feature"))
            for m in MODALITIES:
                if (s.seq_len(m), s.feature_dim(m)) != (ref.seq_len(m), ref.feature_dim(m)):
                    raise ValueError("%s: split %r has (T, d) = %s but split %r has %s" % (
                        m, s.name, (s.seq_len(m), s.feature_dim(m)), ref.name,
                        (ref.seq_len(m), ref.feature_dim(m))))
        if ref.text_is_tokens:
            if self.vocab is None:
                raise ValueError("text is token ids but no vocab was given")
            top = max(int(s.text.max()) if s.text.numel() else 0 for s in self.splits.values())
            if top >= len(self.vocab):
                raise ValueError("a text token id (%d) is outside the vocab of %d words" % (top, len(self.vocab)))
        all_index = torch.cat([s.index for s in self.splits.values()])
        if torch.unique(all_index).numel() != all_index.numel():
            raise ValueError("the global sample index repeats across splits")

    @property
    def splits(self) -> Dict[str, MultimodalSplit]:
        return {"train": self.train, "dev": self.dev, "test": self.test}

    def __getitem__(self, split: str) -> MultimodalSplit:
        if split not in self.SPLITS:
            raise KeyError("split must be one of %s; got %r" % (", ".join(self.SPLITS), split))
        return self.splits[split]

    @property
    def text_is_tokens(self) -> bool:
        return self.train.text_is_tokens

    @property
    def text_dim(self) -> Optional[int]:
        return self.train.feature_dim("text")

    @property
    def vocab_size(self) -> Optional[int]:
        return None if self.vocab is None else len(self.vocab)

    @property
    def audio_dim(self) -> int:
        return int(self.train.feature_dim("audio"))

    @property
    def vision_dim(self) -> int:
        return int(self.train.feature_dim("vision"))

    @property
    def seq_len(self) -> Dict[str, int]:
        return {m: self.train.seq_len(m) for m in MODALITIES}

    @property
    def dims(self) -> Dict[str, int]:
        """Input width per modality: d_l (or the vocab size for token ids), d_a, d_v."""
        return {"text": self.vocab_size if self.text_is_tokens else self.text_dim,
                "audio": self.audio_dim, "vision": self.vision_dim}

    def __repr__(self) -> str:
        return "MultimodalData(%r, train=%d, dev=%d, test=%d, dims=%s, seq_len=%s%s)" % (
            self.name, len(self.train), len(self.dev), len(self.test), self.dims, self.seq_len,
            ", tokens" if self.text_is_tokens else "")
