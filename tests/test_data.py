"""mim_fast.data: the MAG-BERT and MMSA pickle readers against files written here in the published formats
(arrays compared with what was written), every error path, the in-memory split/collate, and the synthetic
dataset (determinism, shapes, exact impurity fraction, learnability by a least-squares probe, impure steps
carrying no label information)."""
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mim_fast import data
from mim_fast.data import MODALITIES, MultimodalSplit, collate, synthetic

SPLITS = ("train", "dev", "test")


# -- writers of the published formats ---------------------------------------------------------------

def magbert_object(rng, dv, da, sizes=(6, 4, 5), max_words=70, vocab_size=12):
    """A MAG-BERT dict: lengths straddle 50 (truncation) and include 1; dev/test use some unseen words;
    labels written as (1, 1) arrays (as MAG-BERT does), plain floats and numpy scalars; words as lists or
    numpy string arrays."""
    obj = {}
    for split, n in zip(SPLITS, sizes):
        rows = []
        for i in range(n):
            L = [1, 50, 51, max_words][i] if i < 4 else int(rng.integers(2, max_words))
            pool = "w%d" if split == "train" else ("w%d" if i % 2 else "unseen%d")
            words = [pool % rng.integers(vocab_size) for _ in range(L)]
            if i % 3 == 1:
                words = np.array(words)
            visual = rng.standard_normal((L, dv))
            acoustic = rng.standard_normal((L, da)).astype(np.float32)
            y = float(np.round(rng.uniform(-3, 3), 4))
            label = [np.array([[y]]), y, np.float64(y)][i % 3]
            rows.append(((words, visual, acoustic), label, "%s_seg%d" % (split, i)))
        obj[split] = rows
    return obj


def mmsa_object(rng, sizes=(5, 3, 4), T=(50, 50, 50), d=(768, 74, 47), lengths=False, text_bert=True):
    obj = {}
    for key, n in zip(("train", "valid", "test"), sizes):
        s = {
            "raw_text": ["text %d" % i for i in range(n)],
            "id": np.array(["%s_%d" % (key, i) for i in range(n)], dtype=object),
            "text": rng.standard_normal((n, T[0], d[0])).astype(np.float32),
            "audio": rng.standard_normal((n, T[1], d[1])).astype(np.float32),
            "vision": rng.standard_normal((n, T[2], d[2])).astype(np.float32),
            "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
            "classification_labels": rng.integers(0, 3, n),
        }
        if text_bert:
            tl = rng.integers(3, T[0] + 1, n)
            tb = np.zeros((n, 3, T[0]), np.float32)
            tb[:, 0] = rng.integers(100, 2000, (n, T[0]))
            tb[:, 1] = np.arange(T[0])[None] < tl[:, None]
            s["text_bert"] = tb
            s["_text_len"] = tl
        if lengths:
            s["audio_lengths"] = [int(v) for v in rng.integers(1, T[1] + 1, n)]  # MMSA stores lists
            s["vision_lengths"] = rng.integers(1, T[2] + 1, n)
        obj[key] = s
    return obj


