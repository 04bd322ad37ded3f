"""The Unimodal Purification Network (SPEC §1 and §3) as modules.

* :class:`PurificationGate` — the hard-concrete gate + straight-through estimator + gated mean pooling +
  expected-L0 penalty, i.e. :func:`mim_fast.purify_gate` with its hyper-parameters fixed at construction
  and the mode chosen by ``self.training``. It has no parameters (MIM fixes the temperature β).
* :class:`MaskLearner` — MIM's mask learner (the published ``MaskLearner``): a BiLSTM over time, an MLP over
  features and an MLP across time produce the gate logits, and a :class:`PurificationGate` purifies and
  pools the sequence. Its parameters carry the published names, so a checkpoint of the published model
  loads with ``strict=True``.
"""
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import reference
from .._types import PurifyGateOutput, exportable
from ..ops import _checks
from ..ops._backends import BACKENDS
from ..ops.purify_gate import ACTIVATIONS, MODES, PENALTIES, purify_gate

__all__ = ["MaskLearner", "MaskLearnerOutput", "PurificationGate", "POOL_NORMS"]

# How the purified representation is normalised: "T" divides the gated sum by T (the op, as published);
# "open" divides it by the number of open steps (PurificationGate.pool_over_open_steps, composed on the op).
POOL_NORMS = ("T", "open")


@exportable
class MaskLearnerOutput(NamedTuple):
    """What :meth:`MaskLearner.forward` returns. The first two fields are what the published forward returned.

    pooled:  (B, d_model), dtype of x. The purified representation (1/T)·Σ_t φ(x[t]·z[t]).
    penalty: scalar, the module's parameter dtype. Mean expected-L0 penalty of the gate.
    gate:    (B, T), the module's parameter dtype, values exactly 0/1 (no gradient): which steps were kept.
    logits:  (B, T), the module's parameter dtype, with gradient: the gate logits g the mask learner produced.
    """

    pooled: torch.Tensor
    penalty: torch.Tensor
    gate: torch.Tensor
    logits: torch.Tensor


def _positive_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be a Python int; got %s" % (name, type(value).__name__))
    if value < minimum:
        raise ValueError("%s must be >= %d; got %d" % (name, minimum, value))
    return value


