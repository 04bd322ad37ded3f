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
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Union

import numpy as np
import torch

from . import data as data_lib
from . import distributed
from . import metrics as metrics_lib
from . import runs
from ._types import KGSLossOutput
from .distributed import World
from .nn import MIM, ModalitySpec
from .ops import BACKENDS, gate_noise, kgs_loss
from .runs import CheckpointError, RunFolderError
from .profiling import named_range

__all__ = ["TrainConfig", "Batch", "GlobalPart", "batches", "load_for_training", "run", "resume", "build_model",
           "train_step", "compute_losses", "Optimizers", "compile_model", "evaluate", "resolve_device",
           "resolve_backends", "environment", "RunFolderError", "RunFolderExists", "CheckpointError", "Interrupted",
           "TrainingDiverged"]


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
    # Set by mim-fast train, not a setting: the number of processes that trained the run (torchrun's
    # WORLD_SIZE; see mim_fast.distributed). The trajectory does not depend on it, up to float32 rounding.
    world_size: int = 1
    dropout: str = "keyed"            # "keyed" (counter-based, keyed by sample) or "torch" (torch's own:
                                     # the published code's, a speed baseline; single process only)
    adam: str = "fused"               # "fused" (torch.optim.Adam(fused=True): one kernel per parameter) or
                                     # "default" (torch's own choice, the published code's: a per-parameter
                                     # loop of ops on CPU, foreach on CUDA; a speed baseline)

    def __post_init__(self):
        if self.preset is None:
            self.preset = "demo" if self.data == "synthetic" else "mim"
        if self.preset not in PRESETS:
            raise ValueError("preset must be one of %s; got %r" % (", ".join(map(repr, PRESETS)), self.preset))
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range (ValueError naming the field and its --flag): a bad value is
        refused before a run touches its folder. Device and backend availability are checked by
        :func:`resolve_device` / :func:`resolve_backends`, which need torch's view of this machine."""
        def bad(name, what):
            raise ValueError("%s (%s) must be %s; got %r" % (name, _flag(name), what, getattr(self, name)))

        def integer(name, minimum):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                bad(name, "an integer >= %d" % minimum)

        def number(name, positive=False, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (v <= 0 if positive else v < 0):
                bad(name, "a finite number %s 0" % (">" if positive else ">="))

        def choice(name, options):
            if getattr(self, name) not in options:
                bad(name, "one of %s" % ", ".join(map(str, options)))

        if not isinstance(self.data, str) or not self.data:
            bad("data", "'synthetic' or the path of a pickle")
        if not isinstance(self.out, str):
            bad("out", "a folder path")
        for name, minimum in (("seed", 0), ("epochs", 1), ("batch_size", 1), ("d_model", 2), ("heads", 1),
                              ("mask_ratio", 1), ("text_layers", 0), ("av_layers", 0), ("max_len", 1),
                              ("world_size", 1)):
            integer(name, minimum)
        for name in ("lr", "kd_scale"):
            number(name, positive=True)
        for name in ("weight_decay", "penalty_weight", "penalty_warmup"):
            number(name)
        if isinstance(self.loc_bias, bool) or not isinstance(self.loc_bias, (int, float)) or \
                not math.isfinite(self.loc_bias):
            bad("loc_bias", "a finite number")
        if self.mask_score_bias != "pytorch" and (isinstance(self.mask_score_bias, bool) or not isinstance(
                self.mask_score_bias, (int, float)) or not math.isfinite(self.mask_score_bias)):
            bad("mask_score_bias", "a finite number or 'pytorch' (PyTorch's default init)")
        choice("fusion", ("multiplication", "add", "concat", "tensor"))
        choice("dropout", ("keyed", "torch"))
        choice("adam", ("fused", "default"))
        choice("activation", ("tanh", "relu", "identity"))
        for name in ("per_sample", "kgs_transfer", "kd_divide_T", "upn", "drop_last", "mask_score_relu",
                     "mask_residual"):
            choice(name, (True, False))
        choice("gate_penalty", ("mim", "threshold"))
        choice("penalty_scale", PENALTY_SCALES)
        choice("pool_norm", ("T", "open"))
        choice("optimizer", ("two-phase", "joint"))
        choice("eval_gate", ("expected", "sample"))
        choice("amp", ("none", "bf16", "fp16"))
        choice("backend", ("auto",) + BACKENDS)
        if not isinstance(self.device, str) or not self.device:
            bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if (self.av_layers or self.text_layers) and self.d_model % self.heads:
            raise ValueError("d_model must be divisible by heads (the Transformer layers split it across heads); "
                             "got d_model (--d-model) = %d, heads = %d" % (self.d_model, self.heads))
        if not isinstance(self.synthetic, dict):
            bad("synthetic", "a dict of mim_fast.data.synthetic() options")
        if self.bert_path is not None and not os.path.isdir(str(self.bert_path)):
            raise ValueError("bert_path (--bert): %s is not a folder (a local Hugging Face BERT)" % self.bert_path)

    def overrides(self) -> Dict[str, object]:
        """The preset fields whose value differs from the preset's: {name: value}."""
        return {k: getattr(self, k) for k, v in PRESETS[self.preset].items() if getattr(self, k) != v}


# TrainConfig fields whose command-line flag is not --<field with dashes>
_FLAGS = {"per_sample": "--routing", "kgs_transfer": "--routing off", "upn": "--no-upn", "av_layers": "--layers",
          "bert_path": "--bert", "data": "--data"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def resolve_device(name: str) -> torch.device:
    """The torch.device a config's ``device`` names ("auto": the first GPU when torch sees one, else the
    CPU); ValueError, listing what is available here, for a name torch cannot use on this machine."""
    gpus = ["cuda:%d" % i for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    available = ", ".join(["cpu"] + (["cuda"] + gpus if gpus else []))
    if name == "auto":
        return torch.device("cuda" if gpus else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError("--device %r is not a device name (available here: %s)" % (name, available)) from None
    if device.type == "cuda":
        if not gpus:
            raise ValueError("--device %s: torch sees no CUDA device here (available here: %s)" % (name, available))
        if device.index is not None and device.index >= len(gpus):
            raise ValueError("--device %s: there is no such GPU (available here: %s)" % (name, available))
    elif device.type != "cpu":
        raise ValueError("--device %s: mim-fast train runs on a CPU or a CUDA GPU (available here: %s)"
                         % (name, available))
    return device


def resolve_backends(backend: str, device: torch.device) -> Dict[str, str]:
    """{op: backend} that the gate and the KGS loss will run on (``backend`` "auto": the fastest that can
    serve ``device``); ValueError naming the reason and the backends available there when the asked one
    cannot run on that device."""
    from .ops import _backends

    chosen = {}
    for op in ("purify_gate", "kgs_loss"):
        status = _backends.backend_status(op, device, (torch.float32,))
        ok = [b for b in _backends.AUTO_ORDER.get(device.type, ("torch",)) if status.get(b) is None]
        if backend == "auto":
            if not ok:
                raise ValueError("no backend can run %s on %s: %s" % (op, device, "; ".join(
                    "%s: %s" % kv for kv in status.items())))
            chosen[op] = ok[0]
        elif status.get(backend) is not None:
            raise ValueError("--backend %s cannot run %s on %s: %s (available there: %s)"
                             % (backend, op, device.type, status[backend], ", ".join(["auto"] + ok)))
        else:
            chosen[op] = backend
    return chosen


def _device(name: str) -> torch.device:
    """"auto" → cuda when present, else cpu; anything else as torch.device parses it (unchecked; used by
    mim-fast profile, which reports its own errors)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    # distinct, reproducible 62-bit seeds per (run seed, epoch, stream)
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0] >> 2)


class GlobalPart(NamedTuple):
    """Where one process's batch sits in its step's global batch (multi-process training: see
    :mod:`mim_fast.distributed`)."""

    start: int              # position of this process's first sample in the global batch
    size: int               # samples in the global batch, B
    steps: Dict[str, int]   # valid (unpadded) steps per modality in the global batch: the gate penalty's denominator


class Batch(NamedTuple):
    """A batch on the training device: inputs/lengths/impurity keyed by modality, labels (B,), index (B,)
    (the samples' global indices: they key gate noise and dropout). ``part``: where the batch sits in its
    step's global batch when several processes share the step (None: the batch is the global batch)."""

    inputs: Dict[str, torch.Tensor]
    lengths: Dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    impurity: Optional[Dict[str, torch.Tensor]]
    part: Optional[GlobalPart] = None


def batches(split, batch_size: int, *, shuffle: bool, device: torch.device, seed: int = 0,
            world: Optional[World] = None, drop_last: bool = False) -> Iterator[Batch]:
    """Global batches of ``batch_size`` samples of a :class:`~mim_fast.data.MultimodalSplit` (the last one
    may be smaller; ``drop_last`` leaves it out when it is incomplete, as the released code's train loader),
    shuffled by a generator seeded with ``seed``. With a ``world`` of several processes, every process goes
    through the same global batches and gets only its part of each (:func:`mim_fast.distributed.shard`:
    contiguous, the first B mod N ranks one sample more, possibly none), with ``part`` saying where it sits;
    nothing is padded."""
    world = world or World()
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    end = n - n % batch_size if drop_last and n >= batch_size else n
    for first in range(0, end, batch_size):
        members = order[first:first + batch_size]
        start, stop = distributed.shard(len(members), world)
        raw = split.batch(members[start:stop])
        part = None
        if world.size > 1:
            part = GlobalPart(start, len(members), {m: int(split.lengths[m][members].sum())
                                                    for m in data_lib.MODALITIES})
        impurity = {m: raw[m + "_impurity"] for m in data_lib.MODALITIES if m + "_impurity" in raw} or None
        yield Batch({m: raw[m].to(device) for m in data_lib.MODALITIES},
                    {m: raw[m + "_lengths"].to(device) for m in data_lib.MODALITIES},
                    raw["labels"].to(device), raw["index"].to(device), impurity, part)


def load_for_training(config: TrainConfig, *, trusted: bool = False):
    """The dataset a config names: the synthetic one (with ``config.synthetic`` overrides) or a pickle
    (``config.max_len`` applies to a MAG-BERT pickle; ``trusted`` lifts the plain-data unpickling
    restriction)."""
    if config.data == "synthetic":
        opts = {"seed": config.seed, **config.synthetic}
        for k in ("dims", "strength"):
            if k in opts and isinstance(opts[k], list):
                opts[k] = tuple(opts[k])
        try:
            return data_lib.synthetic(**opts)
        except TypeError as e:  # an unknown option
            raise ValueError("synthetic data options: %s" % e) from None
    return data_lib.load_for_max_len(config.data, config.max_len, trusted=trusted)


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
                pool_norm=config.pool_norm, dropout=config.dropout, loc_bias=config.loc_bias, penalty=config.gate_penalty,
                ratio=config.mask_ratio, score_relu=config.mask_score_relu, residual=config.mask_residual)
    if config.mask_score_bias != "pytorch":
        with torch.no_grad():
            for learner in model.masks.values():
                learner.pooler3[2].bias.fill_(config.mask_score_bias)
    return model


def _unwrap(model) -> MIM:
    """The MIM inside a DistributedDataParallel (or other ``.module``) wrapper, or the model itself."""
    return model.module if isinstance(getattr(model, "module", None), MIM) else model


def _no_sync(model):
    """DistributedDataParallel's ``no_sync`` for a wrapped model: the step takes its two gradient sets with
    torch.autograd.grad, which DDP's reducer never sees, and all-reduces them itself."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def _noise(model: MIM, batch, seed: int) -> Dict[str, torch.Tensor]:
    """Gate noise keyed by (seed, modality, global sample index): independent of batch order; what
    ``model(..., seed=seed, index=batch.index)`` draws itself."""
    model = _unwrap(model)
    return {spec.name: gate_noise((seed + i) % 2**62, batch.index, spec.seq_len) for i, spec in enumerate(model.specs)}


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def _global_part(batch, world: World) -> Optional[GlobalPart]:
    if batch.part is None and world.size > 1:
        raise ValueError("a training step on %d processes needs each batch's place in the global batch: build the "
                         "batches with mim_fast.train.batches(..., world=mim_fast.distributed.current())" % world.size)
    return batch.part


def _kgs_share(out, y: torch.Tensor, config: TrainConfig, part: Optional[GlobalPart], world: World) -> KGSLossOutput:
    """The KGS terms of this process's samples, summed and divided by the global batch size; teacher and
    alpha of its samples. Routing by batch means (per_sample=False) on several processes uses the global
    batch's errors: the other processes' predictions enter as constants (assembled by one all_reduce)."""
    yk, yu, h = out.yk.float(), out.yu.float(), out.purified.float()
    opts = dict(per_sample=config.per_sample, kd_scale=config.kd_scale, kd_divide_T=config.kd_divide_T,
                backend=config.backend)
    n = y.shape[0]
    if config.per_sample or world.size == 1:
        size = n if part is None else part.size
        k = kgs_loss(yk, yu, y, h, reduction="sum", **opts)
        return KGSLossOutput(*(t / size for t in k[:5]), k.teacher, k.alpha)
    M, start, size = yk.shape[0], part.start, part.size
    stop = start + n
    glob = distributed.assemble_global(torch.cat([yk, yu, y.float()[None]]), start, size, world)

    def whole(local, everyone):  # this process's live values among the global batch's constants (dim 1: samples)
        return torch.cat([everyone[:, :start], local, everyone[:, stop:]], dim=1)

    zeros = h.new_zeros(M, size, h.shape[2])  # other samples' h: only their own (discarded) inter terms read it
    k = kgs_loss(whole(yk, glob[:M]), whole(yu, glob[M:2 * M]), glob[2 * M], whole(h, zeros), reduction="none",
                 **opts)
    return KGSLossOutput(*(t[start:stop].sum() / size for t in k[:5]), k.teacher[start:stop], k.alpha[:, start:stop])


def _penalty_share(penalty: torch.Tensor, batch, part: Optional[GlobalPart], model: MIM) -> torch.Tensor:
    """Σ_m P_m of the global batch, this process's share: each modality's mean over its valid steps
    weighted by its share of the global batch's valid steps (P_m averages over valid steps)."""
    if part is None:
        return penalty.sum()
    shares = []
    for i, spec in enumerate(model.specs):
        lens = batch.lengths.get(spec.name) if batch.lengths else None
        mine = lens.sum() if lens is not None else torch.tensor(len(batch.labels) * spec.seq_len)
        total = part.steps.get(spec.name, part.size * spec.seq_len)
        shares.append(penalty[i] * (mine.to(penalty) / total) if total else penalty[i] * 0)
    return torch.stack(shares).sum()


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
                   penalty_factor: float = 1.0, *, penalty_weight: Optional[torch.Tensor] = None):
    """Forward pass and every loss of the step: (out, kgs, L_cls, loss_A, loss_B). ``penalty_factor``
    multiplies the penalty weight (:func:`penalty_ramp`). ``penalty_weight``, when given, replaces both
    numbers: the step's ``config.penalty_weight × penalty_factor`` as a 0-d float32 tensor on the device
    (the input of a captured step, :class:`mim_fast.graphs.CapturedStep`; the same float32 arithmetic).

    ``model`` may be wrapped in DistributedDataParallel: its forward then runs under ``no_sync``, since the
    step takes its two gradient sets with torch.autograd.grad and all-reduces them itself
    (:class:`Optimizers`). Gate noise and dropout are keyed by (``noise_seed``, global sample index).

    Each loss is this process's share of the global batch's (``batch.part``; without one the batch is the
    global batch): a sum over its samples divided by the global batch size B — the gate penalty P_m weighted
    by its share of the global batch's valid steps — so that summed over processes the losses, and their
    gradients, are the global batch's means exactly, however the batch was split. KGS routing by batch
    means (``per_sample=False``) uses the whole global batch's errors (one all_reduce of (2M+1, B) floats)."""
    net = _unwrap(model)
    world = distributed.current()
    if world.size > 1 and config.penalty_scale != "none":
        raise ValueError("penalty_scale=%r prices the penalty by batch statistics, which one process does not have "
                         "on %d processes: use penalty_scale='none' with torchrun" % (config.penalty_scale, world.size))
    if world.size > 1 and config.dropout != "keyed":
        raise ValueError("dropout=%r draws from each process's own generator: the processes would train another "
                         "run than one process does; use dropout='keyed' with torchrun" % config.dropout)
    part = _global_part(batch, world)
    inputs, lengths, y = batch.inputs, batch.lengths, batch.labels
    size = len(y) if part is None else part.size
    with named_range("mim/gate_noise"):
        noise = _noise(net, batch, noise_seed)
    with _autocast(config, device), _no_sync(model):
        out = model(inputs, lengths, noise=noise, seed=noise_seed, index=batch.index)
    with named_range("mim/kgs_loss"):
        kgs = _kgs_share(out, y, config, part, world)
    with named_range("mim/task_loss"):
        task = (out.prediction.float() - y).abs().sum() / size
        coef = config.penalty_weight * penalty_factor if penalty_weight is None else penalty_weight
        weight = coef * task.detach() if config.penalty_scale == "task" else coef
        penalty = sample_scaled_penalty(net, out, lengths, config) if config.penalty_scale == "sample" \
            else _penalty_share(out.penalty.float(), batch, part, net)
        loss_a = weight * penalty + kgs.masked
        loss_b = kgs.unmasked + task
        if config.kgs_transfer:
            loss_b = loss_b + kgs.inter + kgs.intra
    return out, kgs, task, loss_a, loss_b


class Optimizers:
    """Adam over the mask learners (phase A) and Adam over everything (phase B), or one joint Adam. On
    several processes (torch.distributed initialized) each step sums both gradient sets over the processes
    (one bucketed all_reduce) before either Adam step, so every process takes the same steps."""

    def __init__(self, model: MIM, config: TrainConfig, device: torch.device, *, capturable: bool = False):
        """``capturable``: Adam's step count on the device and its update capturable in a CUDA graph
        (``torch.optim.Adam(capturable=True)``, CUDA only; :class:`mim_fast.graphs.CapturedStep`)."""
        model = _unwrap(model)
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.upn = model.upn_parameters()
        kw = dict(lr=config.lr, weight_decay=config.weight_decay)
        if capturable:
            if device.type != "cuda":
                raise ValueError("capturable optimizers need a CUDA device (torch.optim.Adam(capturable=True)); "
                                 "got %s" % device)
            kw["capturable"] = True
        if config.adam == "fused":
            # The same update to rounding, in one kernel per parameter instead of ~10 ops: 9.3 -> 2.3 ms per
            # step (both optimizers) at the paper's dims on one CPU thread, 5-7% of the step.
            kw["fused"] = True
        if config.optimizer == "two-phase" and not self.upn:  # no purification networks: phase B alone
            self.opts = [torch.optim.Adam(self.params, **kw)]
        elif config.optimizer == "two-phase":
            self.opts = [torch.optim.Adam(self.upn, **kw), torch.optim.Adam(self.params, **kw)]
        elif config.optimizer == "joint":
            self.opts = [torch.optim.Adam(self.params, **kw)]
        else:
            raise ValueError("optimizer must be 'two-phase' or 'joint'; got %r" % config.optimizer)
        # Only fp16 needs loss scaling; with AMP off the step makes no GradScaler call at all.
        self.scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None

    @property
    def groups(self) -> List[list]:
        """The parameter set of each optimizer: one for "joint" or a model without purification networks
        (phase B alone), else (mask learners, everything)."""
        return [self.params] if self.config.optimizer == "joint" or not self.upn else [self.upn, self.params]

    def gradients(self, loss_a: Optional[torch.Tensor], loss_b: Optional[torch.Tensor]) -> List[tuple]:
        """This process's gradient sets (None where a loss does not reach a parameter; all None when the
        process had no samples: ``loss_a`` None)."""
        groups = self.groups
        if loss_a is None:
            return [(None,) * len(g) for g in groups]
        if self.config.optimizer == "joint":
            losses = [loss_a + loss_b]
        else:
            losses = [loss_a, loss_b] if self.upn else [loss_b]
        if self.scaler is not None:
            losses = [self.scaler.scale(v) for v in losses]
        # Both gradient sets from the same graph before either step: the released code's in-place order
        # (step A, then backward B through the updated weights) fails on PyTorch >= 1.5.
        return [torch.autograd.grad(v, g, retain_graph=k + 1 < len(groups), allow_unused=True)
                for k, (v, g) in enumerate(zip(losses, groups))]

    def step(self, loss_a: Optional[torch.Tensor], loss_b: Optional[torch.Tensor]) -> None:
        world = distributed.current()
        with named_range("mim/backward"):
            grads = self.gradients(loss_a, loss_b)
        if world.size > 1:
            with named_range("mim/all_reduce"):
                grads = distributed.all_reduce_gradients(grads, self.groups, world)
        with named_range("mim/optimizer"):
            for opt, params, gs in zip(self.opts, self.groups, grads):
                for p, g in zip(params, gs):
                    p.grad = None if g is None else g.detach()
                if self.scaler is not None:
                    self.scaler.step(opt)
                else:
                    opt.step()
                for p in params:
                    p.grad = None
            if self.scaler is not None:
                self.scaler.update()

    def state_dict(self):
        return {"opts": [o.state_dict() for o in self.opts],
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state):
        for o, s in zip(self.opts, state["opts"]):
            own = [{k: g.get(k) for k in ("capturable", "fused")} for g in o.param_groups]
            o.load_state_dict(s)
            # torch restores the checkpoint's flags with its param_groups: a run resumed with --cuda-graphs from
            # a checkpoint without them would refuse to capture, and a --cuda-graphs checkpoint resumed without
            # would keep a capturable Adam (failing its first step on a CPU). The flags are this run's, and so
            # is where Adam keeps its step count: on the parameter's device when capturable or fused, else on
            # the CPU (as torch.optim.Adam makes it).
            for group, flags in zip(o.param_groups, own):
                group.update(flags)
                on_device = bool(group.get("capturable") or group.get("fused"))
                for p in group["params"]:
                    st = o.state.get(p, {})
                    if torch.is_tensor(st.get("step")):
                        st["step"] = st["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


def compile_model(model: MIM) -> MIM:
    """``torch.compile`` (fullgraph, in place) the part of MIM's forward that compiles whole and does most
    of its arithmetic: every encoder with Transformer layers (Conv1d, the layers with their counter-based
    dropout, the unpurified pooling; a Conv1d-only encoder has nothing to fuse). ``nn.Module.compile``
    keeps parameter names, so checkpoints do not change. Each compiled encoder makes a graph for training
    and one for evaluation, and one more (with a dynamic batch size) when the batch size first changes.

    Not compiled, each for a reason: the BiLSTM mask learners (dynamo unrolls an LSTM over time: a
    graph of T cells, and compiling the whole forward that way took 287 s here and ran slower); the gate
    and KGS ops (fused custom ops already); the loss sums and the two-phase update (the two
    torch.autograd.grad calls end any graph; the compiled encoders' backward runs inside them). Measured on
    the 2-core CPU (README, "Multi-process training"): no faster than eager, so ``--compile`` is off by
    default. Returns ``model``."""
    for encoder in _unwrap(model).encoders.values():
        if getattr(encoder, "layers", 0):
            encoder.compile(fullgraph=True)
    return model


LOGGED = ("task", "masked", "unmasked", "intra", "inter", "penalty")


def train_step(model: MIM, opt: Optimizers, batch, config: TrainConfig, noise_seed: int, device: torch.device,
               penalty_factor: float = 1.0, *, penalty_weight: Optional[torch.Tensor] = None):
    """One MIM update; returns this process's shares of the step's losses (:data:`LOGGED`) as detached 0-d
    float32 tensors on ``device`` — no host sync; summed over processes they are the global batch's.
    ``penalty_factor`` multiplies the penalty weight (:func:`penalty_ramp`); ``penalty_weight`` as in
    :func:`compute_losses`.

    A process whose part of the global batch is empty (the last batch of an epoch can be smaller than the
    number of processes) runs no forward pass but takes part in the step's collectives with nothing, and
    takes the same Adam steps as the others."""
    if len(batch.labels):
        out, kgs, task, loss_a, loss_b = compute_losses(model, batch, config, noise_seed, device, penalty_factor,
                                                        penalty_weight=penalty_weight)
        opt.step(loss_a, loss_b)
        penalty = _penalty_share(out.penalty.float(), batch, batch.part, _unwrap(model))
        logged = (task, kgs.masked, kgs.unmasked, kgs.intra, kgs.inter, penalty)
        return {k: v.detach().float() for k, v in zip(LOGGED, logged)}
    world = distributed.current()
    part = _global_part(batch, world)
    if not config.per_sample and world.size > 1:  # the all_reduce of _kgs_share, with no samples
        distributed.assemble_global(torch.zeros(2 * len(_unwrap(model).specs) + 1, 0, device=device), 0, part.size,
                                    world)
    opt.step(None, None)
    return {k: torch.zeros((), device=device) for k in LOGGED}


class TrainingDiverged(ValueError):
    """The model's predictions became NaN/inf."""


@torch.no_grad()
def evaluate(model: MIM, split, config: TrainConfig, device: torch.device, seed: int,
             epoch: Optional[int] = None) -> dict:
    """Predictions of a split (eval mode) → :func:`mim_fast.metrics.regression_metrics` (both conventions,
    by name), the L1 loss (``l1``, the per-sample mean: the model-selection criterion), and, where the
    split has ground-truth impurity masks, the purification quality of the gates (``purification``).
    Raises :class:`TrainingDiverged` when a prediction is NaN/inf. (Runs in this process alone: in
    multi-process training, rank 0.)"""
    model = _unwrap(model)
    model.eval()
    preds, labels, gates, masks, lens = [], [], {n: [] for n in model.names}, {n: [] for n in model.names}, \
        {n: [] for n in model.names}
    for batch in batches(split, config.batch_size, shuffle=False, device=device):
        with _autocast(config, device):
            out = model(batch.inputs, batch.lengths, noise=_noise(model, batch, seed), seed=seed, index=batch.index)
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
    if not np.isfinite(p).all():
        raise TrainingDiverged("%straining diverged: %d of %d %s predictions are NaN/inf (a lower --lr may help)"
                               % ("epoch %d: " % epoch if epoch else "", int((~np.isfinite(p)).sum()), p.size,
                                  split.name))
    res = metrics_lib.regression_metrics(p, y)
    res["l1"] = float(np.abs(p - y).mean())
    if any(gates[n] for n in model.names):
        res["purification"] = metrics_lib.purification_metrics(
            {n: torch.cat(gates[n]) for n in model.names}, {n: torch.cat(masks[n]) for n in model.names},
            {n: torch.cat(lens[n]) for n in model.names})
    return res


_BAR_EVERY_S = 0.5
_bar_drawn = [0.0]  # when the bar was last drawn


def _progress(epoch: int, epochs: int, i: int, n: int, t0: float, loss, enabled: bool) -> None:
    """The progress bar on a terminal, redrawn at most every 0.5 s and at an epoch's last step; ``loss`` a
    callable giving the running train L1 (read only when the bar is drawn: on a GPU it is a device sync,
    which every step would pay, a captured one too), or None (several processes: rank 0 holds only its
    share)."""
    if not enabled or not sys.stderr.isatty():  # a bar redrawn with \r only makes sense on a terminal
        return
    now = time.time()
    if i != n and now - _bar_drawn[0] < _BAR_EVERY_S:
        return
    _bar_drawn[0] = now
    width = 24
    done = int(width * i / max(n, 1))
    sys.stderr.write("\r  epoch %3d/%d [%s%s] %4d/%d %s %.1fs" % (
        epoch, epochs, "#" * done, "." * (width - done), i, n,
        " L1 %.4f " % loss() if loss is not None else "", time.time() - t0))
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


class RunFolderExists(RunFolderError):
    """The run folder already holds a run and neither --overwrite nor --resume was given."""


class Interrupted(Exception):
    """Training was interrupted (Ctrl-C); ``epoch`` is the last epoch whose checkpoint is on disk."""

    def __init__(self, out: str, epoch: int, resumed: bool):
        self.out, self.epoch = out, epoch
        if epoch:
            msg = "interrupted after epoch %d; rerun with --resume to continue (mim-fast train --resume --out %s)" % (
                epoch, out)
        elif resumed:
            msg = "interrupted before any epoch finished; the run is unchanged, rerun with --resume"
        else:
            msg = ("interrupted before the first epoch finished: no checkpoint to resume from; rerun with "
                   "--overwrite to start again")
        super().__init__(msg)


# What --resume may change: where and how fast the run computes, and how long it goes on. Everything else
# shapes the trajectory, so it stays as saved.
RESUME_CHANGEABLE = ("epochs", "device", "backend", "world_size")


def _preview(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (", ... (%d in all)" % len(names) if len(names) > 4 else "")


def _check_writable_path(out: str) -> None:
    """Refuse an --out that cannot become a folder (it, or a folder above it, is a file) — before anything
    is loaded or written. Permission and space problems surface as OSError at the first write."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        raise RunFolderError("--out %s: %s is a file, not a folder" % (out, path))


def _check_new_run_folder(out: str, overwrite: bool) -> None:
    """A new run may go into a missing or empty folder, or (with --overwrite) replace a run folder's run.
    Reads only; the old run's files are deleted by :func:`_create_run_folder`, after every input is
    checked."""
    if not out:
        raise RunFolderError("--out must name a folder")
    _check_writable_path(out)
    names = runs.run_files(out) if os.path.isdir(out) else []
    others = [n for n in (sorted(os.listdir(out)) if os.path.isdir(out) else []) if n not in names]
    if not names and not others:
        return
    if not runs.is_run_folder(out):
        raise RunFolderError("--out %s holds files that are not a mim-fast run (%s); refusing to write into it: "
                             "choose a new or empty folder" % (out, _preview(others or names)))
    if overwrite:
        return
    done = runs.checkpoints(out)
    if done:
        raise RunFolderExists("run folder %s already holds a run (checkpoint of epoch %d): pass --resume to "
                              "continue it or --overwrite to replace it" % (out, done[0][0]))
    raise RunFolderExists("run folder %s already holds a run that has no checkpoint (it stopped before its "
                          "first epoch ended): pass --overwrite to replace it" % out)


def _create_run_folder(out: str, overwrite: bool) -> None:
    """The first write of a new run: the folder, or (--overwrite) a run folder emptied of the old run's
    files. Other files in it are left alone."""
    if overwrite and os.path.isdir(out):
        runs.remove_run_files(out)
    os.makedirs(out, exist_ok=True)


def _resume_point(out: str, changes: dict, warn) -> tuple:
    """(config, checkpoint payload, path) of the run in ``out``, from its newest intact checkpoint, with
    ``changes`` applied where --resume allows them."""
    if not out:
        raise RunFolderError("--out must name a folder")
    if not os.path.isdir(out):
        raise RunFolderError("--resume: %s is not a folder" % out)
    if not runs.is_run_folder(out):
        raise RunFolderError("--resume: %s is not a mim-fast run folder" % out)
    ck, path, problems = runs.latest_intact_checkpoint(out)
    if ck is None:
        if problems:
            raise RunFolderError("--resume: no intact checkpoint in %s (%s)" % (out, "; ".join(problems)))
        legacy = os.path.exists(os.path.join(out, "checkpoint.pt"))
        raise RunFolderError("--resume: %s has no checkpoint (%s): pass --overwrite to start the run again" % (
            out, "its checkpoint.pt is of a pre-release format that is not loaded because it could run code"
            if legacy else "the run stopped before its first epoch ended"))
    if problems:
        warn("%s; resuming from %s instead" % ("; ".join(problems), os.path.basename(path)))
    saved = json.loads(ck["config"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ValueError("unknown TrainConfig fields: %s" % ", ".join(unknown))
    refused = ["%s %s (the run has %s)" % (_flag(k), _show(v), _show(saved.get(k))) for k, v in changes.items()
               if k not in RESUME_CHANGEABLE and k != "out" and v != saved.get(k)]
    if refused:
        raise RunFolderError("--resume continues a run with its saved settings; it cannot change %s: start a "
                             "new run in another --out for that" % "; ".join(refused))
    saved.update({k: v for k, v in changes.items() if k in RESUME_CHANGEABLE})
    saved["out"] = out  # a moved or copied run resumes where it is now
    dropped = sorted(set(saved) - fields)
    if dropped:
        raise RunFolderError("--resume: %s was written by another version of mim_fast (unknown settings %s)"
                             % (os.path.basename(path), ", ".join(dropped)))
    saved.setdefault("adam", "default")  # written before the option: its optimizers were torch's default Adam
    missing = sorted(k for k in PRESETS["mim"] if k not in saved)
    if missing:  # a preset would fill them, possibly with values the run never had
        raise RunFolderError("--resume: %s was written by another version of mim_fast (no setting %s)"
                             % (os.path.basename(path), _preview(missing)))
    config = TrainConfig(**saved)
    done = int(ck["epoch"])
    if config.epochs < done:
        raise ValueError("--epochs %d: the run in %s has already trained %d epochs" % (config.epochs, out, done))
    return config, ck, path


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _warn(message: str) -> None:
    print("warning: %s" % message, file=sys.stderr, flush=True)


def environment(device: torch.device, backends: Dict[str, str]) -> dict:
    """What a run's numbers depend on beyond its config: versions, source commit, threads, device, the
    backends the ops resolved to (recorded in metrics.json per session)."""
    from . import __version__

    return {"mim_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "commit": runs.git_commit(), "threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else runs.cpu_name(),
            "backends": dict(backends), "host": platform.node(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _checkpoint_payload(model, opt, state, config, epoch) -> dict:
    return {"kind": "resume", "epoch": epoch, "model": model.state_dict(), "optim": opt.state_dict(),
            "state": json.dumps(state, default=float), "config": json.dumps(dataclasses.asdict(config))}


def run(config: TrainConfig, *, overwrite: bool = False, progress: bool = True, keep_checkpoints: int = 3,
        threads: Optional[int] = None, trust_data: bool = False, stop_after_steps: Optional[int] = None,
        compile: bool = False, cuda_graphs: bool = False, log=print, warn=_warn) -> dict:
    """Train and evaluate a new run in ``config.out``; returns (and writes to <out>/metrics.json) the
    history, the best epoch and its test metrics, a trivial baseline and the environment.

    Every input — the config, the device and backend, the data, the model it builds, the run folder — is
    checked before the first write: a mistake raises ValueError (RunFolderError for the folder) with nothing
    written. ``--out`` must be missing, empty, or (``overwrite``) a run folder, of which only the files a
    run writes are deleted (see :mod:`mim_fast.runs`). After each epoch a checkpoint is written (the last
    ``keep_checkpoints`` are kept) and metrics.json is updated. ``threads``: torch's intra-op threads
    (None: as set). ``trust_data``: unpickle data files without the plain-data restriction.
    ``stop_after_steps`` stops the run after that many training steps in total (without a checkpoint for
    the unfinished epoch), as a crash would — for tests. ``compile``: torch.compile the model's forward
    (see :func:`compile_model`). ``cuda_graphs``: replay each training step as a CUDA graph captured once per
    epoch (:class:`mim_fast.graphs.CapturedStep`; CUDA, one process). Ctrl-C raises :class:`Interrupted`.

    Under torchrun (WORLD_SIZE > 1) every process calls this: they join one process group and train one
    model, each on its part of every global batch of ``config.batch_size`` (see :mod:`mim_fast.distributed`);
    only rank 0 evaluates, writes the run folder and logs; every process returns rank 0's result.
    ``config.world_size`` is set to the number of processes."""
    _check_run_options(keep_checkpoints, threads)

    def prepare(world, log, warn):
        _check_new_run_folder(config.out, overwrite)
        return dataclasses.replace(config, world_size=world.size), None

    return _train(prepare, overwrite=overwrite, progress=progress, keep=keep_checkpoints, threads=threads,
                  trust_data=trust_data, stop_after_steps=stop_after_steps, compile=compile, cuda_graphs=cuda_graphs,
                  log=log, warn=warn)


def resume(out: str, changes: Optional[dict] = None, *, progress: bool = True, keep_checkpoints: int = 3,
           threads: Optional[int] = None, trust_data: bool = False, stop_after_steps: Optional[int] = None,
           compile: bool = False, cuda_graphs: bool = False, log=print, warn=_warn) -> dict:
    """Continue the run in the folder ``out`` (wherever it was first written) from its newest intact
    checkpoint; an unreadable or damaged newer one is skipped with a warning. ``changes`` (TrainConfig
    fields) may set ``epochs`` (to extend the run), ``device`` and ``backend``; any other field that differs
    from the run's is refused (RunFolderError), as it would change the trajectory. The number of processes
    may change too (``world_size`` is set to it): the trajectory does not depend on it, up to float32
    rounding. Resuming with the same device, backend, threads and number of processes reproduces the
    uninterrupted run exactly. Other arguments as in :func:`run`."""
    _check_run_options(keep_checkpoints, threads)
    changes = dict(changes or {})

    def prepare(world, log, warn):
        config, ck, path = _resume_point(out, {**changes, "world_size": world.size}, warn)
        ck["_path"] = os.path.basename(path)
        log("resuming %s from %s: %d of %d epochs done%s" % (
            out, os.path.basename(path), ck["epoch"], config.epochs,
            "; training epochs %d-%d" % (ck["epoch"] + 1, config.epochs) if config.epochs > ck["epoch"] else
            "; nothing left to train"))
        return config, ck

    return _train(prepare, overwrite=False, progress=progress, keep=keep_checkpoints, threads=threads,
                  trust_data=trust_data, stop_after_steps=stop_after_steps, compile=compile, cuda_graphs=cuda_graphs,
                  log=log, warn=warn)


def _check_run_options(keep_checkpoints, threads) -> None:
    if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
        raise ValueError("--keep-checkpoints must be an integer >= 1; got %r" % (keep_checkpoints,))
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError("--threads must be an integer >= 1; got %r" % (threads,))


def _quiet(*args, **kwargs) -> None:
    pass


def _process_device(config: TrainConfig, world: World) -> torch.device:
    """The device of this process: the config's; on several processes, a GPU is the one of torchrun's
    LOCAL_RANK (one process per GPU)."""
    device = resolve_device(config.device)
    if device.type == "cuda" and world.size > 1:
        if device.index is not None:
            raise ValueError("--device %s: under torchrun each process uses the GPU of its LOCAL_RANK; pass "
                             "--device cuda (or auto)" % config.device)
        device = torch.device("cuda", distributed.local_rank())
        resolve_device(str(device))  # that GPU must exist here
        torch.cuda.set_device(device)
    return device


def _torch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of torch's default generator in an epoch: it drives only what mim_fast does not key by sample
    (a BERT text encoder's own dropout), and differs between processes so that they do not draw alike."""
    return _epoch_seed(seed, epoch, 0) if rank == 0 else int(
        np.random.SeedSequence([seed, epoch, 0, rank]).generate_state(1, dtype=np.uint64)[0] >> 2)


def _train(prepare, *, overwrite, progress, keep, threads, trust_data, stop_after_steps, compile, cuda_graphs, log,
           warn) -> dict:
    with distributed.session() as world:
        if not world.main:
            log = warn = _quiet
            progress = False
        error, model = None, None
        try:  # every process checks every input; nothing is written before all of them agree
            if threads is not None:
                torch.set_num_threads(threads)
            config, ck = prepare(world, log, warn)
            device = _process_device(config, world)
            backends = resolve_backends(config.backend, device)
            if cuda_graphs:
                from . import graphs

                reason = graphs.unsupported(config, device, world_size=world.size, compile=compile)
                if reason:
                    raise ValueError(reason)
            _seed_everything(config.seed)
            dataset = load_for_training(config, trusted=trust_data)
            model = build_model(dataset, config).to(device)
            opt = Optimizers(model, config, device, capturable=cuda_graphs and device.type == "cuda")
            state = {"epoch": 0, "history": [], "best": None, "sessions": []}
            if ck is not None:
                try:
                    model.load_state_dict(ck["model"])
                    opt.load_state_dict(ck["optim"])
                except (RuntimeError, KeyError, ValueError, TypeError) as e:
                    raise runs.CheckpointError("%s does not fit the model its config builds (%s)" % (
                        ck.get("_path", "the checkpoint"), str(e).splitlines()[0])) from None
                state = json.loads(ck["state"])
                state.setdefault("sessions", [])
        except Exception as e:  # noqa: BLE001 — re-raised by agree() on every process
            error = e
        distributed.agree(error, world)
        distributed.check_replicas(model, world, "after setup")
        result = _epochs(model, opt, dataset, config, ck, state, device, backends, world, overwrite=overwrite,
                         progress=progress, keep=keep, stop_after_steps=stop_after_steps, compile=compile,
                         cuda_graphs=cuda_graphs, log=log)
        return distributed.broadcast_result(result, world)


def _epochs(model, opt, dataset, config, ck, state, device, backends, world, *, overwrite, progress, keep,
            stop_after_steps, compile, cuda_graphs, log) -> dict:
    out = config.out
    resumed = ck is not None
    baseline = metrics_lib.regression_metrics(
        np.full(len(dataset.test), float(dataset.train.labels.mean())), dataset.test.labels.numpy())
    has_impurity = bool(dataset.test.impurity)
    if compile:
        compile_model(model)
    captured = None
    if cuda_graphs:
        from .graphs import CapturedStep

        captured = CapturedStep(model, opt, config, device)

    def result(finished: bool) -> dict:
        return {"config": dataclasses.asdict(config), "baseline": baseline, "history": state["history"],
                "best": state["best"], "epochs_done": state["epoch"], "finished": finished,
                "environment": state["sessions"][-1], "sessions": state["sessions"]}

    def main_only(action) -> None:
        """Run ``action`` on rank 0 (evaluation, writes); every process learns whether it failed."""
        error = None
        if world.main:
            try:
                action()
            except Exception as e:  # noqa: BLE001 — re-raised by broadcast_outcome
                error = e
        distributed.broadcast_outcome(error, world)

    def start() -> None:
        if not resumed:
            _create_run_folder(out, overwrite)  # the first write: every input is checked by now
        state["sessions"].append(dict(environment(device, backends), first_epoch=state["epoch"] + 1,
                                      world_size=world.size, compile=compile, cuda_graphs=cuda_graphs))
        runs.write_json(os.path.join(out, "config.json"), dataclasses.asdict(config))
        if not resumed:
            log("data: %s — train/dev/test = %d/%d/%d; %s" % (
                dataset.name or config.data, len(dataset.train), len(dataset.dev), len(dataset.test),
                ", ".join("%s %s×%d" % (m, "ids" if m == "text" and dataset.text_is_tokens else dataset.dims[m],
                                        dataset.seq_len[m]) for m in data_lib.MODALITIES)))
            log("model: %d parameters (%d in the mask learners), device %s, backends %s, %d thread%s%s" % (
                sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.upn_parameters()),
                device, ", ".join("%s %s" % kv for kv in backends.items()), torch.get_num_threads(),
                "" if torch.get_num_threads() == 1 else "s",
                ", %d processes (global batch %d)" % (world.size, config.batch_size) if world.size > 1 else ""))
            log("preset %s%s" % (config.preset, "; overrides: " + ", ".join(
                "%s=%s" % kv for kv in config.overrides().items()) if config.overrides() else " (no overrides)"))
            log("trivial baseline (predict the train mean): test MAE(all) %.4f, Acc-2(non0) %.4f, Acc-7 %.4f" % (
                baseline["mae_all"], baseline["acc2_non0"], baseline["acc7"]))
        log(_header(has_impurity))

    try:
        main_only(start)
        steps = 0
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            torch.manual_seed(_torch_seed(config.seed, epoch, world.rank))
            noise_seed = _epoch_seed(config.seed, epoch, 1)  # gate noise and dropout, keyed by sample
            t0 = time.time()
            model.train()
            sums, n = torch.zeros(len(LOGGED), dtype=torch.float64, device=device), 0
            epoch_batches = list(batches(dataset.train, config.batch_size, shuffle=True, device=device,
                                         seed=_epoch_seed(config.seed, epoch, 2), world=world,
                                         drop_last=config.drop_last))
            for i, batch in enumerate(epoch_batches, 1):
                ramp = penalty_ramp(config, epoch, i - 1, len(epoch_batches))
                losses = (captured(batch, noise_seed, ramp) if captured is not None else
                          train_step(model, opt, batch, config, noise_seed, device, ramp))
                sums += torch.stack([losses[k] for k in LOGGED]).double()
                n += 1
                steps += 1
                _progress(epoch, config.epochs, i, len(epoch_batches), t0,
                          (lambda: float(sums[0]) / n) if world.size == 1 else None, progress)
                if stop_after_steps is not None and steps >= stop_after_steps:
                    return {"interrupted_at_epoch": epoch, "steps": steps}
            sums = distributed.all_reduce_sum(sums, world)  # the global batches' losses
            train = {k: v / n for k, v in zip(LOGGED, sums.tolist())}
            distributed.check_replicas(model, world, "after epoch %d" % epoch)

            def finish_epoch(epoch=epoch, train=train, t0=t0) -> None:
                eval_seed = _epoch_seed(config.seed, 0, 3)  # the same for every epoch: comparable dev scores
                dev = evaluate(model, dataset.dev, config, device, eval_seed, epoch=epoch)
                test = evaluate(model, dataset.test, config, device, eval_seed, epoch=epoch)
                row = {"epoch": epoch, "train": train, "dev": dev, "test": test, "seconds": time.time() - t0}
                state["history"].append(row)
                if state["best"] is None or dev["l1"] < state["best"]["dev"]["l1"]:
                    state["best"] = row
                    runs.save_checkpoint(os.path.join(out, "best.pt"), {
                        "kind": "best", "epoch": epoch, "model": model.state_dict(),
                        "config": json.dumps(dataclasses.asdict(config)),
                        "metrics": json.dumps(row, default=float)})
                state["epoch"] = epoch
                runs.save_checkpoint(os.path.join(out, runs.checkpoint_name(epoch)),
                                     _checkpoint_payload(model, opt, state, config, epoch))
                runs.prune_checkpoints(out, keep)
                runs.write_json(os.path.join(out, "metrics.json"), result(finished=False))
                log(_row(row, best=state["best"]["epoch"] == epoch))

            main_only(finish_epoch)
            state["epoch"] = epoch
    except KeyboardInterrupt:
        done = runs.checkpoints(out)
        raise Interrupted(out, done[0][0] if done else 0, resumed) from None
    final = result(finished=True) if world.main else {}

    def finish() -> None:
        runs.write_json(os.path.join(out, "metrics.json"), final)
        _plots(final, out, log)
        best = state["best"]
        if best is not None:
            log("best epoch %d (lowest dev L1 %.4f), test metrics:" % (best["epoch"], best["dev"]["l1"]))
            log(metrics_table(best["test"]))
        log("wrote %s" % out)

    main_only(finish)
    return final


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
    """curves.png (errors and test metrics per epoch) and, with ground-truth impurity, gates.png (fraction
    of test steps whose gate is closed, impure vs clean, per modality — the table's terms); the best
    epoch (lowest dev L1) is marked in every panel. Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log("(matplotlib not installed: no plots)")
        return
    hist = result["history"]
    if not hist:
        return
    ep = [h["epoch"] for h in hist]
    best = result["best"]["epoch"] if result["best"] else None

    def mark_best(ax):
        if best is not None:
            ax.axvline(best, color="0.35", ls=":", lw=1.2, label="best epoch %d (lowest dev L1)" % best)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    def save(fig, name):
        fig.tight_layout()
        runs.atomic_write(os.path.join(out, name), lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(ep, [h["train"]["task"] for h in hist], marker=".", label="train L1 (task loss)")
    ax[0].plot(ep, [h["dev"]["l1"] for h in hist], marker=".", label="dev L1 (selects the best epoch)")
    ax[0].plot(ep, [h["test"]["mae_all"] for h in hist], marker=".", label="test MAE (all samples)")
    ax[0].axhline(result["baseline"]["mae_all"], color="gray", ls="--", label="test MAE of the train mean")
    mark_best(ax[0])
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("mean |prediction − label| (sentiment units)")
    ax[0].set_title("errors (lower is better)")
    ax[0].set_ylim(bottom=0)
    ax[0].grid(True, alpha=0.3)
    ax[0].legend(fontsize=8, loc="upper right")
    for key, label in (("acc2_non0", "Acc-2 (sign, non-0 labels, MAG-BERT)"), ("f1_non0", "weighted F1 (non-0)"),
                       ("acc7", "Acc-7 (7 classes)"), ("corr_all", "Pearson correlation (all samples)")):
        ax[1].plot(ep, [h["test"][key] for h in hist], marker=".", label=label)
    mark_best(ax[1])
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("score (higher is better)")
    ax[1].set_title("test split metrics")
    ax[1].set_ylim(min(0.0, min(h["test"]["corr_all"] for h in hist)) - 0.02, 1.02)
    ax[1].grid(True, alpha=0.3)
    ax[1].legend(fontsize=8, loc="lower right")
    save(fig, "curves.png")

    if "purification" in hist[-1]["test"]:
        names = list(hist[-1]["test"]["purification"])
        fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.9), sharey=True, squeeze=False)
        for a, n in zip(axes[0], names):
            a.plot(ep, [h["test"]["purification"][n]["closed_impure"] for h in hist], marker=".",
                   color="tab:red", label="impure steps closed")
            a.plot(ep, [h["test"]["purification"][n]["closed_clean"] for h in hist], marker=".",
                   color="tab:blue", label="clean steps closed")
            mark_best(a)
            a.set_title(n)
            a.set_xlabel("epoch")
            a.set_ylim(-0.02, 1.02)
            a.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("fraction of steps with the gate closed")
        gates = "expected (deterministic)" if result["config"]["eval_gate"] == "expected" else "sampled"
        fig.suptitle("Test split: fraction of impure and clean steps whose %s gate is closed" % gates, fontsize=10)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        runs.atomic_write(os.path.join(out, "gates.png"), lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
