"""Training and evaluation of the MIM model (SPEC §3–4): ``mim_fast.train.run(config)``, the CLI's
``mim-fast train``.

The step is MIM's, repaired: one forward pass, two gradient sets from the same graph
(torch.autograd.grad), then two Adam steps —

    g_A = ∇_{θ_UPN}(penalty_weight·Σ_m P_m + masked)         → Adam over the mask learners
    g_B = ∇_{θ_all}(unmasked + inter + intra + L_cls)          → Adam over all parameters

(``optimizer="joint"``: one Adam over all parameters on the sum). Evaluation uses the expected
(deterministic) gates unless ``eval_gate="sample"`` (the published behaviour). Model selection: the epoch
with the lowest dev L1, as published. Every epoch's randomness (shuffling, dropout, gate noise) is a
function of (seed, epoch) alone, and the gate noise of a sample is keyed by its global index, so a run
resumed from an epoch checkpoint — even after an interruption mid-epoch — reproduces the uninterrupted
run exactly.
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, NamedTuple, Optional

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
# and carry a marker, see DEMO DEVIATIONS in TrainConfig's docstring.
DEMO_SYNTHETIC = {"marker": 3.0, "contiguous": True}
# The demo's values of the two settings it changes (TrainConfig's DEMO DEVIATIONS), and MIM's, used on
# real data: a config leaving them at None gets the set that matches its data.
DEMO_DEFAULTS = {"penalty_weight": 1.0, "mask_ratio": 1}
MIM_DEFAULTS = {"penalty_weight": 0.1, "mask_ratio": 5}


@dataclass
class TrainConfig:
    """Everything a run depends on (saved as config.json in the run folder).

    DEMO DEVIATIONS from MIM. The defaults are MIM's except where its settings demonstrably keep the
    purification network (UPN) from learning on the demo's scale (~750 steps on the synthetic data);
    each was measured (README, "What the demo shows"). ``penalty_weight`` and ``mask_ratio`` left at None
    are resolved from ``data`` when the config is made: the demo's values on "synthetic", MIM's (0.1 and
    5) on a dataset pickle, so real-data runs train as published unless asked otherwise.

    * ``penalty_weight = 1.0`` on the demo (MIM: 0.1). Both gradient sets push every gate open: closing any step shrinks
      the pooled k_m = (1/T)·Σ_t φ(x_t·z_t), so ∂masked/∂c and ∂(task + KGS)/∂c are negative on average
      over all steps, impure ones included. At 0.1 the penalty's gradient per logit is ~10× smaller than
      that common push, the logits drift up (demo data, penalty 0.1: text's a from 3 to ≈5 in 150 steps),
      the gates saturate open and no step closes. At 1.0 it outweighs the push on impure steps, where the
      task gradient is weak or says "close", but not on clean ones (2.0 closes clean steps too).
    * ``mask_ratio = 1`` on the demo (MIM: 5). The mask learner maps per-step scores to logits with an MLP across
      time, T → T/ratio → T. At the demo's T = 20 a ratio of 5 leaves 4 units, too few to close a
      stretch at an arbitrary position (a supervised probe on the true masks reaches 98% step accuracy in
      200 steps with ratio 1, ~90% in 300 with ratio 5).
    * ``mask_score_bias = 0.1`` (MIM: PyTorch's default init). The score unit ends in a ReLU; with the
      default init its pre-activation is negative for every input in some modalities (text at seed 0), so
      every score is 0, no gradient ever reaches the LSTM or the score MLP, and the logits cannot depend
      on the step. A small positive bias starts the unit alive. ``None`` restores the published init.
    * the synthetic data (``DEMO_SYNTHETIC``): impure steps are one contiguous stretch per sample (the
      generator's docstring's "off-topic stretch, like a quote or background speech") that carries a
      marker (its own signature, as background speech or a sensor fault has its own spectrum), instead of
      scattered, step-for-step indistinguishable steps. The encoders mix neighbouring steps (Conv1d k=3,
      and attention for audio/vision), so a scattered impure step is mostly clean context after encoding
      and closing it removes signal; without a marker nothing local tells it apart.
    ``loc_bias`` stays MIM's 3 (gates start open): with 1 the gates swung between mostly closed and open
    and the test error became unstable. ``epochs = 30`` (12 before): the separation grows slowly.
    """

    data: str = "synthetic"          # "synthetic" or the path of a MAG-BERT / MMSA pickle
    out: str = "runs/mim"            # the run folder
    seed: int = 0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    d_model: int = 40
    heads: int = 5
    fusion: str = "multiplication"
    activation: str = "tanh"
    per_sample: bool = True          # KGS routing per sample (paper) or by batch means (released code)
    kd_scale: float = 10.0
    kd_divide_T: bool = False
    penalty_weight: Optional[float] = None  # weight of Σ_m P_m in phase A; None: 1.0 on the synthetic demo,
                                     # MIM's 0.1 on a pickle (see DEMO DEVIATIONS)
    loc_bias: float = 3.0            # the gate's a = g + loc_bias (MIM: 3, i.e. gates start open)
    gate_penalty: str = "mim"        # "mim" (P(c > 0), published) or "threshold" (P(c > τ))
    mask_ratio: Optional[int] = None  # the mask learner's time bottleneck T → T/ratio → T; None: 1 on the
                                     # synthetic demo, MIM's 5 on a pickle (see DEMO DEVIATIONS)
    mask_score_bias: Optional[float] = 0.1  # initial bias of the score unit (pooler3[2]); None = PyTorch's
                                     # default init (MIM; its ReLU can start dead, see below)
    optimizer: str = "two-phase"     # or "joint"
    eval_gate: str = "expected"      # or "sample" (the published evaluation)
    amp: str = "none"                # "none", "bf16" or "fp16"
    device: str = "auto"
    backend: str = "auto"
    text_layers: int = 0             # Transformer layers after the text Conv1d (MIM: 0)
    av_layers: int = 1               # ... after the audio/vision Conv1d (MIM: 3; the demo uses 1 for speed)
    synthetic: Dict[str, float] = field(default_factory=lambda: dict(DEMO_SYNTHETIC))  # mim_fast.data.synthetic()
                                     # options (replaces DEMO_SYNTHETIC as a whole when given)
    max_len: int = 50                # MAG-BERT pickles: pad/truncate to this many words
    bert_path: Optional[str] = None  # a local Hugging Face BERT for token-id text (else a learned embedding)

    def __post_init__(self):
        demo = self.data == "synthetic"
        defaults = DEMO_DEFAULTS if demo else MIM_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not (isinstance(self.mask_ratio, int) and self.mask_ratio >= 1):
            raise ValueError("mask_ratio must be an integer >= 1, got %r" % (self.mask_ratio,))
        if not self.penalty_weight >= 0:
            raise ValueError("penalty_weight must be >= 0, got %r" % (self.penalty_weight,))


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


def batches(split, batch_size: int, *, shuffle: bool, device: torch.device, seed: int = 0) -> Iterator[Batch]:
    """Batches of a :class:`~mim_fast.data.MultimodalSplit`, shuffled by a generator seeded with ``seed``."""
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
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
                heads=config.heads, backend=config.backend, eval_mode=config.eval_gate, loc_bias=config.loc_bias,
                penalty=config.gate_penalty, ratio=config.mask_ratio)
    if config.mask_score_bias is not None:
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


def compute_losses(model: MIM, batch, config: TrainConfig, noise_seed: int, device: torch.device):
    """Forward pass and every loss of the step: (out, kgs, L_cls, loss_A, loss_B)."""
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
        loss_a = config.penalty_weight * out.penalty.float().sum() + kgs.masked
        loss_b = kgs.unmasked + kgs.inter + kgs.intra + task
    return out, kgs, task, loss_a, loss_b


class Optimizers:
    """Adam over the mask learners (phase A) and Adam over everything (phase B), or one joint Adam."""

    def __init__(self, model: MIM, config: TrainConfig, device: torch.device):
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.upn = model.upn_parameters()
        kw = dict(lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "two-phase":
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


def train_step(model: MIM, opt: Optimizers, batch, config: TrainConfig, noise_seed: int, device: torch.device):
    """One MIM update; returns the step's detached losses (floats) for logging."""
    out, kgs, task, loss_a, loss_b = compute_losses(model, batch, config, noise_seed, device)
    opt.step(loss_a, loss_b)
    logged = {"task": task, "masked": kgs.masked, "unmasked": kgs.unmasked, "intra": kgs.intra, "inter": kgs.inter,
              "penalty": out.penalty.sum()}
    return {k: float(v.detach()) for k, v in logged.items()}


@torch.no_grad()
def evaluate(model: MIM, split, config: TrainConfig, device: torch.device, seed: int) -> dict:
    """Predictions of a split (eval mode) → the MAG-BERT metrics, the L1 loss, and, where the split has
    ground-truth impurity masks, the purification quality of the gates."""
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
        log("trivial baseline (predict the train mean): test MAE %.4f, Acc-2 %.4f, Acc-7 %.4f" % (
            baseline["mae"], baseline["acc2"], baseline["acc7"]))
        log(_header(has_impurity))
    steps = 0
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        torch.manual_seed(_epoch_seed(config.seed, epoch, 0))  # dropout: a function of (seed, epoch)
        noise_seed = _epoch_seed(config.seed, epoch, 1)
        t0 = time.time()
        model.train()
        sums, n = {}, 0
        epoch_batches = list(batches(dataset.train, config.batch_size, shuffle=True, device=device,
                                     seed=_epoch_seed(config.seed, epoch, 2)))
        for i, batch in enumerate(epoch_batches, 1):
            losses = train_step(model, opt, batch, config, noise_seed, device)
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
        log("best epoch %d (lowest dev L1 %.4f): test MAE %.4f, Corr %.4f, Acc-2 %.4f, F1 %.4f, Acc-7 %.4f" % (
            best["epoch"], best["dev"]["l1"], best["test"]["mae"], best["test"]["corr"], best["test"]["acc2"],
            best["test"]["f1"], best["test"]["acc7"]))
    return result


def _header(impurity: bool) -> str:
    cols = "epoch | train L1 | dev L1 | test MAE | Corr   | Acc-2  | F1     | Acc-7  |"
    if impurity:
        cols += " gate closed impure/clean (per modality) |"
    return cols + "  time"


def _row(row: dict, best: bool) -> str:
    t = row["test"]
    s = "%5d | %8.4f | %6.4f | %8.4f | %.4f | %.4f | %.4f | %.4f |" % (
        row["epoch"], row["train"]["task"], row["dev"]["l1"], t["mae"], t["corr"], t["acc2"], t["f1"], t["acc7"])
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
    ax[0].plot(ep, [h["test"]["mae"] for h in hist], label="test MAE")
    ax[0].axhline(result["baseline"]["mae"], color="gray", ls="--", label="trivial baseline")
    ax[0].set_xlabel("epoch"); ax[0].legend(); ax[0].set_title("losses")
    ax[1].plot(ep, [h["test"]["acc2"] for h in hist], label="Acc-2")
    ax[1].plot(ep, [h["test"]["acc7"] for h in hist], label="Acc-7")
    ax[1].plot(ep, [h["test"]["corr"] for h in hist], label="Corr")
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
