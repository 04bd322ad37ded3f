"""Public ops: argument checks, backend dispatch and (for the fused kernels) torch.library registration."""
from ._backends import BACKENDS, BackendUnavailableError, available_backends, backend_status
from .dropout import dropout, dropout_key
from .kgs_loss import kgs_loss, kgs_loss_with_heads
from .philox import gate_noise, philox_uniform
from .purify_gate import purify_gate

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "backend_status", "dropout", "dropout_key",
           "gate_noise", "kgs_loss", "kgs_loss_with_heads", "philox_uniform", "purify_gate"]