def write(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


# -- MAG-BERT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [(47, 74), (35, 74)], ids=["mosi", "mosei"])
@pytest.mark.parametrize("max_len", [50, 10])
def test_magbert_matches_what_was_written(tmp_path, dims, max_len):
    dv, da = dims
    rng = np.random.default_rng(1)
    obj = magbert_object(rng, dv, da)
    path = write(tmp_path / "mosi.pkl", obj)
    ds = data.load(path, max_len=max_len) if max_len != 50 else data.load(path)
    assert ds.meta["format"] == "magbert" and ds.text_is_tokens
    assert (ds.audio_dim, ds.vision_dim, ds.text_dim) == (da, dv, None)
    assert ds.seq_len == {"text": max_len, "audio": max_len, "vision": max_len}

    vocab = {"<pad>": 0, "<unk>": 1}  # first appearance in train, every word of a sample
    for (words, _, _), _, _ in obj["train"]:
        for w in words:
            vocab.setdefault(str(w), len(vocab))
    assert ds.vocab == tuple(vocab) and ds.vocab_size == len(vocab) and ds.dims["text"] == len(vocab)

    start = 0
    for split in SPLITS:
        s = ds[split]
        assert len(s) == len(obj[split])
        assert s.text.dtype == torch.int64 and s.audio.dtype == torch.float32
        assert s.index.tolist() == list(range(start, start + len(s)))
        start += len(s)
        for i, ((words, visual, acoustic), label, segment) in enumerate(obj[split]):
            L = min(len(words), max_len)
            for m in MODALITIES:
                assert int(s.lengths[m][i]) == L
            ids = [vocab.get(str(w), 1) for w in list(words)[:L]]
            assert s.text[i, :L].tolist() == ids and not s.text[i, L:].any()
            np.testing.assert_array_equal(s.vision[i, :L].numpy(), np.asarray(visual, np.float32)[:L])
            np.testing.assert_array_equal(s.audio[i, :L].numpy(), acoustic[:L])
            assert not s.vision[i, L:].any() and not s.audio[i, L:].any()
            assert s.labels[i].item() == np.float32(np.asarray(label).item())
            assert s.ids[i] == segment
    # dev/test carry unseen words, which map to <unk>
    assert (ds.dev.text == 1).any() and not (ds.train.text == 1).any()


@pytest.mark.parametrize("protocol", [2, 5])
def test_magbert_pickle_protocols(tmp_path, protocol):
    obj = magbert_object(np.random.default_rng(2), 47, 74)
    a = data.load_magbert_pickle(write(tmp_path / "a.pkl", obj, protocol))
    b = data.load_magbert_pickle(write(tmp_path / "b.pkl", obj, 4))
    for split in SPLITS:
        for m in MODALITIES:
            assert torch.equal(a[split].features[m], b[split].features[m])
        assert torch.equal(a[split].labels, b[split].labels)


def test_numpy1_pickles(tmp_path):
    """Files written under numpy 1.x name numpy.core.multiarray (numpy 2 moved it to numpy._core)."""
    obj = magbert_object(np.random.default_rng(2), 47, 74)
    raw = pickle.dumps(obj, protocol=2)  # GLOBAL opcodes: "module\nname\n", free to rename
    assert b"numpy._core.multiarray\n" in raw
    (tmp_path / "np1.pkl").write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    (tmp_path / "np2.pkl").write_bytes(raw)
    a, b = data.load(tmp_path / "np1.pkl"), data.load(tmp_path / "np2.pkl")
    assert torch.equal(a.train.audio, b.train.audio) and torch.equal(a.test.labels, b.test.labels)


def test_magbert_nonfinite(tmp_path):
    obj = magbert_object(np.random.default_rng(3), 47, 74)
    acoustic = obj["train"][1][0][2]
    acoustic[0, 5] = -np.inf
    acoustic[1, 7] = np.nan
    obj["test"][0][0][1][0, 0] = np.inf
    path = write(tmp_path / "inf.pkl", obj)
    with pytest.warns(data.NonFiniteFeatureWarning, match=r"split 'train' acoustic: 2.*split 'test' visual: 1"):
        ds = data.load(path)
    assert ds.train.audio[1, 0, 5].item() == 0.0 and ds.train.audio[1, 1, 7].item() == 0.0
    assert ds.test.vision[0, 0, 0].item() == 0.0
    for s in ds.splits.values():
        assert all(bool(torch.isfinite(t).all()) for t in (s.audio, s.vision))
    with pytest.raises(ValueError, match=r"inf\.pkl: split 'train' acoustic has 2 NaN/inf values \(first in "
                                         r"sample 1\)"):
        data.load(path, nonfinite="error")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        data.load(path, nonfinite="drop")


def test_clean_file_loads_without_warnings(tmp_path):
    path = write(tmp_path / "ok.pkl", magbert_object(np.random.default_rng(4), 35, 74))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load(path)


# -- MMSA -------------------------------------------------------------------------------------------

def test_mmsa_aligned(tmp_path):
    rng = np.random.default_rng(5)
    obj = mmsa_object(rng)
    ds = data.load(write(tmp_path / "aligned_50.pkl", obj))
    assert ds.meta["format"] == "mmsa" and ds.meta["aligned"] and not ds.text_is_tokens
    assert ds.dims == {"text": 768, "audio": 74, "vision": 47} and ds.vocab is None
    assert ds.seq_len == {"text": 50, "audio": 50, "vision": 50}
    start = 0
    for split, key in zip(SPLITS, ("train", "valid", "test")):  # "valid" -> dev
        s, src = ds[split], obj[key]
        for m in MODALITIES:
            np.testing.assert_array_equal(s.features[m].numpy(), src[m])
        np.testing.assert_array_equal(s.labels.numpy(), src["regression_labels"])
        assert s.lengths["text"].tolist() == src["_text_len"].tolist()  # from text_bert's attention mask
        assert s.lengths["audio"].tolist() == [50] * len(s) and s.lengths["vision"].tolist() == [50] * len(s)
        assert s.ids == list(src["id"])
        assert s.index.tolist() == list(range(start, start + len(s)))
        start += len(s)


def test_mmsa_unaligned_with_lengths(tmp_path):
    rng = np.random.default_rng(6)
    obj = mmsa_object(rng, T=(50, 375, 500), d=(768, 5, 20), lengths=True, text_bert=False)
    obj["test"]["regression_labels"] = obj["test"]["regression_labels"][:, None]  # (N, 1) is accepted
    ds = data.load_mmsa_pickle(write(tmp_path / "unaligned_50.pkl", obj))
    assert not ds.meta["aligned"]
    assert ds.seq_len == {"text": 50, "audio": 375, "vision": 500}
    assert ds.dims == {"text": 768, "audio": 5, "vision": 20}
    for split, key in zip(SPLITS, ("train", "valid", "test")):
        s, src = ds[split], obj[key]
        for m in MODALITIES:
            np.testing.assert_array_equal(s.features[m].numpy(), src[m])
        assert s.lengths["audio"].tolist() == list(src["audio_lengths"])
        assert s.lengths["vision"].tolist() == list(src["vision_lengths"])
        assert s.lengths["text"].tolist() == [50] * len(s)  # no text_bert, no text_lengths
        np.testing.assert_array_equal(s.labels.numpy(), src["regression_labels"].reshape(-1))


def test_mmsa_text_lengths_key_and_length_clipping(tmp_path):
    obj = mmsa_object(np.random.default_rng(7), T=(50, 30, 40), d=(16, 5, 7), lengths=True)
    obj["train"]["text_lengths"] = np.arange(len(obj["train"]["text"])) + 1
    obj["train"]["audio_lengths"][0] = 31  # one past T_a
    with pytest.warns(UserWarning, match=r"'audio_lengths' has lengths up to 31 .* clipped to 30"):
        ds = data.load(write(tmp_path / "m.pkl", obj))
    assert ds.train.lengths["text"].tolist() == list(range(1, len(ds.train) + 1))  # text_lengths wins
    assert ds.train.lengths["audio"][0].item() == 30
    obj["train"]["audio_lengths"][0] = -1
    with pytest.raises(ValueError, match=r"'audio_lengths' has a negative length"):
        data.load(write(tmp_path / "m.pkl", obj))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_mmsa_nonfinite_audio(tmp_path, protocol):
    obj = mmsa_object(np.random.default_rng(8), d=(16, 5, 7))
    obj["valid"]["audio"][1, 2, 3] = -np.inf
    path = write(tmp_path / "m.pkl", obj, protocol)
    with pytest.warns(data.NonFiniteFeatureWarning, match=r"split 'valid' audio: 1"):
        ds = data.load(path)
    assert ds.dev.audio[1, 2, 3].item() == 0.0
    np.testing.assert_array_equal(np.delete(ds.dev.audio.numpy().ravel(), 1 * 50 * 5 + 2 * 5 + 3),
                                  np.delete(obj["valid"]["audio"].ravel(), 1 * 50 * 5 + 2 * 5 + 3))
    with pytest.raises(ValueError, match=r"split 'valid' audio has 1 NaN/inf values"):
        data.load(path, nonfinite="error")


# -- errors -----------------------------------------------------------------------------------------

def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.pkl"
    for fn in (data.load, data.load_magbert_pickle, data.load_mmsa_pickle):
        with pytest.raises(ValueError, match="nope.pkl"):
            fn(missing)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for callers that catch that
        data.load(missing)
    with pytest.raises(ValueError, match="is a directory"):
        data.load(tmp_path)


def test_truncated_corrupt_and_empty_files(tmp_path):
    good = write(tmp_path / "good.pkl", magbert_object(np.random.default_rng(9), 47, 74))
    raw = open(good, "rb").read()
    for name, content, pattern in (("trunc.pkl", raw[: len(raw) // 2], "truncated"),
                                   ("trunc2.pkl", raw[:-1], "truncated"),
                                   ("empty.pkl", b"", "empty or truncated"),
                                   ("garbage.pkl", b"\x00\x01not a pickle at all" * 10, "corrupt or truncated"),
                                   ("text.pkl", b"hello, world\n", "corrupt or truncated")):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=r"%s: .*%s" % (name, pattern)):
            data.load(p)


@pytest.mark.parametrize("obj, pattern", [
    ([1, 2, 3], "not a MAG-BERT or MMSA pickle: .*got a list"),
    ({"a": 1}, "not a MAG-BERT or MMSA pickle: .*got a dict \\{'a': int\\}"),
    ({"train": 5, "dev": [], "test": []}, "not a MAG-BERT or MMSA pickle"),
    (np.zeros(3), "not a MAG-BERT or MMSA pickle: .*ndarray"),
])
def test_wrong_format(tmp_path, obj, pattern):
    with pytest.raises(ValueError, match="x.pkl: " + pattern):
        data.load(write(tmp_path / "x.pkl", obj))


def test_format_mismatch_and_options(tmp_path):
    mag = write(tmp_path / "mag.pkl", magbert_object(np.random.default_rng(10), 47, 74))
    mmsa = write(tmp_path / "mmsa.pkl", mmsa_object(np.random.default_rng(10), d=(8, 5, 7)))
    with pytest.raises(ValueError, match="mag.pkl: not an MMSA pickle"):
        data.load(mag, format="mmsa")
    with pytest.raises(ValueError, match="mag.pkl: not an MMSA pickle"):
        data.load_mmsa_pickle(mag)
    with pytest.raises(ValueError, match="mmsa.pkl: not a MAG-BERT pickle"):
        data.load_magbert_pickle(mmsa)
    with pytest.raises(ValueError, match="max_len applies to MAG-BERT pickles only"):
        data.load(mmsa, max_len=50)
    with pytest.raises(ValueError, match="format must be"):
        data.load(mag, format="csv")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_len must be an int >= 1"):
            data.load_magbert_pickle(mag, max_len=bad)
    assert data.detect_format(data.read_pickle(mag)) == "magbert"
    assert data.detect_format(data.read_pickle(mmsa)) == "mmsa"


def _magbert_broken(kind):
    obj = magbert_object(np.random.default_rng(11), 47, 74)
    (words, visual, acoustic), label, seg = obj["train"][2]
    if kind == "empty":
        obj["dev"] = []
    elif kind == "no_test":
        del obj["test"]
    elif kind == "visual_width":
        obj["test"][3] = ((words, visual[:, :46], acoustic), label, seg)
    elif kind == "acoustic_width":
        obj["train"][2] = ((words, visual, np.zeros((len(words), 75))), label, seg)
    elif kind == "unaligned":
        obj["train"][2] = ((words, visual[:-1], acoustic), label, seg)
    elif kind == "sample_shape":
        obj["train"][2] = ((words, visual), label, seg)
    elif kind == "words_str":
        obj["train"][2] = (("a sentence", visual[:1], acoustic[:1]), label, seg)
    elif kind == "label":
        obj["train"][2] = ((words, visual, acoustic), np.zeros(2), seg)
    elif kind == "label_str":
        obj["train"][2] = ((words, visual, acoustic), "positive", seg)
    elif kind == "visual_1d":
        obj["train"][2] = ((words[:1], visual[0], acoustic[:1]), label, seg)
    elif kind == "visual_text":
        obj["train"][2] = ((words[:1], np.array([["a"] * 47]), acoustic[:1]), label, seg)
    elif kind == "split_type":
        obj["dev"] = {"a": 1}
    elif kind == "nan_label":
        obj["train"][2] = ((words, visual, acoustic), np.array([[np.nan]]), seg)
    elif kind == "far_label":
        obj["dev"][1] = ((words, visual, acoustic), 100.0, seg)
    return obj


@pytest.mark.parametrize("kind, pattern", [
    ("empty", "split 'dev' is empty"),
    ("no_test", "has no 'test' split"),
    ("visual_width", "inconsistent visual width: split 'test' sample 3 has 46 features but split 'train' "
                     "sample 0 has 47"),
    ("acoustic_width", "inconsistent acoustic width: split 'train' sample 2 has 75 features"),
    ("unaligned", "split 'train' sample 2: the modalities are not word-aligned"),
    ("sample_shape", "split 'train' sample 2 must be \\(\\(words, visual, acoustic\\), label, segment\\)"),
    ("words_str", "split 'train' sample 2: words must be a sequence of words"),
    ("label", "split 'train' sample 2: label must have exactly one value"),
    ("label_str", "split 'train' sample 2: label must be a number"),
    ("visual_1d", "split 'train' sample 2: visual must be 2-D"),
    ("visual_text", "split 'train' sample 2: visual must be a numeric array"),
    ("split_type", "split 'dev' must be a list of samples"),
    ("nan_label", "bad.pkl: split 'train' sample 2: label is nan"),
    ("far_label", "bad.pkl: split 'dev' sample 1: label 100 is outside \\[-3, 3\\], the sentiment scale of "
                  "CMU-MOSI/MOSEI .*label_range=None"),
])
def test_magbert_errors(tmp_path, kind, pattern):
    with pytest.raises(ValueError, match=pattern):
        data.load(write(tmp_path / "bad.pkl", _magbert_broken(kind)))


def test_label_range_can_be_lifted_or_narrowed(tmp_path):
    path = write(tmp_path / "far.pkl", _magbert_broken("far_label"))
    assert data.load(path, label_range=None).dev.labels[1].item() == 100.0
    clean = write(tmp_path / "clean.pkl", magbert_object(np.random.default_rng(3), 47, 74))
    data.load(clean)  # every label of the writer lies in [-3, 3]
    with pytest.raises(ValueError, match="outside \\[-1, 1\\]"):
        data.load_magbert_pickle(clean, label_range=(-1, 1))
    mmsa = mmsa_object(np.random.default_rng(4), d=(8, 5, 7))
    mmsa["valid"]["regression_labels"][2] = -7.5
    with pytest.raises(ValueError, match="split 'valid' regression_labels sample 2: label -7.5 is outside"):
        data.load(write(tmp_path / "mmsa.pkl", mmsa))
    for bad in ((3, -3), "x", (1, 2, 3)):
        with pytest.raises(ValueError, match="label_range must be None or"):
            data.load(clean, label_range=bad)


def test_load_for_max_len_applies_max_len_to_magbert_only(tmp_path):
    mag = write(tmp_path / "mag.pkl", magbert_object(np.random.default_rng(5), 47, 74))
    mmsa = write(tmp_path / "mmsa.pkl", mmsa_object(np.random.default_rng(6), d=(8, 5, 7), T=(50, 30, 20)))
    short = data.load_for_max_len(mag, 7)
    assert short.seq_len == {"text": 7, "audio": 7, "vision": 7} and int(short.train.lengths["text"].max()) == 7
    stored = data.load_for_max_len(mmsa, 7)
    assert stored.seq_len == {"text": 50, "audio": 30, "vision": 20}
    with pytest.raises(ValueError, match="not a MAG-BERT or MMSA pickle"):
        data.load_for_max_len(write(tmp_path / "list.pkl", [1, 2]), 7)


def _mmsa_broken(kind):
    obj = mmsa_object(np.random.default_rng(12), d=(8, 5, 7), lengths=True)
    if kind == "empty":
        for m in ("text", "audio", "vision", "regression_labels"):
            obj["test"][m] = obj["test"][m][:0]
    elif kind == "no_valid":
        del obj["valid"]
    elif kind == "missing_key":
        del obj["valid"]["vision"]
    elif kind == "width":
        obj["test"]["vision"] = obj["test"]["vision"][:, :, :6]
    elif kind == "seq_len":
        obj["valid"]["audio"] = obj["valid"]["audio"][:, :40]
    elif kind == "n":
        obj["train"]["audio"] = obj["train"]["audio"][:-1]
    elif kind == "labels":
        obj["train"]["regression_labels"] = obj["train"]["regression_labels"][:-1]
    elif kind == "ndim":
        obj["train"]["text"] = obj["train"]["text"][:, 0]
    elif kind == "lengths_n":
        obj["train"]["vision_lengths"] = obj["train"]["vision_lengths"][:-1]
    elif kind == "nan_label":
        obj["test"]["regression_labels"][0] = np.nan
    elif kind == "split_type":
        obj["valid"] = [1, 2]
    return obj


@pytest.mark.parametrize("kind, pattern", [
    ("empty", "split 'test' is empty"),
    ("no_valid", "has no 'valid' or 'dev' split"),
    ("missing_key", "split 'valid' lacks 'vision'"),
    ("width", "inconsistent 'vision' shape: split 'test' has \\(T, d\\) = \\(50, 6\\) but split 'train' has "
              "\\(50, 7\\)"),
    ("seq_len", "inconsistent 'audio' shape: split 'valid'"),
    ("n", "split 'train': 'text' has 5 samples but 'audio' has 4"),
    ("labels", "split 'train' has 5 samples but 4 regression_labels"),
    ("ndim", "split 'train' 'text' must be 3-D"),
    ("lengths_n", "'vision_lengths' has 4 entries for 5 samples"),
    ("nan_label", "split 'test' regression_labels sample 0: label is nan \\(1 NaN/inf label\\)"),
    ("split_type", "split 'valid' must be a dict of arrays"),
])
def test_mmsa_errors(tmp_path, kind, pattern):
    with pytest.raises(ValueError, match="bad.pkl: .*" + pattern):
        data.load(write(tmp_path / "bad.pkl", _mmsa_broken(kind)))


_SIDE_EFFECT = []


def _side_effect(tag):
    _SIDE_EFFECT.append(tag)
    return {"train": [], "dev": [], "test": []}


class _Payload:
    def __reduce__(self):
        return (_side_effect, ("ran",))


def test_restricted_unpickling_refuses_code(tmp_path):
    path = write(tmp_path / "evil.pkl", _Payload())
    _SIDE_EFFECT.clear()
    with pytest.raises(ValueError, match=r"evil.pkl: the pickle refers to .*_side_effect, which is not plain "
                                         r"data.*trusted=True \(mim-fast train: --trust-data\)"):
        data.load(path)
    assert _SIDE_EFFECT == []  # refused before anything was called
    # trusted=True is plain pickle.load: it runs the callable (here, producing an empty MAG-BERT dict)
    with pytest.raises(ValueError, match="split 'train' is empty"):
        data.load(path, trusted=True)
    assert _SIDE_EFFECT == ["ran"]


# -- in-memory form and collate ---------------------------------------------------------------------

def test_collate_and_batch_agree_with_dataloader():
    ds = synthetic(n_train=37, n_dev=5, n_test=6, T=(7, 9, 11), dims=(5, 4, 3), min_length=(2, 0, 11))
    split = ds.train
    item = split[3]
    assert set(item) == {"text", "audio", "vision", "text_lengths", "audio_lengths", "vision_lengths", "label",
                         "index", "text_impurity", "audio_impurity", "vision_impurity"}
    assert item["text"].shape == (7, 5) and item["label"].shape == () and item["index"].dtype == torch.int64
    order = torch.randperm(len(split))
    loader = DataLoader(split, batch_size=8, sampler=order.tolist(), collate_fn=collate)
    for k, b in enumerate(loader):
        idx = order[8 * k: 8 * k + 8]
        ref = split.batch(idx)
        assert set(b) == set(ref) and "labels" in b
        for key in ref:
            assert torch.equal(b[key], ref[key]), key
        assert b["text"].shape == (len(idx), 7, 5) and b["vision"].shape == (len(idx), 11, 3)
        assert b["audio_impurity"].dtype == torch.bool and b["audio_impurity"].shape == (len(idx), 9)
        assert torch.equal(b["labels"], split.labels[idx]) and torch.equal(b["index"], split.index[idx])
    with pytest.raises(IndexError):
        split[len(split)]
    with pytest.raises(ValueError, match="empty list"):
        collate([])


def test_token_text_split_and_collate():
    text = torch.tensor([[2, 3, 0], [4, 1, 1]])
    s = MultimodalSplit(text, torch.zeros(2, 3, 4), torch.ones(2, 5, 2), [0.5, -1.0],
                        lengths={"text": [2, 3]}, name="t")
    assert s.text_is_tokens and s.feature_dim("text") is None and s.seq_len("vision") == 5
    b = collate([s[0], s[1]])
    assert b["text"].dtype == torch.int64 and b["text"].tolist() == text.tolist()
    assert b["text_lengths"].tolist() == [2, 3] and b["vision_lengths"].tolist() == [5, 5]
    assert "text_impurity" not in b


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(labels=[0.0]), "text has 2 samples but labels has 1"),
    (dict(audio=torch.zeros(3, 3, 4)), "text has 2 samples but audio has 3"),
    (dict(audio=torch.zeros(2, 3)), "audio must be \\(N, T, d\\)"),
    (dict(text=torch.zeros(2)), "text must be \\(N, T_l, d_l\\) float features or \\(N, T_l\\) integer"),
    (dict(text=torch.tensor([[1, -1]])), "token ids must be >= 0"),
    (dict(lengths={"audio": [1, 4]}), "audio lengths must lie in \\[0, 3\\]"),
    (dict(lengths={"audio": [1]}), "audio lengths has 1 entries for 2 samples"),
    (dict(lengths={"sound": [1, 1]}), "unknown modalities"),
    (dict(labels=[0.0, float("inf")]), "1 labels are NaN or infinite"),
    (dict(index=[0, 0]), "index entries must be unique"),
    (dict(impurity={"audio": torch.zeros(2, 4, dtype=torch.bool)}), "audio impurity mask must have shape"),
    (dict(impurity={"audio": torch.ones(2, 3, dtype=torch.bool)}, lengths={"audio": [3, 2]}),
     "marks padding steps"),
])
def test_split_validation(kwargs, pattern):
    args = dict(text=torch.zeros(2, 6, 3), audio=torch.zeros(2, 3, 4), vision=torch.zeros(2, 5, 2),
                labels=[0.0, 1.0])
    args.update(kwargs)
    text, audio, vision, labels = (args.pop(k) for k in ("text", "audio", "vision", "labels"))
    with pytest.raises(ValueError, match=pattern):
        MultimodalSplit(text, audio, vision, labels, **args)


