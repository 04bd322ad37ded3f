"""``mim_fast.nn``: nn.Module wrappers around the fused ops, and MIM's building blocks."""
from .encoders import BertEncoder, EncoderOutput, SequenceEncoder, WordEncoder
from .fusion import FUSIONS, Fusion
from .kgs import KGSLoss
from .mim import MIM, MIMOutput, ModalitySpec
from .purification import MaskLearner, MaskLearnerOutput, PurificationGate

__all__ = [
    "BertEncoder",
    "EncoderOutput",
    "FUSIONS",
    "Fusion",
    "KGSLoss",
    "MIM",
    "MIMOutput",
    "MaskLearner",
    "MaskLearnerOutput",
    "ModalitySpec",
    "PurificationGate",
    "SequenceEncoder",
    "WordEncoder",
]
