"""Training and evaluation of the MIM model (SPEC §3–4): ``mim_fast.train.run(config)``, the CLI's
``mim-fast train``.

The step is MIM's, repaired: one forward pass, two gradient sets from the same graph
(torch.autograd.grad), then two Adam steps —

    g_A = ∇_{θ_UPN}(penalty_weight·Σ_m P_m + masked)         → Adam over the mask learners
    g_B = ∇_{θ_all}(unmasked + inter + intra + L_cls)          → Adam over all parameters

(``optimizer="joint"``: one Adam over all parameters on the sum). The settings come from a preset
(``TrainConfig.preset``: "mim", the released code's; "demo", the fast synthetic demo), each overridable.
Evaluation reports both metric conventions by name (:func:`mim_fast.metrics.regression_metrics`).
Model selection: the epoch with the lowest dev L1, as published. Every epoch's randomness (shuffling,
dropout, gate noise) is a function of (seed, epoch) alone, and the gate noise of a sample is keyed by its
global index, so a run resumed from an epoch checkpoint — even after an interruption mid-epoch —
reproduces the uninterrupted run exactly.
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch

from . import data as data_lib
from . import metrics as metrics_lib
from .nn import MIM, ModalitySpec
from .ops import gate_noise, kgs_loss
from .profiling import named_range

__all__ = ["TrainConfig", "Batch", "batches", "load_for_training", "run", "build_model", "train_step", "evaluate",
           "RunFolderExists"]


# The synthetic data of the default run (the demo): impure steps form one contiguous stretch per sample
# and carry a marker, see TrainConfig's docstring. Data, not a setting: every preset trains on it.
DEMO_SYNTHETIC = {"marker": 3.0, "contiguous": True}

# The two presets (TrainConfig's docstring and the README's table say where and why they differ). Every
# field named here defaults to None in TrainConfig and takes the preset's value unless given explicitly.
PRESETS = {
    # MIM as released (github zengy268/MIM: README's config, train.py, modules/model.py), see SPEC §3.
    "mim": dict(
        epochs=100, batch_size=16, lr=1e-5, weight_decay=0.0, d_model=80, heads=5, text_layers=0, av_layers=3,
        fusion="multiplication", activation="tanh", optimizer="two-phase", drop_last=True,
        per_sample=False, kgs_transfer=True, kd_scale=10.0, kd_divide_T=False, eval_gate="sample",
        # the UPN
        upn=True, penalty_weight=0.1, penalty_scale="none", penalty_warmup=0, gate_penalty="mim", loc_bias=3.0,
        mask_ratio=5, mask_score_bias="pytorch", mask_score_relu=True, mask_residual=False, pool_norm="T"),
    # The fast demo on the synthetic data (~1.5 min on one core), with a purification network that purifies.
    "demo": dict(
        epochs=30, batch_size=32, lr=1e-3, weight_decay=0.0, d_model=40, heads=5, text_layers=0, av_layers=1,
        fusion="multiplication", activation="tanh", optimizer="two-phase", drop_last=False,
        per_sample=True, kgs_transfer=True, kd_scale=10.0, kd_divide_T=False, eval_gate="expected",
        # the UPN
        upn=True, penalty_weight=0.3, penalty_scale="none", penalty_warmup=0, gate_penalty="threshold",
        loc_bias=3.0, mask_ratio=1, mask_score_bias=0.1, mask_score_relu=False, mask_residual=True, pool_norm="T"),
}
PENALTY_SCALES = ("none", "task", "sample")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved as config.json in the run folder).

    PRESETS. ``preset="mim"`` is the configuration of the released MIM code (github zengy268/MIM), every
    hyper-parameter as published; ``preset="demo"`` is the fast demo on the synthetic data, whose
    purification network (UPN) closes most impure steps there and few clean ones (MIM's closes none).
    ``preset=None`` picks "demo" for ``data="synthetic"`` and "mim" for a dataset pickle. Each field that
    defaults to None takes the preset's value (``PRESETS``) unless given explicitly:
    ``TrainConfig(preset="mim", lr=1e-3)`` is MIM with another learning rate. Values are resolved at
    construction (so ``dataclasses.replace`` keeps them), and config.json records the preset and every
    resolved value.

    Where the released code is silent or broken: its ``global_configs.py`` is a file of NUL bytes (the
    values come from its README), so the pooling activation is unknown — both tanh and ReLU are commented
    in; we use tanh (SPEC §1). Its seed is hard-coded to 3407 (``set_random_seed`` ignores its argument):
    ours is a replicate index (default 0) in both presets, since our random streams differ from its
    anyway. It evaluates dev/test at batch 128 and selects by the mean of per-batch dev L1s; we evaluate
    at ``batch_size`` and select by the per-sample mean dev L1 (no batch-size effect: gate noise is keyed
    by sample). Its Transformer has attention dropout 0.5; torch's layer has one dropout, 0.3
    (:class:`~mim_fast.nn.SequenceEncoder`). Without BERT weights (``bert_path``) text ids get a learned
    embedding instead of BERT.

    DEMO vs MIM (measured on the synthetic data; README, "What the demo shows"):

    * speed: 30 epochs (MIM 100), batch 32 (16), lr 1e-3 (MIM's 1e-5 fine-tunes a pretrained BERT; the
      demo trains every weight from scratch in 30 epochs), D = 40 (80), 1 audio/vision Transformer layer
      (3), every train batch (MIM drops the last incomplete one), per-sample KGS routing (the paper's
      "sample variations"; the released code routes by batch means), expected gates in evaluation (the
      released HardConcrete has no eval branch and samples).
    * the UPN (benchmarks/upn_purification.py and its log: every setting below was measured there, the
      failures too). With MIM's UPN settings no gate closes on the synthetic data (0.00/0.00 in every
      modality): pooling divides by T, so closing any step shrinks k_m and every task gradient pushes
      every gate open, and the 0.1·P(c > 0) penalty is too weak to counter it. The demo changes four
      things, each its own field:
      - ``mask_score_relu = False`` and ``mask_residual = True`` (MIM: ReLU score, no skip). With the
        published mask learner the logits came out one constant per position (the score ReLU dead, or
        the time MLP's per-position biases dominating): whole positions closed for every sample and then
        got no gradient. A linear score with a skip connection around the time MLP (g = MLP(s) + s)
        keeps each step's own score in its logit.
      - ``gate_penalty = "threshold"``, ``penalty_weight = 0.3`` (MIM: P(c > 0), 0.1). The penalty on
        P(c > τ), the probability that the hard gate opens, peaks where the gates are decided, not at
        a = −0.5; 0.2 closes too little, 0.5 closes clean steps too (at 1.0: a third of the clean text
        steps).
      - ``mask_ratio = 1`` (MIM: 5): at T = 20 a ratio of 5 leaves 4 units in the time MLP. With the skip
        connection ratio 5 works too (text closes more impure and more clean steps); kept from the
        earlier demo.
      - ``mask_score_bias = 0.1`` (MIM: PyTorch's default init): kept from the earlier demo, whose score
        ReLU could start dead; the linear score cannot die.
      Measured limits (README, "What the demo shows"): pooling over T values a clean step by |y| (closing
      it moves the prediction towards the intercept), so the clean steps of weak-sentiment samples close
      and the impure steps of strong ones stay open; the pooling over open steps removes that but lets the
      penalty close whole positions (``pool_norm="open"`` closes impure and clean steps alike).
    * the synthetic data (``DEMO_SYNTHETIC``, used by every preset: it is the data, not a setting):
      impure steps are one contiguous stretch per sample (the generator's docstring's "off-topic
      stretch, like a quote or background speech") that carries a marker (its own signature, as
      background speech or a sensor fault has its own spectrum), instead of scattered, step-for-step
      indistinguishable steps. The encoders mix neighbouring steps (Conv1d k=3, and attention for
      audio/vision), so a scattered impure step is mostly clean context after encoding and closing it
      removes signal; without a marker nothing local tells it apart.
    ``loc_bias`` stays MIM's 3 (gates start open).

    Options that are not MIM and no preset uses (ablations and the investigation): ``upn=False`` (no
    purification networks: k_m = u_m), ``kgs_transfer=False`` (no intra/inter knowledge transfer; the L1
    terms stay), ``pool_norm="open"`` (the purified mean over the open steps instead of over T),
    ``penalty_scale="task"`` (the penalty weight times the step's detached task L1) or ``"sample"`` (each
    sample's steps priced by its |yk − bias|, :func:`sample_scaled_penalty`), ``penalty_warmup`` (the weight
    ramps up from 0 over that many epochs).
    """

    data: str = "synthetic"          # "synthetic" or the path of a MAG-BERT / MMSA pickle
    preset: Optional[str] = None     # "mim" or "demo"; None: "demo" on synthetic data, "mim" on a pickle
    out: str = "runs/mim"            # the run folder
    seed: int = 0
    # -- from the preset unless given (None) --------------------------------------------------------------
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    d_model: Optional[int] = None
    heads: Optional[int] = None
    text_layers: Optional[int] = None  # Transformer layers after the text Conv1d (MIM: 0)
    av_layers: Optional[int] = None  # ... after the audio/vision Conv1d (MIM: 3)
    fusion: Optional[str] = None     # "multiplication" (MIM), "add", "concat", "tensor"
    activation: Optional[str] = None  # φ of the poolings: "tanh", "relu", "identity"
    optimizer: Optional[str] = None  # "two-phase" (MIM) or "joint"
    drop_last: Optional[bool] = None  # drop the last incomplete training batch of an epoch (MIM: True)
    per_sample: Optional[bool] = None  # KGS routing per sample (paper) or by batch means (released code)
    kgs_transfer: Optional[bool] = None  # False: no intra/inter terms (KGS off; an ablation)
    kd_scale: Optional[float] = None
    kd_divide_T: Optional[bool] = None
    upn: Optional[bool] = None       # False: no purification networks, k_m = u_m (an ablation)
    penalty_weight: Optional[float] = None  # weight of Σ_m P_m in phase A (MIM: 0.1)
    penalty_scale: Optional[str] = None  # "none" (MIM), "task" (× the step's task L1) or "sample" (see above)
    penalty_warmup: Optional[float] = None  # epochs over which the penalty weight ramps up from 0 (MIM: 0)
    gate_penalty: Optional[str] = None  # "mim" (P(c > 0), published) or "threshold" (P(c > τ))
    loc_bias: Optional[float] = None  # the gate's a = g + loc_bias (MIM: 3, i.e. gates start open)
    mask_ratio: Optional[int] = None  # the mask learner's time bottleneck T → T/ratio → T (MIM: 5)
    mask_score_bias: Optional[Union[float, str]] = None  # initial bias of the score unit (pooler3[2]);
                                     # "pytorch" = PyTorch's default init (MIM)
    mask_score_relu: Optional[bool] = None  # the ReLU that ends the score MLP (MIM: True)
    mask_residual: Optional[bool] = None  # logits = time MLP(scores) + scores (MIM: False, the MLP alone)
    pool_norm: Optional[str] = None  # purified pooling over "T" (MIM) or over the "open" steps
    eval_gate: Optional[str] = None  # "expected" or "sample" (the published evaluation)
    # -- not in the presets --------------------------------------------------------------------------------
    amp: str = "none"                # "none", "bf16" or "fp16"
    device: str = "auto"
    backend: str = "auto"
    synthetic: Dict[str, float] = field(default_factory=lambda: dict(DEMO_SYNTHETIC))  # mim_fast.data.synthetic()
                                     # options (replaces DEMO_SYNTHETIC as a whole when given)
    max_len: int = 50                # MAG-BERT pickles: pad/truncate to this many words
    bert_path: Optional[str] = None  # a local Hugging Face BERT for token-id text (else a learned embedding)

    def __post_init__(self):
        if self.preset is None:
            self.preset = "demo" if self.data == "synthetic" else "mim"
        if self.preset not in PRESETS:
            raise ValueError("preset must be one of %s; got %r" % (", ".join(map(repr, PRESETS)), self.preset))
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not (isinstance(self.mask_ratio, int) and self.mask_ratio >= 1):
            raise ValueError("mask_ratio must be an integer >= 1, got %r" % (self.mask_ratio,))
        if not self.penalty_weight >= 0:
            raise ValueError("penalty_weight must be >= 0, got %r" % (self.penalty_weight,))
        if not self.penalty_warmup >= 0:
            raise ValueError("penalty_warmup must be >= 0 (epochs), got %r" % (self.penalty_warmup,))
        if self.penalty_scale not in PENALTY_SCALES:
            raise ValueError("penalty_scale must be one of %s; got %r" % (PENALTY_SCALES, self.penalty_scale))
        if not (self.mask_score_bias == "pytorch" or isinstance(self.mask_score_bias, (int, float))):
            raise ValueError("mask_score_bias must be a number or 'pytorch'; got %r" % (self.mask_score_bias,))

    def overrides(self) -> Dict[str, object]:
        """The preset fields whose value differs from the preset's: {name: value}."""
        return {k: getattr(self, k) for k, v in PRESETS[self.preset].items() if getattr(self, k) != v}


