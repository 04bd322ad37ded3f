"""``mim_fast.nn``: nn.Module wrappers around the fused ops, and MIM's building blocks."""
from .kgs import KGSLoss
from .purification import MaskLearner, MaskLearnerOutput, PurificationGate

__all__ = [
    "KGSLoss",
    "MaskLearner",
    "MaskLearnerOutput",
    "PurificationGate",
]
