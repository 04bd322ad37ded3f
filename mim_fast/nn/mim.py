"""The MIM model (SPEC §3): per-modality encoders, Unimodal Purification Networks (mask learners with the
fused purification gate), shared per-modality heads, and a fusion head.

For each modality m: encoder → X_m (T, B, D) and the unpurified u_m = mean_t φ(X_m[t]); mask learner →
logits g_m (B, T) → gate → the purified k_m (B, D) and penalty P_m; head C_m = Linear(D, 1) gives
yu = C_m(u_m) and yk = C_m(k_m) (one head shared by both, as published); the fusion head maps
(k_1, …, k_M) to the prediction. The KGS loss and the training step live in :mod:`mim_fast.train`.
"""
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .. import reference
from .._types import exportable
from ..ops.philox import gate_noise
from ..profiling import named_range
from .dropout import Dropout, assign_streams
from .encoders import BertEncoder, SequenceEncoder, WordEncoder
from .fusion import Fusion
from .purification import POOL_NORMS, MaskLearner

__all__ = ["ModalitySpec", "MIM", "MIMOutput"]

KINDS = ("features", "words", "bert")


@dataclass(frozen=True)
class ModalitySpec:
    """One input modality of the model.

    name:     e.g. "text", "audio", "vision" (the key of its inputs).
    kind:     "features" (float sequences (B, T, d_in)), "words" (token ids (B, T), d_in = vocabulary
              size, learned embedding) or "bert" (token ids through a local Hugging Face BERT at bert_path).
    d_in:     feature width, or vocabulary size for "words".
    seq_len:  T: every batch must have exactly T steps (the mask learner mixes across time with a Linear).
    layers:   Transformer layers after the Conv1d (MIM: 3 for audio/vision, 0 for text).
    """

    name: str
    kind: str
    d_in: int
    seq_len: int
    layers: int = 0
    bert_path: Optional[str] = None


@exportable
class MIMOutput(NamedTuple):
    """prediction (B,); yk, yu (M, B); purified (M, B, D) = k_m; unpurified (M, B, D) = u_m;
    penalty (M,); gates / logits: per modality (B, T_m) (gates exactly 0/1, no gradient)."""

    prediction: torch.Tensor
    yk: torch.Tensor
    yu: torch.Tensor
    purified: torch.Tensor
    unpurified: torch.Tensor
    penalty: torch.Tensor
    gates: List[torch.Tensor]
    logits: List[torch.Tensor]