def test_data_validation():
    ds = synthetic(n_train=4, n_dev=3, n_test=2, T=5, dims=4)
    other = synthetic(n_train=4, n_dev=3, n_test=2, T=6, dims=4)
    with pytest.raises(ValueError, match=r"text: split 'test' has \(T, d\) = \(6, 4\)"):
        data.MultimodalData(ds.train, ds.dev, other.test)
    with pytest.raises(ValueError, match="global sample index repeats"):
        data.MultimodalData(ds.train, ds.dev, ds.train)
    with pytest.raises(KeyError):
        ds["valid"]


# -- synthetic --------------------------------------------------------------------------------------

def _all_tensors(ds):
    for split in SPLITS:
        s = ds[split]
        yield from (s.text, s.audio, s.vision, s.labels, s.index)
        yield from s.lengths.values()
        yield from s.impurity.values()


def test_synthetic_is_deterministic():
    kw = dict(n_train=50, n_dev=20, n_test=30, T=(12, 10, 8), dims=(6, 5, 4), min_length=3)
    a, b = synthetic(**kw, seed=3), synthetic(**kw, seed=3)
    for x, y in zip(_all_tensors(a), _all_tensors(b)):
        assert x.dtype == y.dtype and torch.equal(x, y)
        if x.is_floating_point():  # bit-identical, not just equal (e.g. -0.0 vs 0.0)
            assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    c = synthetic(**kw, seed=4)
    assert not torch.equal(a.train.text, c.train.text)
    assert not torch.equal(a.dev.text[:20], a.test.text[:20])  # the splits are different draws
    assert not torch.equal(a.train.labels[:20], a.dev.labels)
    # a split's size changes only that split
    d = synthetic(**dict(kw, n_train=60), seed=3)
    assert torch.equal(d.dev.audio, a.dev.audio) and torch.equal(d.test.labels, a.test.labels)
    assert d.dev.index[0].item() == 60 and d.test.index[0].item() == 80


