"""``mim_fast.nn``: nn.Module wrappers around the fused ops, and MIM's building blocks."""
from .dropout import Dropout, assign_streams
from .encoders import BertEncoder, EncoderOutput, SequenceEncoder, WordEncoder
from .fusion import FUSIONS, Fusion
from .kgs import KGSLoss
from .mim import MIM, MIMOutput, ModalitySpec
from .purification import MaskLearner, MaskLearnerOutput, PurificationGate
from .transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "BertEncoder",
    "Dropout",
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
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "WordEncoder",
    "assign_streams",
]
