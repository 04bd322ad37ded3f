"""Readers for the two published pickle formats of CMU-MOSI / CMU-MOSEI.

* MAG-BERT (the files MIM reads): ``{"train"|"dev"|"test": [((words, visual (L, d_v), acoustic (L, d_a)),
  label, segment), ...]}``, word-aligned (one visual and one acoustic row per word). MOSI: d_v = 47,
  d_a = 74; MOSEI: d_v = 35, d_a = 74.
* MMSA: ``{"train"|"valid"|"test": {"text": (N, T_l, 768), "audio": (N, T_a, d_a), "vision": (N, T_v, d_v),
  "regression_labels": (N,), optional "audio_lengths"/"vision_lengths" (N,), "text_bert" (N, 3, T_l),
  "id" (N,), ...}}``, aligned (all T equal) or unaligned.

Both become a :class:`~mim_fast.data.MultimodalData`. Errors are ``ValueError`` naming the file and what is
wrong (a missing file raises :class:`DataFileNotFoundError`, which is both a ``FileNotFoundError`` and a
``ValueError``).

Security: unpickling can run arbitrary code. These readers use a restricted unpickler that only builds
plain data (Python containers, str/bytes/numbers, numpy arrays, dtypes and scalars) and refuses any other
class or function *before* calling it; ``trusted=True`` switches to plain ``pickle.load`` for files that
need more. Even so, only load pickles from sources you trust.
"""
import os
import pickle
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .dataset import MODALITIES, MultimodalData, MultimodalSplit

PAD_ID, UNK_ID = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
NONFINITE_OPTIONS = ("zero", "error")


class DataFileNotFoundError(FileNotFoundError, ValueError):
    """The data file does not exist (catchable as FileNotFoundError or ValueError)."""


# The sentiment scale of CMU-MOSI / CMU-MOSEI (and CH-SIMS's [-1, 1] lies within it): a label outside it
# means a corrupt or mislabelled file. ``label_range=None`` lifts the check.
LABEL_RANGE = (-3.0, 3.0)


class NonFiniteFeatureWarning(UserWarning):
    """NaN/inf feature values were replaced by 0 while loading (see ``nonfinite=``)."""


# -- restricted unpickling ---------------------------------------------------------------------------

# (module, name) pairs a data pickle may refer to. numpy arrays pickle as _reconstruct/ndarray/dtype (plus
# _frombuffer for protocol 5 and _codecs.encode for protocol <= 2 byte strings); numpy scalars as scalar.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
} | {("builtins", n) for n in ("set", "frozenset", "complex", "slice", "range", "bytearray", "list", "dict",
                                "tuple", "int", "float", "str", "bytes", "bool")}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "numpy.core" or module.startswith("numpy.core."):
            # pickles written by numpy 1.x name numpy.core, which numpy 2 moved to numpy._core
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in _SAFE_GLOBALS:
            raise _RefusedGlobal("%s.%s" % (module, name))
        return super().find_class(module, name)


def _err(path, msg: str) -> ValueError:
    return ValueError("%s: %s" % (path, msg))