def test_synthetic_contiguous_impurity_is_one_stretch_per_sample():
    kw = dict(n_train=200, n_dev=5, n_test=5, T=(13, 9, 20), dims=(7, 5, 3), impurity=(0.3, 0.5, 1.0),
              min_length=(0, 1, 4), seed=int(torch.randint(0, 2**31, ())))
    ds = synthetic(**kw, contiguous=True)
    scattered = synthetic(**kw)
    starts = []
    for m in MODALITIES:
        mask, L = ds.train.impurity[m].numpy(), ds.train.lengths[m].numpy()
        assert torch.equal(ds.train.lengths[m], scattered.train.lengths[m])
        assert (mask.sum(1) == scattered.train.impurity[m].numpy().sum(1)).all()  # the same count per sample
        for row, n in zip(mask, L):
            idx = np.flatnonzero(row)
            assert (idx < n).all()
            if idx.size:
                assert (np.diff(idx) == 1).all()  # one contiguous run
                if n > idx.size:  # the start is free in [0, n - size]: its relative position
                    starts.append(idx[0] / (n - idx.size))
    assert 0.3 < np.mean(starts) < 0.7  # start positions spread over the sequence, not pinned to one end
    assert torch.equal(ds.train.labels, scattered.train.labels)  # only the masks (and features) move