class MIM(nn.Module):
    """MIM over the given modalities.

    Args:
        modalities: the inputs, see :class:`ModalitySpec` (M ≥ 2 for the KGS loss).
        d_model: D, the width of every unimodal representation (MIM: 80).
        fusion: "multiplication" (MIM), "add", "concat" or "tensor".
        activation: φ of the pooling (MIM: tanh), for both the purified and the unpurified pooling.
        heads: attention heads of the audio/vision Transformers (MIM: 5).
        backend, eval_mode and the gate's hyper-parameters (beta, gamma, zeta, loc_bias, threshold, penalty):
            passed to every :class:`~mim_fast.nn.MaskLearner`.
        upn: False builds the model without Unimodal Purification Networks (an ablation, not MIM): no mask
            learners, k_m = u_m (so yk = yu), every gate open, penalty 0.
        pool_norm: "T" (MIM) divides the purified sum by T; "open" by the number of open steps (see
            :meth:`~mim_fast.nn.PurificationGate.pool_over_open_steps`; composed on the op, not in it).
        dropout: "keyed" (every dropout site a counter-based :class:`~mim_fast.nn.Dropout`, keyed by
            (seed, site, sample): independent of the batch and the number of processes) or "torch"
            (torch's own dropout at the same sites: the published code's, for a baseline).
    """

    def __init__(self, modalities: Sequence[ModalitySpec], d_model: int = 80, *, fusion: str = "multiplication",
                 activation: str = "tanh", heads: int = 5, backend: str = "auto", eval_mode: str = "expected",
                 upn: bool = True, pool_norm: str = "T", dropout: str = "keyed", **gate_kwargs):
        super().__init__()
        if len(modalities) < 2:
            raise ValueError("MIM needs at least 2 modalities; got %d" % len(modalities))
        names = [m.name for m in modalities]
        if len(set(names)) != len(names):
            raise ValueError("modality names must be unique; got %s" % names)
        if not isinstance(upn, bool):
            raise TypeError("upn must be a bool; got %s" % type(upn).__name__)
        if dropout not in ("keyed", "torch"):
            raise ValueError("dropout must be 'keyed' or 'torch'; got %r" % (dropout,))
        if pool_norm not in POOL_NORMS:
            raise ValueError("pool_norm must be one of %s; got %r" % (", ".join(map(repr, POOL_NORMS)), pool_norm))
        self.specs = tuple(modalities)
        self.d_model = d_model
        self.upn = upn
        self.pool_norm = pool_norm
        self.encoders = nn.ModuleDict()
        self.masks = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for spec in modalities:
            if spec.kind not in KINDS:
                raise ValueError("modality %r: kind must be one of %s; got %r" % (spec.name, KINDS, spec.kind))
            if spec.kind == "features":
                enc = SequenceEncoder(spec.d_in, d_model, layers=spec.layers, heads=heads, activation=activation)
            elif spec.kind == "words":
                enc = WordEncoder(spec.d_in, d_model, activation=activation)
            else:
                enc = BertEncoder(spec.bert_path, d_model, activation=activation)
            self.encoders[spec.name] = enc
            if upn:
                self.masks[spec.name] = MaskLearner(d_model, seq_len=spec.seq_len, activation=activation,
                                                    backend=backend, eval_mode=eval_mode, **gate_kwargs)
            self.heads[spec.name] = nn.Linear(d_model, 1)
        self.fusion = Fusion(d_model, len(modalities), fusion)
        assign_streams(self)  # every dropout site of the model draws from its own stream
        for m in self.modules():
            if isinstance(m, Dropout):
                m.keyed = dropout == "keyed"

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.specs]

    def upn_parameters(self) -> List[nn.Parameter]:
        """The Unimodal Purification Networks' parameters (the mask learners): what the first phase of
        MIM's update trains (none when ``upn`` is False)."""
        return [p for m in self.masks.values() for p in m.parameters()]

    def forward(self, inputs: Dict[str, torch.Tensor], lengths: Optional[Dict[str, torch.Tensor]] = None,
                noise: Optional[Dict[str, torch.Tensor]] = None, seed: Optional[int] = None,
                index: Optional[torch.Tensor] = None) -> MIMOutput:
        """inputs[name]: (B, T, d_in) features or (B, T) token ids, batch-first; lengths[name]: (B,) or
        absent (all T valid).

        Randomness (training mode; in eval only a gate with ``eval_mode="sample"`` draws) is a function of
        (``seed``, ``index``): modality i's gate noise is ``mim_fast.gate_noise((seed + i) mod 2^62, index,
        T_i)`` unless ``noise[name]`` (B, T) is given, and every dropout element of the encoders is keyed
        by (seed, its site's stream, index[b], element) (see :func:`mim_fast.dropout`). ``index`` (B,) int:
        the samples' global indices (default 0..B-1), so a sample draws the same noise and masks in any
        batch, position or process. ``seed`` None: one seed is drawn from torch's default CPU generator
        (``torch.manual_seed`` makes the forward repeatable), only when something will draw.
        """
        lengths = lengths or {}
        noise = dict(noise or {})
        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise ValueError("inputs is missing modality %r (expected keys %s)" % (missing[0], self.names))
        first = inputs[self.names[0]]
        if index is None:
            index = torch.arange(first.shape[0], device=first.device)
        sampled = [i for i, s in enumerate(self.specs) if self.upn and s.name not in noise and
                   (self.training or self.masks[s.name].mask.eval_mode == "sample")]
        if seed is None and (self.training or sampled):
            seed = reference.draw_seed()
        for i in sampled:
            spec = self.specs[i]
            noise[spec.name] = gate_noise((seed + i) % 2**62, index, spec.seq_len)
        ks, us, yks, yus, pens, gates, logits = [], [], [], [], [], [], []
        for spec in self.specs:
            lens = lengths.get(spec.name)
            with named_range("mim/encoder/" + spec.name):
                enc = self.encoders[spec.name](inputs[spec.name], lens, seed, index)
            x = enc.sequence
            T, B = x.shape[0], x.shape[1]
            if self.upn:
                pooled, penalty, gate, logit = self._purify(spec, x, lens, noise.get(spec.name))
            else:  # the ablation without UPN: the purified representation is the unpurified one
                pooled, gate, logit = enc.pooled, x.new_ones(B, T), x.new_zeros(B, T)
                penalty = x.new_zeros(())
                if lens is not None:
                    gate = (torch.arange(T, device=x.device)[None, :] < lens.to(x.device)[:, None]).to(x.dtype)
            with named_range("mim/heads"):
                head = self.heads[spec.name]
                ks.append(pooled)
                us.append(enc.pooled)
                yks.append(head(pooled).squeeze(-1))
                yus.append(head(enc.pooled).squeeze(-1))
            pens.append(penalty)
            gates.append(gate)
            logits.append(logit)
        with named_range("mim/fusion"):
            prediction = self.fusion(ks)
        with named_range("mim/heads"):
            return MIMOutput(prediction, torch.stack(yks), torch.stack(yus), torch.stack(ks), torch.stack(us),
                             torch.stack(pens), gates, logits)

    def _purify(self, spec: ModalitySpec, x: torch.Tensor, lens: Optional[torch.Tensor],
                noise: Optional[torch.Tensor]):
        """One modality's UPN: (pooled k_m, penalty P_m, gate, logits). ``noise`` is the gate's (B, T) noise
        whenever the gate samples (forward draws it, keyed by sample), None in mode "expected"."""
        mask = self.masks[spec.name]
        # The mask learner's forward in its two parts, so that a profile tells the BiLSTM and MLPs from the
        # fused gate (MaskLearner.forward is exactly these two calls).
        with named_range("mim/mask_learner/" + spec.name):
            logit = mask.gate_logits(x)
        with named_range("mim/gate/" + spec.name):
            out = mask.mask(x, logit, lens, noise=noise)
            pooled = out.pooled
            if self.pool_norm == "open":
                pooled = mask.mask.pool_over_open_steps(pooled, out.gate, logit, noise, lens)
        return pooled, out.penalty, out.gate, logit