def read_pickle(path, *, trusted: bool = False):
    """Unpickle ``path`` (restricted to plain data unless ``trusted``); ValueError on any failure."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataFileNotFoundError(2, "data file not found", path) from None
    except IsADirectoryError:
        raise _err(path, "is a directory, not a data file") from None
    except OSError as e:
        raise _err(path, "cannot be opened: %s" % e) from None
    with f:
        # latin1 lets numpy arrays written by Python 2 load (their raw bytes were pickled as str)
        unpickler = pickle.Unpickler(f, encoding="latin1") if trusted else _DataUnpickler(f, encoding="latin1")
        try:
            return unpickler.load()
        except _RefusedGlobal as e:
            raise _err(path, "the pickle refers to %s, which is not plain data (lists, dicts, numpy arrays); "
                             "refusing to run it. If you trust this file, pass trusted=True (mim-fast train: --trust-data)" % e) from None
        except EOFError:
            raise _err(path, "is empty or truncated (pickle data ended early)") from None
        except Exception as e:  # pickle reports corruption as many exception types
            raise _err(path, "is not a readable pickle (corrupt or truncated?): %s: %s"
                       % (type(e).__name__, e)) from None


def detect_format(obj) -> Optional[str]:
    """"magbert", "mmsa" or None for an unpickled object, from its structure only."""
    if not isinstance(obj, Mapping) or "train" not in obj:
        return None
    if isinstance(obj["train"], (list, tuple)):
        return "magbert"
    if isinstance(obj["train"], Mapping):
        return "mmsa"
    return None


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        inner = ", ".join("%r: %s" % (k, type(v).__name__) for k, v in list(obj.items())[:6])
        return "a dict {%s%s}" % (inner, ", ..." if len(obj) > 6 else "")
    return "a %s" % type(obj).__name__


def _check_nonfinite(mode) -> None:
    if mode not in NONFINITE_OPTIONS:
        raise ValueError("nonfinite must be one of %s; got %r" % (", ".join(map(repr, NONFINITE_OPTIONS)), mode))


# -- non-finite features -----------------------------------------------------------------------------

class _NonFinite:
    """Replaces NaN/inf in feature arrays by 0 (nonfinite="zero") or refuses them ("error"), and warns
    once per file with the counts."""

    def __init__(self, path, mode: str):
        _check_nonfinite(mode)
        self.path, self.mode, self.counts = path, mode, []

    def clean(self, arr: np.ndarray, where: str) -> np.ndarray:
        bad = ~np.isfinite(arr)
        n = int(np.count_nonzero(bad))
        if n:
            if self.mode == "error":
                first = int(np.argwhere(bad)[0][0])
                raise _err(self.path, "%s has %d NaN/inf values (first in sample %d); pass nonfinite='zero' "
                                      "to replace them with 0" % (where, n, first))
            if not arr.flags.writeable:  # e.g. an array viewing a bytes object of the pickle
                arr = arr.copy()
            arr[bad] = 0.0
            self.counts.append("%s: %d" % (where, n))
        return arr

    def report(self) -> None:
        if self.counts:
            warnings.warn("%s: replaced NaN/inf feature values with 0 (%s); pass nonfinite='error' to refuse "
                          "such files" % (self.path, ", ".join(self.counts)), NonFiniteFeatureWarning,
                          stacklevel=4)  # report <- _from_* <- load* <- the caller


def _float_array(value, path, where: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError("dtype %s" % arr.dtype)
        arr = arr.astype(np.float32, copy=False)
    except (TypeError, ValueError) as e:
        raise _err(path, "%s must be a numeric array; got %s (%s)" % (where, type(value).__name__, e)) from None
    if arr.ndim != ndim:
        raise _err(path, "%s must be %d-D; got shape %s" % (where, ndim, arr.shape))
    return arr


def _label(value, path, where: str, label_range) -> float:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise _err(path, "%s: label must be a number or a one-element array; got %r" % (where, value)) from None
    if arr.size != 1:
        raise _err(path, "%s: label must have exactly one value; got shape %s" % (where, np.shape(value)))
    _check_labels(arr, path, where, label_range)
    return float(arr[0])


def _check_label_range(label_range) -> None:
    if label_range is not None:
        try:
            lo, hi = (float(v) for v in label_range)
        except (TypeError, ValueError):
            lo = hi = float("nan")
        if not lo <= hi:
            raise ValueError("label_range must be None or (low, high) with low <= high; got %r" % (label_range,))


def _check_labels(labels: np.ndarray, path, where: str, label_range, sample_offset: int = 0) -> None:
    """Refuse NaN/inf labels and labels outside ``label_range``, naming the file, split and first sample.
    ``where`` names the sample (MAG-BERT) or the split (MMSA, then the first bad index is appended)."""
    bad = ~np.isfinite(labels)
    if bad.any():
        first = int(np.argmax(bad))
        raise _err(path, "%s%s: label is %s (%d NaN/inf label%s)" % (
            where, "" if labels.size == 1 else " sample %d" % (first + sample_offset), labels[first],
            int(bad.sum()), "" if bad.sum() == 1 else "s"))
    if label_range is None:
        return
    lo, hi = label_range
    out = (labels < lo) | (labels > hi)
    if out.any():
        first = int(np.argmax(out))
        raise _err(path, "%s%s: label %g is outside [%g, %g], the sentiment scale of CMU-MOSI/MOSEI (%d label%s "
                         "outside); pass label_range=None to load it anyway" % (
                             where, "" if labels.size == 1 else " sample %d" % (first + sample_offset),
                             labels[first], lo, hi, int(out.sum()), "" if out.sum() == 1 else "s"))


def _word(w) -> str:
    if isinstance(w, bytes):
        return w.decode("utf-8", "replace")
    return str(w)


def _global_index(sizes: Sequence[int]) -> List[np.ndarray]:
    starts = np.cumsum([0] + list(sizes))
    return [np.arange(starts[i], starts[i + 1], dtype=np.int64) for i in range(len(sizes))]


# -- MAG-BERT ------------------------------------------------------------------------------------------

def load_magbert_pickle(path, max_len: int = 50, *, nonfinite: str = "zero", trusted: bool = False,
                        label_range=LABEL_RANGE) -> MultimodalData:
    """Load a MAG-BERT pickle (the MOSI/MOSEI files MIM reads) as token-id text + audio + vision.

    Each sample ``((words, visual (L, d_v), acoustic (L, d_a)), label, segment)`` is word-aligned: the three
    modalities share L. Sequences are truncated to their first ``max_len`` steps or zero-padded at the end
    to ``max_len``; ``lengths`` = min(L, max_len) for all three modalities.

    Text becomes int64 token ids from a vocabulary of the words of the train split, in order of first
    appearance: id 0 = padding ("<pad>"), 1 = unknown ("<unk>"; dev/test words not seen in train), 2.. the
    train words (the vocab counts every train word, also those past ``max_len``). Words are kept as
    written (no lower-casing); bytes are decoded as UTF-8.

    Labels may be numbers or arrays of any shape holding one value (MAG-BERT stores (1, 1)); they become
    float32. ``segment`` becomes the split's ``ids``. The global sample index numbers train, then dev, then
    test. ``nonfinite``: "zero" replaces NaN/inf feature values with 0 and emits one
    :class:`NonFiniteFeatureWarning` with the counts (some released MOSI pickles carry -inf in acoustic
    features; MMSA's and MulT's loaders zero them the same way), "error" raises instead.

    Raises ValueError (naming the file) for a missing/unreadable/corrupt file, a pickle of another format,
    a missing or empty split, a malformed sample, modalities of different L within a sample, a visual or
    acoustic width that differs from the first sample's, non-numeric features, or a label that is NaN/inf
    or outside ``label_range`` (default [-3, 3], MOSI/MOSEI's scale; None: no range check) — naming the
    split and sample. See the module docstring on the safety of unpickling (``trusted``).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError("max_len must be an int >= 1; got %r" % (max_len,))
    _check_nonfinite(nonfinite)
    _check_label_range(label_range)
    obj = read_pickle(path, trusted=trusted)
    return _from_magbert(obj, os.fspath(path), max_len, nonfinite, label_range)


def _from_magbert(obj, path, max_len: int, nonfinite: str, label_range=LABEL_RANGE) -> MultimodalData:
    fix = _NonFinite(path, nonfinite)
    if detect_format(obj) != "magbert":
        raise _err(path, "not a MAG-BERT pickle: expected a dict {'train'|'dev'|'test': [((words, visual, "
                         "acoustic), label, segment), ...]}; got %s" % _describe(obj))
    parsed: Dict[str, list] = {}
    dims: Dict[str, Tuple[int, str]] = {}  # modality -> (width, where it was first seen)
    for split in MultimodalData.SPLITS:
        if split not in obj:
            raise _err(path, "MAG-BERT pickle has no %r split (keys: %s)" % (split, sorted(map(str, obj))))
        entries = obj[split]
        if not isinstance(entries, (list, tuple)):
            raise _err(path, "split %r must be a list of samples; got %s" % (split, type(entries).__name__))
        if len(entries) == 0:
            raise _err(path, "split %r is empty" % split)
        rows = []
        for i, entry in enumerate(entries):
            where = "split %r sample %d" % (split, i)
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3
                    and isinstance(entry[0], (list, tuple)) and len(entry[0]) == 3):
                raise _err(path, "%s must be ((words, visual, acoustic), label, segment); got %s"
                           % (where, _shape_of(entry)))
            (words, visual, acoustic), label, segment = entry
            if isinstance(words, (str, bytes)) or not hasattr(words, "__len__"):
                raise _err(path, "%s: words must be a sequence of words; got %s" % (where, type(words).__name__))
            words = [_word(w) for w in words]
            visual = _float_array(visual, path, "%s: visual" % where, 2)
            acoustic = _float_array(acoustic, path, "%s: acoustic" % where, 2)
            if not len(words) == visual.shape[0] == acoustic.shape[0]:
                raise _err(path, "%s: the modalities are not word-aligned: %d words, %d visual rows, "
                                 "%d acoustic rows" % (where, len(words), visual.shape[0], acoustic.shape[0]))
            for m, arr in (("visual", visual), ("acoustic", acoustic)):
                if m not in dims:
                    dims[m] = (arr.shape[1], where)
                elif arr.shape[1] != dims[m][0]:
                    raise _err(path, "inconsistent %s width: %s has %d features but %s has %d"
                               % (m, where, arr.shape[1], dims[m][1], dims[m][0]))
            rows.append((words, visual, acoustic, _label(label, path, where, label_range), segment))
        parsed[split] = rows

    vocab = {PAD_TOKEN: PAD_ID, UNK_TOKEN: UNK_ID}
    for words, *_ in parsed["train"]:
        for w in words:
            if w not in vocab:
                vocab[w] = len(vocab)

    dv, da = dims["visual"][0], dims["acoustic"][0]
    index = _global_index([len(parsed[s]) for s in MultimodalData.SPLITS])
    splits = {}
    for k, split in enumerate(MultimodalData.SPLITS):
        rows = parsed[split]
        n = len(rows)
        text = np.zeros((n, max_len), np.int64)
        vision = np.zeros((n, max_len, dv), np.float32)
        audio = np.zeros((n, max_len, da), np.float32)
        lengths = np.zeros(n, np.int64)
        labels = np.zeros(n, np.float32)
        ids = []
        for i, (words, visual, acoustic, label, segment) in enumerate(rows):
            L = min(len(words), max_len)
            text[i, :L] = [vocab.get(w, UNK_ID) for w in words[:L]]
            vision[i, :L] = visual[:L]
            audio[i, :L] = acoustic[:L]
            lengths[i], labels[i] = L, label
            ids.append(_word(segment))
        vision = fix.clean(vision, "split %r visual" % split)
        audio = fix.clean(audio, "split %r acoustic" % split)
        splits[split] = MultimodalSplit(text, audio, vision, labels,
                                        lengths={m: lengths for m in MODALITIES}, index=index[k], ids=ids,
                                        name=split)
    fix.report()
    vocab_list = [None] * len(vocab)
    for w, i in vocab.items():
        vocab_list[i] = w
    return MultimodalData(splits["train"], splits["dev"], splits["test"], vocab=vocab_list,
                          name=os.path.basename(path),
                          meta={"format": "magbert", "path": path, "max_len": max_len})