def test_synthetic_shapes_labels_and_impurity():
    ds = synthetic(n_train=300, n_dev=40, n_test=50, T=(13, 9, 20), dims=(7, 5, 3),
                   impurity=(0.3, 0.5, 0.0), min_length=(13, 1, 4))
    assert ds.dims == {"text": 7, "audio": 5, "vision": 3} and ds.seq_len == {"text": 13, "audio": 9, "vision": 20}
    assert [ds[s].index.tolist() for s in SPLITS] == [list(range(300)), list(range(300, 340)),
                                                      list(range(340, 390))]
    frac = {"text": 0.3, "audio": 0.5, "vision": 0.0}
    for split in SPLITS:
        s = ds[split]
        y = s.labels.numpy()
        assert y.min() >= -3 and y.max() <= 3
        inner = y[np.abs(y) < 3]  # continuous: no ties except the clipped ends
        assert len(np.unique(inner)) == len(inner) and len(inner) > 0.95 * len(y)
        for m in MODALITIES:
            x, L, mask = s.features[m].numpy(), s.lengths[m].numpy(), s.impurity[m].numpy()
            T = x.shape[1]
            assert x.dtype == np.float32 and mask.dtype == bool
            valid = np.arange(T)[None] < L[:, None]
            assert not x[~valid].any() and not mask[~valid].any()  # padding: zero, never impure
            np.testing.assert_array_equal(mask.sum(1), np.round(frac[m] * L))  # exact count per sample
        assert (s.lengths["text"] == 13).all()
        assert s.lengths["audio"].min() >= 1 and s.lengths["vision"].min() >= 4
    assert len(np.unique(ds.train.lengths["audio"].numpy())) > 3  # lengths do vary


