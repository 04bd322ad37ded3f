"""Data for MIM: one in-memory form for every source, the published MOSI/MOSEI pickles, and a synthetic
dataset with known impurity.

    MultimodalSplit, MultimodalData, collate        the in-memory form (dataset.py)
    load(path), load_magbert_pickle, load_mmsa_pickle   the MAG-BERT and MMSA pickles (pickles.py)
    load_for_max_len(path, max_len)                 either format, max_len applied where it applies
    synthetic(...)                                  generated data with ground-truth impurity masks

Shapes are batch-first: text (N, T_l, d_l) float or (N, T_l) int64 token ids, audio (N, T_a, d_a),
vision (N, T_v, d_v); lengths (N,) int64 per modality; labels (N,) float32; index (N,) int64.
"""
from .dataset import MODALITIES, MultimodalData, MultimodalSplit, collate
from .pickles import (LABEL_RANGE, DataFileNotFoundError, NonFiniteFeatureWarning, detect_format, load,
                      load_for_max_len, load_magbert_pickle, load_mmsa_pickle, read_pickle)
from .synthetic import synthetic

__all__ = [
    "DataFileNotFoundError",
    "LABEL_RANGE",
    "MODALITIES",
    "MultimodalData",
    "MultimodalSplit",
    "NonFiniteFeatureWarning",
    "collate",
    "detect_format",
    "load",
    "load_for_max_len",
    "load_magbert_pickle",
    "load_mmsa_pickle",
    "read_pickle",
    "synthetic",
]