class RunFolderExists(RuntimeError):
    """The run folder already holds a run and neither --overwrite nor --resume was given."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    # distinct, reproducible 62-bit seeds per (run seed, epoch, stream)
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0] >> 2)


class Batch(NamedTuple):
    """A batch on the training device: inputs/lengths/impurity keyed by modality, labels (B,), index (B,)."""

    inputs: Dict[str, torch.Tensor]
    lengths: Dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    impurity: Optional[Dict[str, torch.Tensor]]


def batches(split, batch_size: int, *, shuffle: bool, device: torch.device, seed: int = 0,
            drop_last: bool = False) -> Iterator[Batch]:
    """Batches of a :class:`~mim_fast.data.MultimodalSplit`, shuffled by a generator seeded with ``seed``;
    ``drop_last`` leaves out the last batch when it is incomplete (as the released code's train loader)."""
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        raw = split.batch(order[start:start + batch_size])
        impurity = {m: raw[m + "_impurity"] for m in data_lib.MODALITIES if m + "_impurity" in raw} or None
        yield Batch({m: raw[m].to(device) for m in data_lib.MODALITIES},
                    {m: raw[m + "_lengths"].to(device) for m in data_lib.MODALITIES},
                    raw["labels"].to(device), raw["index"].to(device), impurity)


def load_for_training(config: TrainConfig):
    """The dataset a config names: the synthetic one (with ``config.synthetic`` overrides) or a pickle."""
    if config.data == "synthetic":
        opts = {"seed": config.seed, **config.synthetic}
        for k in ("dims", "strength"):
            if k in opts and isinstance(opts[k], list):
                opts[k] = tuple(opts[k])
        return data_lib.synthetic(**opts)
    return data_lib.load(config.data, max_len=config.max_len if data_lib.detect_format(config.data) == "magbert"
                         else None)


def build_model(dataset, config: TrainConfig) -> MIM:
    """The MIM model for a dataset's modalities and dims."""
    specs = []
    for m in data_lib.MODALITIES:
        T = dataset.seq_len[m]
        if m == "text" and dataset.text_is_tokens:
            kind = "bert" if config.bert_path else "words"
            specs.append(ModalitySpec(m, kind, dataset.vocab_size, T, 0, config.bert_path))
        else:
            layers = config.text_layers if m == "text" else config.av_layers
            specs.append(ModalitySpec(m, "features", dataset.dims[m], T, layers))
    model = MIM(specs, d_model=config.d_model, fusion=config.fusion, activation=config.activation,
                heads=config.heads, backend=config.backend, eval_mode=config.eval_gate, upn=config.upn,
                pool_norm=config.pool_norm, loc_bias=config.loc_bias, penalty=config.gate_penalty,
                ratio=config.mask_ratio, score_relu=config.mask_score_relu, residual=config.mask_residual)
    if config.mask_score_bias != "pytorch":
        with torch.no_grad():
            for learner in model.masks.values():
                learner.pooler3[2].bias.fill_(config.mask_score_bias)
    return model


def _noise(model: MIM, batch, seed: int) -> Dict[str, torch.Tensor]:
    """Gate noise keyed by (seed, modality, global sample index): independent of batch order."""
    return {spec.name: gate_noise((seed + i) % 2**62, batch.index, spec.seq_len) for i, spec in enumerate(model.specs)}


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def penalty_ramp(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The factor on the penalty weight at step ``step`` (0-based) of ``steps`` in epoch ``epoch`` (1-based):
    rising linearly from 0 to 1 over the first ``penalty_warmup`` epochs, then 1 (always 1 without warm-up)."""
    if config.penalty_warmup <= 0:
        return 1.0
    return min(1.0, (epoch - 1 + step / max(steps, 1)) / config.penalty_warmup)


def sample_scaled_penalty(model: MIM, out, lengths, config: TrainConfig) -> torch.Tensor:
    """Σ_m of the gate penalty with each sample's steps priced by how much its prediction rests on its
    representation (``penalty_scale="sample"``): q (B, T) from the logits (the op's own penalty term,
    SPEC §1) weighted per sample by r_b = |yk_b − bias| / mean_b |yk_b − bias| (detached; mean 1 over
    the batch), then averaged over the valid steps. Over T, closing a step of sample b moves its
    prediction yk_b − bias towards 0 by about (yk_b − bias)/n: for a sample with a weak prediction
    closing is nearly free and an unscaled penalty closes its clean steps; for a strong one the pull of
    its same-sign impure steps outweighs it."""
    from .reference import penalty_log_ratio

    terms = []
    for i, spec in enumerate(model.specs):
        gate = model.masks[spec.name].mask
        shift = gate.beta * penalty_log_ratio(gate.penalty, gate.gamma, gate.zeta, gate.threshold)
        q = torch.sigmoid(out.logits[i].float() + gate.loc_bias - shift)  # (B, T)
        dev = (out.yk[i].float() - model.heads[spec.name].bias.float()).detach().abs()  # (B,)
        r = dev / dev.mean().clamp(min=1e-12)
        L = lengths.get(spec.name) if lengths else None
        if L is None:
            terms.append((q.mean(1) * r).mean())
        else:
            T = q.shape[1]
            valid = torch.arange(T, device=q.device)[None, :] < L.to(q.device)[:, None]
            per = torch.where(valid, q, torch.zeros_like(q)).sum(1)
            terms.append((per * r).sum() / valid.sum().clamp(min=1))
    return torch.stack(terms).sum()


def compute_losses(model: MIM, batch, config: TrainConfig, noise_seed: int, device: torch.device,
                   penalty_factor: float = 1.0):
    """Forward pass and every loss of the step: (out, kgs, L_cls, loss_A, loss_B). ``penalty_factor``
    multiplies the penalty weight (:func:`penalty_ramp`)."""
    inputs, lengths, y = batch.inputs, batch.lengths, batch.labels
    with named_range("mim/gate_noise"):
        noise = _noise(model, batch, noise_seed)
    with _autocast(config, device):
        out = model(inputs, lengths, noise=noise)
    with named_range("mim/kgs_loss"):
        kgs = kgs_loss(out.yk.float(), out.yu.float(), y, out.purified.float(), per_sample=config.per_sample,
                       kd_scale=config.kd_scale, kd_divide_T=config.kd_divide_T, backend=config.backend)
    with named_range("mim/task_loss"):
        task = (out.prediction.float() - y).abs().mean()
        weight = config.penalty_weight * penalty_factor * (task.detach() if config.penalty_scale == "task" else 1.0)
        penalty = sample_scaled_penalty(model, out, lengths, config) if config.penalty_scale == "sample" \
            else out.penalty.float().sum()
        loss_a = weight * penalty + kgs.masked
        loss_b = kgs.unmasked + task
        if config.kgs_transfer:
            loss_b = loss_b + kgs.inter + kgs.intra
    return out, kgs, task, loss_a, loss_b


class Optimizers:
    """Adam over the mask learners (phase A) and Adam over everything (phase B), or one joint Adam."""

    def __init__(self, model: MIM, config: TrainConfig, device: torch.device):
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.upn = model.upn_parameters()
        kw = dict(lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "two-phase" and not self.upn:  # no purification networks: phase B alone
            self.opts = [torch.optim.Adam(self.params, **kw)]
        elif config.optimizer == "two-phase":
            self.opts = [torch.optim.Adam(self.upn, **kw), torch.optim.Adam(self.params, **kw)]
        elif config.optimizer == "joint":
            self.opts = [torch.optim.Adam(self.params, **kw)]
        else:
            raise ValueError("optimizer must be 'two-phase' or 'joint'; got %r" % config.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")

    def step(self, loss_a: torch.Tensor, loss_b: torch.Tensor) -> None:
        sc = self.scaler
        with named_range("mim/backward"):
            if self.config.optimizer == "joint":
                grads = [torch.autograd.grad(sc.scale(loss_a + loss_b), self.params, allow_unused=True)]
                groups = [self.params]
            elif not self.upn:
                grads = [torch.autograd.grad(sc.scale(loss_b), self.params, allow_unused=True)]
                groups = [self.params]
            else:
                # Both gradient sets from the same graph before either step: the released code's in-place
                # order (step A, then backward B through the updated weights) fails on PyTorch >= 1.5.
                grads = [torch.autograd.grad(sc.scale(loss_a), self.upn, retain_graph=True, allow_unused=True),
                         torch.autograd.grad(sc.scale(loss_b), self.params, allow_unused=True)]
                groups = [self.upn, self.params]
        with named_range("mim/optimizer"):
            for opt, params, gs in zip(self.opts, groups, grads):
                for p, g in zip(params, gs):
                    p.grad = None if g is None else g.detach()
                sc.step(opt)
                for p in params:
                    p.grad = None
            sc.update()

    def state_dict(self):
        return {"opts": [o.state_dict() for o in self.opts], "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)
        self.scaler.load_state_dict(state["scaler"])


def train_step(model: MIM, opt: Optimizers, batch, config: TrainConfig, noise_seed: int, device: torch.device,
               penalty_factor: float = 1.0):
    """One MIM update; returns the step's detached losses (floats) for logging."""
    out, kgs, task, loss_a, loss_b = compute_losses(model, batch, config, noise_seed, device, penalty_factor)
    opt.step(loss_a, loss_b)
    logged = {"task": task, "masked": kgs.masked, "unmasked": kgs.unmasked, "intra": kgs.intra, "inter": kgs.inter,
              "penalty": out.penalty.sum()}
    return {k: float(v.detach()) for k, v in logged.items()}


@torch.no_grad()
def evaluate(model: MIM, split, config: TrainConfig, device: torch.device, seed: int) -> dict:
    """Predictions of a split (eval mode) → :func:`mim_fast.metrics.regression_metrics` (both conventions,
    by name), the L1 loss (``l1``, the per-sample mean: the model-selection criterion), and, where the
    split has ground-truth impurity masks, the purification quality of the gates (``purification``)."""
    model.eval()
    preds, labels, gates, masks, lens = [], [], {n: [] for n in model.names}, {n: [] for n in model.names}, \
        {n: [] for n in model.names}
    for batch in batches(split, config.batch_size, shuffle=False, device=device):
        with _autocast(config, device):
            out = model(batch.inputs, batch.lengths, noise=_noise(model, batch, seed))
        preds.append(out.prediction.float().cpu())
        labels.append(batch.labels.cpu())
        if batch.impurity is not None:
            for name, g in zip(model.names, out.gates):
                gates[name].append(g.float().cpu())
                masks[name].append(batch.impurity[name].cpu())
                lens[name].append(batch.lengths[name].cpu() if batch.lengths and name in batch.lengths
                                  else torch.full((g.shape[0],), g.shape[1]))
    model.train()
    p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    res = metrics_lib.regression_metrics(p, y)
    res["l1"] = float(np.abs(p - y).mean())
    if any(gates[n] for n in model.names):
        res["purification"] = metrics_lib.purification_metrics(
            {n: torch.cat(gates[n]) for n in model.names}, {n: torch.cat(masks[n]) for n in model.names},
            {n: torch.cat(lens[n]) for n in model.names})
    return res


def _progress(epoch: int, epochs: int, i: int, n: int, t0: float, loss: float, enabled: bool) -> None:
    if not enabled or not sys.stderr.isatty():  # a bar redrawn with \r only makes sense on a terminal
        return
    width = 24
    done = int(width * i / max(n, 1))
    sys.stderr.write("\r  epoch %3d/%d [%s%s] %4d/%d  L1 %.4f  %.1fs" % (
        epoch, epochs, "#" * done, "." * (width - done), i, n, loss, time.time() - t0))
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _prepare_out(config: TrainConfig, resume: bool, overwrite: bool) -> str:
    out = config.out
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.isdir(out) and os.listdir(out) and not resume:
        if not overwrite:
            raise RunFolderExists("run folder %s already holds files: pass --overwrite to replace them or "
                                  "--resume to continue that run" % out)
        shutil.rmtree(out)
    if resume and not os.path.exists(ckpt):
        raise FileNotFoundError("--resume: no checkpoint at %s" % ckpt)
    os.makedirs(out, exist_ok=True)
    return ckpt


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def run(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        stop_after_steps: Optional[int] = None, log=print) -> dict:
    """Train and evaluate; returns (and writes to <out>/metrics.json) the history, the best epoch and its
    test metrics, and a trivial baseline. ``stop_after_steps`` interrupts the run after that many training
    steps in total (without a checkpoint for the unfinished epoch), as a crash would — for tests."""
    device = _device(config.device)
    ckpt_path = _prepare_out(config, resume, overwrite)
    if resume:
        saved_cfg = torch.load(ckpt_path, map_location="cpu", weights_only=False)["config"]
        saved_cfg["epochs"] = config.epochs  # resuming may extend a run
        config = TrainConfig(**saved_cfg)
    _seed_everything(config.seed)
    dataset = load_for_training(config)
    model = build_model(dataset, config).to(device)
    opt = Optimizers(model, config, device)
    state = {"epoch": 0, "history": [], "best": None}
    if resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        state = ck["state"]
    with open(os.path.join(config.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)

    baseline = metrics_lib.regression_metrics(np.full(len(dataset.test), float(dataset.train.labels.mean())),
                                              dataset.test.labels.numpy())
    has_impurity = bool(dataset.test.impurity)
    if not resume:
        log("data: %s — train/dev/test = %d/%d/%d; %s" % (
            dataset.name or config.data, len(dataset.train), len(dataset.dev), len(dataset.test),
            ", ".join("%s %s×%d" % (m, "ids" if m == "text" and dataset.text_is_tokens else dataset.dims[m],
                                    dataset.seq_len[m]) for m in data_lib.MODALITIES)))
        log("model: %d parameters (%d in the mask learners), device %s, backend %s" % (
            sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.upn_parameters()), device,
            config.backend))
        log("preset %s%s" % (config.preset, "; overrides: " + ", ".join(
            "%s=%s" % kv for kv in config.overrides().items()) if config.overrides() else " (no overrides)"))
        log("trivial baseline (predict the train mean): test MAE(all) %.4f, Acc-2(non0) %.4f, Acc-7 %.4f" % (
            baseline["mae_all"], baseline["acc2_non0"], baseline["acc7"]))
        log(_header(has_impurity))
    steps = 0
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        torch.manual_seed(_epoch_seed(config.seed, epoch, 0))  # dropout: a function of (seed, epoch)
        noise_seed = _epoch_seed(config.seed, epoch, 1)
        t0 = time.time()
        model.train()
        sums, n = {}, 0
        epoch_batches = list(batches(dataset.train, config.batch_size, shuffle=True, device=device,
                                     seed=_epoch_seed(config.seed, epoch, 2), drop_last=config.drop_last))
        for i, batch in enumerate(epoch_batches, 1):
            losses = train_step(model, opt, batch, config, noise_seed, device,
                                penalty_ramp(config, epoch, i - 1, len(epoch_batches)))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            steps += 1
            _progress(epoch, config.epochs, i, len(epoch_batches), t0, sums["task"] / n, progress)
            if stop_after_steps is not None and steps >= stop_after_steps:
                return {"interrupted_at_epoch": epoch, "steps": steps}
        eval_seed = _epoch_seed(config.seed, 0, 3)  # the same for every epoch: comparable dev scores
        dev = evaluate(model, dataset.dev, config, device, eval_seed)
        test = evaluate(model, dataset.test, config, device, eval_seed)
        row = {"epoch": epoch, "train": {k: v / n for k, v in sums.items()}, "dev": dev, "test": test,
               "seconds": time.time() - t0}
        state["history"].append(row)
        if state["best"] is None or dev["l1"] < state["best"]["dev"]["l1"]:
            state["best"] = row
            _atomic_save({"model": model.state_dict(), "config": dataclasses.asdict(config), "epoch": epoch},
                         os.path.join(config.out, "best.pt"))
        state["epoch"] = epoch
        log(_row(row, best=state["best"]["epoch"] == epoch))
        _atomic_save({"model": model.state_dict(), "optim": opt.state_dict(), "state": state,
                      "config": dataclasses.asdict(config)}, ckpt_path)
    result = {"config": dataclasses.asdict(config), "baseline": baseline, "history": state["history"],
              "best": state["best"]}
    with open(os.path.join(config.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    _plots(result, config.out, log)
    best = state["best"]
    if best is not None:
        log("best epoch %d (lowest dev L1 %.4f), test metrics:" % (best["epoch"], best["dev"]["l1"]))
        log(metrics_table(best["test"]))
    return result


# The columns of the per-epoch table: (metrics key, header). Test metrics, the two conventions named.
_COLUMNS = (("mae_all", "MAE all"), ("corr_all", "Corr all"), ("acc2_has0", "Acc2 has0"),
            ("acc2_non0", "Acc2 non0"), ("f1_non0", "F1 non0"), ("acc7", "Acc7"))


def metrics_table(m: dict) -> str:
    """A two-column text table of :func:`~mim_fast.metrics.regression_metrics`' output, each convention
    named: MAE/Corr on all samples and on y ≠ 0, Acc-2/F1 has-0, non-0 by MAG-BERT's rule (pred ≥ 0, what
    MIM reports) and by MMSA's (pred > 0), Acc-5, Acc-7."""
    names = {"mae_all": "MAE, all samples (MMSA)", "corr_all": "Corr, all samples (MMSA)",
             "mae_non0": "MAE, y != 0 (MAG-BERT, MIM)", "corr_non0": "Corr, y != 0 (MAG-BERT, MIM)",
             "acc2_has0": "Acc-2 has-0: pred >= 0 vs y >= 0, all", "f1_has0": "F1 has-0 (weighted)",
             "acc2_non0": "Acc-2 non-0, MAG-BERT (MIM): pred >= 0, y != 0", "f1_non0": "F1 non-0, MAG-BERT (MIM)",
             "acc2_non0_mmsa": "Acc-2 non-0, MMSA: pred > 0, y != 0", "f1_non0_mmsa": "F1 non-0, MMSA",
             "acc5": "Acc-5 (clip ±2)", "acc7": "Acc-7 (clip ±3)"}
    return "\n".join("  %-48s %.4f" % (names[k], m[k]) for k in metrics_lib.METRIC_KEYS)


def _header(impurity: bool) -> str:
    cols = "epoch | train L1 | dev L1 | " + " | ".join(h for _, h in _COLUMNS) + " |"
    if impurity:
        cols += " gate closed impure/clean (per modality) |"
    return cols + "  time"


def _row(row: dict, best: bool) -> str:
    t = row["test"]
    s = "%5d | %8.4f | %6.4f | " % (row["epoch"], row["train"]["task"], row["dev"]["l1"]) + " | ".join(
        "%*.4f" % (len(h), t[k]) for k, h in _COLUMNS) + " |"
    if "purification" in t:
        s += " " + " ".join("%s %.2f/%.2f" % (n[0], v["closed_impure"], v["closed_clean"])
                            for n, v in t["purification"].items()) + " |"
    return s + " %5.1fs%s" % (row["seconds"], "  *" if best else "")


def _plots(result: dict, out: str, log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("(matplotlib not installed: no plots)")
        return
    hist = result["history"]
    if not hist:
        return
    ep = [h["epoch"] for h in hist]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ep, [h["train"]["task"] for h in hist], label="train L1")
    ax[0].plot(ep, [h["dev"]["l1"] for h in hist], label="dev L1")
    ax[0].plot(ep, [h["test"]["mae_all"] for h in hist], label="test MAE (all)")
    ax[0].axhline(result["baseline"]["mae_all"], color="gray", ls="--", label="trivial baseline")
    ax[0].set_xlabel("epoch"); ax[0].legend(); ax[0].set_title("losses")
    ax[1].plot(ep, [h["test"]["acc2_non0"] for h in hist], label="Acc-2 (non-0)")
    ax[1].plot(ep, [h["test"]["acc7"] for h in hist], label="Acc-7")
    ax[1].plot(ep, [h["test"]["corr_all"] for h in hist], label="Corr (all)")
    ax[1].set_xlabel("epoch"); ax[1].legend(); ax[1].set_title("test metrics")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)
    if "purification" in hist[-1]["test"]:
        names = list(hist[-1]["test"]["purification"])
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), sharey=True)
        for a, n in zip(np.atleast_1d(axes), names):
            a.plot(ep, [1 - h["test"]["purification"][n]["closed_clean"] for h in hist], label="clean steps")
            a.plot(ep, [1 - h["test"]["purification"][n]["closed_impure"] for h in hist], label="impure steps")
            a.set_title("%s: gate open rate" % n); a.set_xlabel("epoch"); a.set_ylim(0, 1.02)
        np.atleast_1d(axes)[0].legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "gates.png"), dpi=110)
        plt.close(fig)