def _step_means(split, which):
    """Per-modality mean over the chosen steps, concatenated: (N, Σ d_m)."""
    out = []
    for m in MODALITIES:
        x, mask = split.features[m].numpy().astype(np.float64), split.impurity[m].numpy()
        valid = np.arange(x.shape[1])[None] < split.lengths[m].numpy()[:, None]
        sel = {"clean": valid & ~mask, "all": valid, "impure": mask}[which]
        out.append((x * sel[..., None]).sum(1) / np.maximum(sel.sum(1), 1)[:, None])
    return np.concatenate(out, 1)


def _probe_mae(ds, which):
    """Closed-form least-squares probe fitted on train, MAE on test."""
    X = np.c_[_step_means(ds.train, which), np.ones(len(ds.train))]
    w = np.linalg.lstsq(X, ds.train.labels.numpy().astype(np.float64), rcond=None)[0]
    pred = np.c_[_step_means(ds.test, which), np.ones(len(ds.test))] @ w
    return float(np.abs(pred - ds.test.labels.numpy()).mean())


def test_synthetic_is_learnable_and_purification_matters():
    ds = synthetic(seed=int(torch.randint(0, 2**31, ())))  # the defaults, any seed
    trivial = float(np.abs(ds.test.labels.numpy() - np.median(ds.train.labels.numpy())).mean())
    clean, every, impure = (_probe_mae(ds, w) for w in ("clean", "all", "impure"))
    assert trivial > 1.3
    assert clean < 0.25 * trivial, (clean, trivial)  # learnable from the clean steps
    assert every > 1.4 * clean, (every, clean)        # impure steps hurt mean pooling
    assert impure > 0.9 * trivial, (impure, trivial)  # impure steps alone predict nothing