def _shape_of(entry) -> str:
    if isinstance(entry, (list, tuple)):
        return "a %s of %d items (%s)" % (type(entry).__name__, len(entry),
                                          ", ".join(type(e).__name__ for e in entry[:4]))
    return "a %s" % type(entry).__name__


# -- MMSA ----------------------------------------------------------------------------------------------

_MMSA_SPLITS = (("train", ("train",)), ("dev", ("valid", "dev")), ("test", ("test",)))
_MMSA_REQUIRED = ("text", "audio", "vision", "regression_labels")


def load_mmsa_pickle(path, *, nonfinite: str = "zero", trusted: bool = False,
                     label_range=LABEL_RANGE) -> MultimodalData:
    """Load an MMSA pickle (aligned or unaligned) as float text features + audio + vision.

    Splits "train", "valid" (-> dev; "dev" is accepted too) and "test", each a dict with "text"
    (N, T_l, d_l), "audio" (N, T_a, d_a), "vision" (N, T_v, d_v) and "regression_labels" (N,) (any shape
    with N values). Arrays are kept as stored (MMSA pads/truncates when it writes the file), as float32.

    Lengths:
      * audio/vision: "audio_lengths"/"vision_lengths" when present (negative -> error; values above T are
        clipped to T with a warning), else all T_a / T_v (MMSA's aligned files carry none).
      * text: "text_lengths" when present; else, when "text_bert" (N, 3, T_l) is present, the number of
        non-zero entries of its attention-mask row text_bert[:, 1, :] (exactly how MMSA's models derive
        text lengths); else all T_l. Note the BERT features include the [CLS] and [SEP] positions.

    "id" (N,) becomes the split's ``ids``; other keys are ignored. ``nonfinite``, ``label_range`` and the
    errors are as in :func:`load_magbert_pickle` (MMSA's own loader zeroes -inf audio values too).
    """
    _check_nonfinite(nonfinite)
    _check_label_range(label_range)
    obj = read_pickle(path, trusted=trusted)
    return _from_mmsa(obj, os.fspath(path), nonfinite, label_range)