class PurificationGate(nn.Module):
    """MIM's purification gate: :func:`mim_fast.purify_gate` as a module (SPEC §1).

    In training mode the gate is sampled (mode "sample"); in eval mode it uses ``eval_mode``: "expected"
    (deterministic s = σ(g + loc_bias), the default) or "sample" (what the published code does: its
    HardConcrete has no eval branch, so it samples in evaluation too).

    Args (keyword-only, validated here so a bad value fails at construction, not at the first forward):
        beta: temperature β > 0 (fixed, as in MIM: the module has no parameters).
        gamma, zeta: the stretch interval (γ < 0 < ζ).
        loc_bias: added to the logits, a = g + loc_bias.
        threshold: τ, the hard gate is open where c > τ; 0 ≤ τ < 1 and γ < τ < ζ.
        activation: φ applied before pooling: "tanh" (MIM), "relu" or "identity".
        penalty: "mim" (P(c > 0), the published expected-L0) or "threshold" (P(c > τ)).
        batch_first: x is (B, T, D) instead of (T, B, D).
        backend: "auto" or one of ``mim_fast.BACKENDS``; availability is checked at each call.
        eval_mode: the op's mode in eval: "expected" or "sample".
    """

    def __init__(
        self,
        *,
        beta: float = 1 / 3,
        gamma: float = -0.2,
        zeta: float = 1.0,
        loc_bias: float = 3.0,
        threshold: float = 0.6,
        activation: str = "tanh",
        penalty: str = "mim",
        batch_first: bool = False,
        backend: str = "auto",
        eval_mode: str = "expected",
    ) -> None:
        super().__init__()
        self.beta = _checks.real("beta", beta, gt=0.0)
        self.gamma = _checks.real("gamma", gamma, lt=0.0)
        self.zeta = _checks.real("zeta", zeta, gt=0.0)
        self.loc_bias = _checks.real("loc_bias", loc_bias)
        self.threshold = _checks.real("threshold", threshold, ge=0.0, lt=1.0)
        if not self.gamma < self.threshold < self.zeta:
            raise ValueError("threshold must satisfy gamma < threshold < zeta; got gamma=%g, threshold=%g, zeta=%g"
                             % (self.gamma, self.threshold, self.zeta))
        self.activation = _checks.choice("activation", activation, ACTIVATIONS)
        self.penalty = _checks.choice("penalty", penalty, PENALTIES)
        if not isinstance(batch_first, bool):
            raise TypeError("batch_first must be a bool; got %s" % type(batch_first).__name__)
        self.batch_first = batch_first
        self.backend = _checks.choice("backend", backend, ("auto",) + tuple(BACKENDS))
        self.eval_mode = _checks.choice("eval_mode", eval_mode, MODES)

    @property
    def mode(self) -> str:
        """The op's mode for the next forward: "sample" in training, ``eval_mode`` in eval."""
        return "sample" if self.training else self.eval_mode

    def forward(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        *,
        noise: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
        offset: int = 0,
    ) -> PurifyGateOutput:
        """Gate, purify and pool ``x``.

        Args:
            x: (T, B, D), or (B, T, D) with ``batch_first``; float16, bfloat16, float32 or float64.
            logits: gate logits g (B, T), any float dtype, on x's device.
            lengths: optional (B,) integer steps per sample; steps t ≥ lengths[b] are padding.
            noise: optional uniform noise (B, T) in (0, 1), or
            seed, offset: draw it in-op as ``philox_uniform(seed, offset + b·T + t)``. With neither, a
                sampled gate takes its seed from torch's default CPU generator. Ignored when the mode is
                "expected" (eval with ``eval_mode="expected"``).

        Returns:
            ``PurifyGateOutput(pooled (B, D) in x.dtype, penalty () in logits.dtype,
            gate (B, T) in logits.dtype, exactly 0/1)``. See :func:`mim_fast.purify_gate`.
        """
        return purify_gate(
            x, logits, noise=noise, seed=seed, offset=offset, mode=self.mode, activation=self.activation,
            penalty=self.penalty, lengths=lengths, batch_first=self.batch_first, beta=self.beta,
            gamma=self.gamma, zeta=self.zeta, loc_bias=self.loc_bias, threshold=self.threshold,
            backend=self.backend)

    def straight_through_gate(self, logits: torch.Tensor, gate: torch.Tensor, noise: Optional[torch.Tensor] = None,
                              lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gate z (B, T) of SPEC §1 with its straight-through gradient, rebuilt outside the op.

        The forward value is ``gate`` (the op's 0/1 output, exactly); the gradient w.r.t. ``logits`` is
        that of c = clamp((ζ − γ)·s + γ, 0, 1), as in the op: s = σ((ℓ + a)/β) from ``noise`` in mode
        "sample", σ(a) in mode "expected". Padding steps (t ≥ lengths[b]) get no gradient. Computed in
        float32 (float64 for float64 logits) with torch's own log/sigmoid: only its gradient is used, so it
        need not match the op's c bit for bit. ``noise`` must be the noise the op drew (mode "sample").
        """
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        a = logits.to(acc) + self.loc_bias
        if self.mode == "sample":
            if noise is None:
                raise ValueError("straight_through_gate in mode 'sample' needs the noise the op used")
            u = noise.detach().to(acc).clamp(1e-6, 1.0 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + a) / self.beta)
        else:
            s = torch.sigmoid(a)
        c = reference.clamp_closed((self.zeta - self.gamma) * s + self.gamma, 0.0, 1.0)  # the op's gradient
        z = gate.detach().to(acc) + (c - c.detach())
        if lengths is not None:
            T = logits.shape[1]
            valid = torch.arange(T, device=logits.device)[None, :] < lengths.to(logits.device)[:, None]
            z = torch.where(valid, z, torch.zeros_like(z))
        return z

    def pool_over_open_steps(self, pooled: torch.Tensor, gate: torch.Tensor, logits: torch.Tensor,
                             noise: Optional[torch.Tensor] = None,
                             lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Turn the op's pooled (1/T)·Σ_t φ(x_t·z_t) into the mean over the open steps, Σ_t φ(x_t·z_t) / n
        with n = Σ_t z_t (T → lengths[b] with lengths; n clamped to ≥ 1: a sample with every gate closed
        pools to 0, as before).

        Not MIM (which divides by T whatever the gate), and no preset uses it. Dividing by T makes closing
        any step shrink the representation, so every task gradient pushes every gate open; over the open
        steps, closing a step moves the representation by (φ(x_t) − mean)/n — towards the clean mean when
        t is an outlier, hardly at all for a typical step. Measured on the synthetic data (README, "What the
        demo shows"): nothing then holds a clean step open, and the penalty closes whole positions.

        Composed from the op's outputs so the op and its backends keep computing SPEC §1 exactly:
        pooled·(T/n), where n is counted from :meth:`straight_through_gate` (forward value Σ gate,
        straight-through gradient). The gradient w.r.t. the gate is therefore the straight-through gradient
        of Σφ/Σz itself, ∂/∂z_t = (∂φ(x_t·z_t)/∂z_t − result)/n (for φ = identity: (x_t − result)/n), and
        the gradient to x is the op's scaled by T/n.
        """
        z = self.straight_through_gate(logits, gate, noise, lengths)
        T = logits.shape[1]
        size = (torch.full((logits.shape[0],), float(T), dtype=z.dtype, device=z.device) if lengths is None
                else lengths.to(device=z.device, dtype=z.dtype).clamp(min=1))
        # n ≥ 1 passes its gradient, n = 1 included (torch 2.14's clamp passes none at its bound, which lost
        # the n-path for a sample with exactly one open step); only an empty sample's n is held at 1
        scale = size / reference.clamp_closed(z.sum(dim=1), 1.0)
        return pooled * scale.to(pooled.dtype)[:, None]

    def extra_repr(self) -> str:
        return ("beta=%.6g, gamma=%g, zeta=%g, loc_bias=%g, threshold=%g, activation=%r, penalty=%r, "
                "batch_first=%s, backend=%r, eval_mode=%r"
                % (self.beta, self.gamma, self.zeta, self.loc_bias, self.threshold, self.activation,
                   self.penalty, self.batch_first, self.backend, self.eval_mode))


class MaskLearner(nn.Module):
    """MIM's mask learner (the UPN of one modality, SPEC §3), parameter-compatible with the published one.

    x (T, B, d) → BiLSTM (d → d//2 per direction) → ``pooler3`` over features (Linear → ReLU → Linear →
    ReLU) → scores (B, T) → ``imp_ratio`` across time (Linear T → T//ratio → ReLU → Linear → T) → gate
    logits g (B, T) → ``mask`` (a :class:`PurificationGate`) → pooled (B, d) and penalty. Two options, off
    by default (the published model), change the forward but no parameter: ``score_relu=False`` drops the
    final ReLU of ``pooler3``, ``residual=True`` adds the scores to ``imp_ratio``'s output.

    Submodules carry the published attribute names — ``lstm``, ``mask``, ``pooler2``, ``pooler3``,
    ``imp_ratio`` — so the published ``MaskLearner``'s state_dict loads with ``strict=True`` (the published
    ``pooler``, ``tanh`` and ``HardConcrete`` have no parameters; the pooling and the activation happen in
    the fused op). ``pooler2`` is unused by the forward, as in the published code, and kept only so its
    checkpoints load. The submodules are created in the published order so that, from the same RNG
    state, the initial weights are the published ones.

    Args:
        d_model: feature width d (>= 2). For odd d the BiLSTM yields 2·(d//2) = d − 1 features (the
            published code, which declares ``pooler3`` with d inputs, fails there); ``pooler3`` takes
            2·(d//2) inputs, which is d for every even d.
        seq_len: T (>= ratio). ``imp_ratio`` is a Linear over time, so every input must have exactly T steps
            (pad or truncate upstream; MIM uses 50, 49 for text).
        ratio: bottleneck of ``imp_ratio`` (T → T//ratio → T); 5 in MIM.
        score_relu: the ReLU that ends ``pooler3`` (MIM: True). Scores ≥ 0 can all die at 0 — then the logits
            are one constant per position, whatever the input; False makes the score linear (no parameter
            changes: the published state_dict still loads).
        residual: add each step's own score to the time mixing, g = imp_ratio(scores) + scores (MIM: False).
            ``imp_ratio`` squeezes every step through T//ratio units and has one bias per position, which
            can dominate the logits; the skip connection keeps each step's score in its own logit.
        activation, batch_first, backend, eval_mode, beta, gamma, zeta, loc_bias, threshold, penalty: the
            gate's, see :class:`PurificationGate`. ``batch_first`` applies to the whole module (x is
            (B, T, d)).
    """

    def __init__(
        self,
        d_model: int,
        seq_len: int = 50,
        ratio: int = 5,
        score_relu: bool = True,
        residual: bool = False,
        *,
        activation: str = "tanh",
        batch_first: bool = False,
        backend: str = "auto",
        eval_mode: str = "expected",
        beta: float = 1 / 3,
        gamma: float = -0.2,
        zeta: float = 1.0,
        loc_bias: float = 3.0,
        threshold: float = 0.6,
        penalty: str = "mim",
    ) -> None:
        super().__init__()
        self.d_model = _positive_int("d_model", d_model, 2)  # the BiLSTM needs d//2 >= 1 units per direction
        self.ratio = _positive_int("ratio", ratio, 1)
        self.seq_len = _positive_int("seq_len", seq_len, 1)
        if seq_len < ratio:  # imp_ratio's bottleneck T//ratio must keep at least one unit
            raise ValueError("seq_len must be >= ratio (imp_ratio maps T -> T//ratio -> T); got seq_len=%d, ratio=%d"
                             % (seq_len, ratio))
        for name, value in (("score_relu", score_relu), ("residual", residual)):
            if not isinstance(value, bool):
                raise TypeError("%s must be a bool; got %s" % (name, type(value).__name__))
        hidden = d_model // 2
        lstm_out = 2 * hidden  # both directions concatenated
        # Same order as the published constructor (lstm, mask, pooler2, pooler3, imp_ratio): the parameterized
        # modules then draw their default initialisation from the RNG in the same sequence.
        self.lstm = nn.LSTM(input_size=d_model, hidden_size=hidden, num_layers=1, bidirectional=True,
                            batch_first=batch_first)  # batch_first changes no parameter name or shape
        self.mask = PurificationGate(beta=beta, gamma=gamma, zeta=zeta, loc_bias=loc_bias, threshold=threshold,
                                     activation=activation, penalty=penalty, batch_first=batch_first,
                                     backend=backend, eval_mode=eval_mode)
        self.pooler2 = nn.Linear(d_model, 1)  # unused in forward; kept so published checkpoints load strictly
        self.pooler3 = nn.Sequential(
            nn.Linear(lstm_out, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
            nn.ReLU() if score_relu else nn.Identity(),
        )
        self.residual = residual
        self.imp_ratio = nn.Sequential(
            nn.Linear(seq_len, seq_len // ratio),
            nn.ReLU(),
            nn.Linear(seq_len // ratio, seq_len),
        )

    @property
    def batch_first(self) -> bool:
        return self.mask.batch_first

    def _check_input(self, x) -> None:
        layout = ("(B, T, d_model) = (B, %d, %d) (batch_first=True)" if self.batch_first
                  else "(T, B, d_model) = (%d, B, %d) (batch_first=False)") % (self.seq_len, self.d_model)
        _checks.float_tensor("x", x, ndim=3, layout=layout)
        B, T = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        if T != self.seq_len or x.shape[2] != self.d_model or B < 1:
            raise ValueError("x must have shape %s; got %s (T must equal seq_len because imp_ratio is a Linear "
                             "over time; pad or truncate the sequence upstream)" % (layout, _checks.shape_str(x.shape)))
        weight = self.imp_ratio[0].weight
        if x.device != weight.device:
            raise ValueError("x is on %s but the module's parameters are on %s: move one to the other"
                             % (x.device, weight.device))
        # Under autocast the LSTM and the Linears cast for themselves; otherwise a mismatch would surface as
        # a less specific error from inside nn.LSTM.
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError("x has dtype %s but the module's parameters are %s: convert x or the module "
                            "(e.g. module.to(%s))" % (x.dtype, weight.dtype, x.dtype))

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gate logits g (B, T) for x ((T, B, d), or (B, T, d) with batch_first), as the published code."""
        self._check_input(x)
        h, _ = self.lstm(x)  # (T, B, 2·(d//2)), or (B, T, ·) with batch_first
        if not self.batch_first:
            h = h.transpose(0, 1)  # (B, T, ·): the published code transposes before pooler3, so do we
        scores = self.pooler3(h)[..., 0]  # (B, T): one importance score per step
        logits = self.imp_ratio(scores)  # (B, T): mixed across time
        return logits + scores if self.residual else logits

    def forward(
        self,
        x: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        *,
        noise: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
        offset: int = 0,
    ) -> MaskLearnerOutput:
        """Purify and pool one modality's sequence.

        Args:
            x: (T, B, d_model) with T == seq_len, or (B, T, d_model) with batch_first; the dtype and device
                of the module's parameters (any float dtype under autocast).
            lengths: optional (B,) integer steps per sample, passed to the gate (padding closed, pooled over
                the valid steps only). The published model has no lengths: the BiLSTM and imp_ratio still
                see the whole padded sequence, so padding content can move the logits of valid steps.
            noise, seed, offset: the gate's noise, see :meth:`PurificationGate.forward`.

        Returns:
            ``MaskLearnerOutput(pooled (B, d_model), penalty (), gate (B, T), logits (B, T))``; ``pooled`` and
            ``penalty`` are the published forward's two outputs.
        """
        logits = self.gate_logits(x)
        out = self.mask(x, logits, lengths, noise=noise, seed=seed, offset=offset)
        return MaskLearnerOutput(out.pooled, out.penalty, out.gate, logits)

    def extra_repr(self) -> str:
        return "d_model=%d, seq_len=%d, ratio=%d, batch_first=%s, residual=%s" % (
            self.d_model, self.seq_len, self.ratio, self.batch_first, self.residual)