def test_synthetic_impure_steps_carry_no_signal():
    ds = synthetic(n_train=3000, n_dev=1, n_test=1, T=20, dims=(8, 8, 8), seed=int(torch.randint(0, 2**31, ())))
    s, y = ds.train, ds.train.labels.numpy().astype(np.float64)
    step_corr = []
    for m in MODALITIES:
        u = ds.meta["directions"][m]
        proj = s.features[m].numpy().astype(np.float64) @ u  # (N, T) the signal coordinate of each step
        mask = s.impurity[m].numpy()
        impure_mean = (proj * mask).sum(1) / mask.sum(1)
        clean_mean = (proj * ~mask).sum(1) / (~mask).sum(1)
        assert abs(np.corrcoef(impure_mean, y)[0, 1]) < 0.08, m  # ~N(0, 1/sqrt(3000))
        assert np.corrcoef(clean_mean, y)[0, 1] > 0.8, m
        # same scale: step norms of impure and clean steps agree (not detectable by magnitude)
        norms = np.linalg.norm(s.features[m].numpy(), axis=2)
        assert abs(norms[mask].mean() / norms[~mask].mean() - 1) < 0.03, m
        assert abs(proj[mask].std() / proj[~mask].std() - 1) < 0.05, m
        step_corr.append(np.corrcoef(proj[:, 0][~mask[:, 0]], y[~mask[:, 0]])[0, 1])
    assert step_corr[0] > step_corr[1] > step_corr[2] > 0.3, step_corr  # text > audio > vision, like MOSI


@pytest.mark.parametrize("kwargs, err, pattern", [
    (dict(n_train=0), ValueError, "n_train must be an int >= 1"),
    (dict(impurity=1.5), ValueError, "impurity\\['text'\\] must lie in \\[0, 1\\]"),
    (dict(T=(5, 5)), ValueError, "T must have 3 entries"),
    (dict(dims={"text": 3}), ValueError, "dims must have exactly the keys"),
    (dict(T=2.5), TypeError, "T\\['text'\\] must be an int"),
    (dict(min_length=30), ValueError, "min_length\\['text'\\] must lie in \\[0, T = 20\\]"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
    (dict(noise=float("nan")), ValueError, "noise must be a finite number"),
])
def test_synthetic_argument_errors(kwargs, err, pattern):
    with pytest.raises(err, match=pattern):
        synthetic(**kwargs)