def _lengths(value, path, where: str, n: int, T: int) -> np.ndarray:
    try:
        arr = np.asarray(value)
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise TypeError("dtype %s" % arr.dtype)
        arr = arr.reshape(-1)
    except (TypeError, ValueError) as e:
        raise _err(path, "%s must be an array of integers; got %s (%s)" % (where, type(value).__name__, e)) from None
    if arr.size != n:
        raise _err(path, "%s has %d entries for %d samples" % (where, arr.size, n))
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise _err(path, "%s must hold whole numbers" % where)
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise _err(path, "%s has a negative length (%d)" % (where, arr.min()))
    if n and arr.max() > T:
        warnings.warn("%s: %s has lengths up to %d but the sequences hold %d steps; clipped to %d"
                      % (path, where, arr.max(), T, T), stacklevel=4)
        arr = np.minimum(arr, T)
    return arr


def _from_mmsa(obj, path, nonfinite: str, label_range=LABEL_RANGE) -> MultimodalData:
    fix = _NonFinite(path, nonfinite)
    if detect_format(obj) != "mmsa":
        raise _err(path, "not an MMSA pickle: expected a dict {'train'|'valid'|'test': {'text', 'audio', "
                         "'vision', 'regression_labels', ...}}; got %s" % _describe(obj))
    found = {}
    for split, keys in _MMSA_SPLITS:
        key = next((k for k in keys if k in obj), None)
        if key is None:
            raise _err(path, "MMSA pickle has no %s split (keys: %s)"
                       % (" or ".join(map(repr, keys)), sorted(map(str, obj))))
        if not isinstance(obj[key], Mapping):
            raise _err(path, "split %r must be a dict of arrays; got %s" % (key, type(obj[key]).__name__))
        missing = [k for k in _MMSA_REQUIRED if k not in obj[key]]
        if missing:
            raise _err(path, "split %r lacks %s (has: %s)" % (key, ", ".join(map(repr, missing)),
                                                             sorted(map(str, obj[key]))))
        found[split] = key

    shapes: Dict[str, Tuple[Tuple[int, int], str]] = {}  # modality -> ((T, d), split first seen)
    arrays = {}
    for split, key in found.items():
        d = obj[key]
        feats = {m: _float_array(d[m], path, "split %r %r" % (key, m), 3) for m in MODALITIES}
        n = feats["text"].shape[0]
        if n == 0:
            raise _err(path, "split %r is empty" % key)
        for m, arr in feats.items():
            if arr.shape[0] != n:
                raise _err(path, "split %r: 'text' has %d samples but %r has %d" % (key, n, m, arr.shape[0]))
            if m not in shapes:
                shapes[m] = (arr.shape[1:], key)
            elif arr.shape[1:] != shapes[m][0]:
                raise _err(path, "inconsistent %r shape: split %r has (T, d) = %s but split %r has %s"
                           % (m, key, tuple(arr.shape[1:]), shapes[m][1], tuple(shapes[m][0])))
        try:
            labels = np.asarray(d["regression_labels"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise _err(path, "split %r 'regression_labels' must be numeric" % key) from None
        if labels.size != n:
            raise _err(path, "split %r has %d samples but %d regression_labels" % (key, n, labels.size))
        _check_labels(labels, path, "split %r regression_labels" % key, label_range)
        lengths = {}
        for m in ("audio", "vision"):
            if d.get(m + "_lengths") is not None:
                lengths[m] = _lengths(d[m + "_lengths"], path, "split %r %r" % (key, m + "_lengths"), n,
                                      feats[m].shape[1])
        T_l = feats["text"].shape[1]
        if d.get("text_lengths") is not None:
            lengths["text"] = _lengths(d["text_lengths"], path, "split %r 'text_lengths'" % key, n, T_l)
        elif d.get("text_bert") is not None:
            tb = np.asarray(d["text_bert"])
            if tb.ndim == 3 and tb.shape[0] == n and tb.shape[1] == 3 and tb.shape[2] == T_l:
                lengths["text"] = np.count_nonzero(tb[:, 1, :], axis=1).astype(np.int64)
            else:
                warnings.warn("%s: split %r 'text_bert' has shape %s, not (N, 3, T_l) = %s; text lengths "
                              "are taken as T_l" % (path, key, tb.shape, (n, 3, T_l)), stacklevel=3)
        for m in MODALITIES:
            feats[m] = fix.clean(feats[m], "split %r %s" % (key, m))
        ids = d.get("id")
        if ids is not None:
            ids = [_word(i) for i in np.asarray(ids, dtype=object).reshape(-1)]
            if len(ids) != n:
                raise _err(path, "split %r has %d samples but %d ids" % (key, n, len(ids)))
        arrays[split] = (feats, labels, lengths, ids)

    index = _global_index([arrays[s][0]["text"].shape[0] for s in MultimodalData.SPLITS])
    splits = {}
    for k, split in enumerate(MultimodalData.SPLITS):
        feats, labels, lengths, ids = arrays[split]
        splits[split] = MultimodalSplit(feats["text"], feats["audio"], feats["vision"], labels.astype(np.float32),
                                        lengths=lengths, index=index[k], ids=ids, name=split)
    fix.report()
    aligned = len({shapes[m][0][0] for m in MODALITIES}) == 1
    return MultimodalData(splits["train"], splits["dev"], splits["test"], name=os.path.basename(path),
                          meta={"format": "mmsa", "path": path, "aligned": aligned})


# -- dispatch ------------------------------------------------------------------------------------------

def load(path, *, format: str = "auto", max_len: Optional[int] = None, nonfinite: str = "zero",
         trusted: bool = False, label_range=LABEL_RANGE) -> MultimodalData:
    """Load a MOSI/MOSEI pickle in either published format.

    ``format``: "auto" (from the structure: a dict whose "train" is a list of samples is MAG-BERT, a dict
    whose "train" is a dict of arrays is MMSA), "magbert" or "mmsa". ``max_len`` (default 50) is the
    padded length of MAG-BERT files; MMSA files are stored padded, so passing it for one is an error.
    ``nonfinite``, ``trusted`` and ``label_range``: see :func:`load_magbert_pickle` and the module
    docstring (unpickling a file from an untrusted source is unsafe).
    """
    if format not in ("auto", "magbert", "mmsa"):
        raise ValueError("format must be 'auto', 'magbert' or 'mmsa'; got %r" % (format,))
    _check_nonfinite(nonfinite)
    _check_label_range(label_range)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError("max_len must be an int >= 1; got %r" % (max_len,))
    obj = read_pickle(path, trusted=trusted)
    path = os.fspath(path)
    fmt = detect_format(obj) if format == "auto" else format
    if fmt is None:
        raise _err(path, "not a MAG-BERT or MMSA pickle: expected a dict with 'train', 'dev'/'valid' and "
                         "'test' splits (lists of samples or dicts of arrays); got %s" % _describe(obj))
    if fmt == "magbert":
        return _from_magbert(obj, path, 50 if max_len is None else max_len, nonfinite, label_range)
    if max_len is not None:
        raise ValueError("max_len applies to MAG-BERT pickles only; %s is an MMSA pickle, stored padded" % path)
    return _from_mmsa(obj, path, nonfinite, label_range)


def load_for_max_len(path, max_len: int, *, nonfinite: str = "zero", trusted: bool = False,
                     label_range=LABEL_RANGE) -> MultimodalData:
    """Load either format, reading the file once: a MAG-BERT pickle padded/truncated to ``max_len`` words,
    an MMSA pickle as stored (its sequences are padded when written; ``max_len`` does not apply to it).
    What ``mim-fast train`` uses, whose config always carries a ``max_len``."""
    _check_nonfinite(nonfinite)
    _check_label_range(label_range)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError("max_len must be an int >= 1; got %r" % (max_len,))
    obj = read_pickle(path, trusted=trusted)
    path = os.fspath(path)
    fmt = detect_format(obj)
    if fmt == "magbert":
        return _from_magbert(obj, path, max_len, nonfinite, label_range)
    if fmt == "mmsa":
        return _from_mmsa(obj, path, nonfinite, label_range)
    raise _err(path, "not a MAG-BERT or MMSA pickle: expected a dict with 'train', 'dev'/'valid' and "
                     "'test' splits (lists of samples or dicts of arrays); got %s" % _describe(obj))
