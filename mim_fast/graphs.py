"""MIM's training step captured as one CUDA graph and replayed (``mim-fast train --cuda-graphs``).

At the paper's size (B = 16, D = 80, T = 50) a training step launches about a thousand small kernels, so on
a GPU it is bound by launch latency and Python, not by arithmetic. A CUDA graph records the step's kernels
once (forward, both gradient sets, both Adam updates) and replays them with one launch.

What changes between replays, and how a replay sees it:

* **the batch** — copied into static buffers (inputs, lengths, labels, sample indices) before each replay;
* **gate noise and dropout** — keyed by (the epoch's seed, global sample index, element). The indices are a
  static buffer, so each replay draws its own samples' noise; the epoch's seed is a kernel argument, frozen
  at capture, so the step is captured again at the first step of every epoch;
* **the penalty weight** — it changes every step under ``penalty_warmup``: a 0-d float32 device tensor,
  filled before each replay (:func:`mim_fast.train.compute_losses`'s ``penalty_weight``);
* **Adam** — ``torch.optim.Adam(capturable=True)`` keeps its step count on the device.

A graph holds the addresses of the tensors it was captured on. Should the model's parameters or buffers, or
Adam's state, be replaced after a capture (``p.data = ...``, ``model.to(...)``, a buffer registered anew,
an optimizer's ``load_state_dict``), a replay would go on reading and updating the old
memory: a run that silently stops training the model it holds. Each call therefore checks, before a replay,
that every one of them is still the tensor, at the address, it was at the capture, and captures again
(with a warning naming it) when one is not.

A batch of another shape (the last, smaller batch of an epoch when ``drop_last`` is off) runs eagerly, on the
same parameters and optimizer state. Capturing runs ``warmup`` steps first (on a side stream, as torch's
CUDA-graph docs require: lazy state such as Adam's moments must exist before capture, or its
initialization would be recorded and replayed). Those steps would move the model, so the parameters,
buffers, optimizer state and RNG states are saved before them and restored in place after: a captured run
follows the eager run's trajectory (the same kernels on the same values; only capturable Adam's
device-side bias correction may round differently from the default Adam's host-side one).

Refused, with the reason (:func:`unsupported`): a device other than CUDA, several processes (the step's
all_reduce is not captured), fp16 autocast (GradScaler reads its inf check on the host), ``dropout="torch"``
(torch's generator, not keyed by sample: a replay would not follow the eager run), ``--compile`` and a
Hugging Face BERT text encoder (not checked for capture).

``capture=False`` runs the same static-buffer step without a graph, on any device: the test of everything
up to the capture boundary that a CPU can run (tests/test_graphs.py). The GPU tests
(tests/test_cuda_graphs.py) compare captured and eager runs.
"""
import contextlib
import operator
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from . import train as train_lib
from .train import LOGGED, Batch, Optimizers, TrainConfig

__all__ = ["CapturedStep", "unsupported"]


def unsupported(config: TrainConfig, device: torch.device, *, world_size: int = 1,
                compile: bool = False) -> Optional[str]:
    """Why a captured training step cannot serve this run, or None when it can."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device; the run is on %s" % device
    if world_size > 1:
        return ("--cuda-graphs trains on one process; under torchrun (%d processes) the gradients' all_reduce "
                "is not captured" % world_size)
    if config.amp == "fp16":
        return "--amp fp16's GradScaler reads its inf check on the host, which a graph cannot: use --amp bf16 or none"
    if config.dropout != "keyed":
        return ("dropout=%r draws from torch's generator; a captured step replays keyed dropout "
                "(dropout='keyed', the default)" % config.dropout)
    if compile:
        return "--cuda-graphs and --compile are not combined (torch.compile's own graphs: mode='reduce-overhead')"
    if config.bert_path:
        return ("a Hugging Face BERT text encoder (--bert) is not checked for capture (its attention-mask handling "
                "may read device values on the host)")
    return None


# torch.optim.Adam(capturable=True) warns, once per optimizer, when it steps outside a capture. Here that is
# by design (the warm-up steps, a batch of another shape), so the warning would only alarm the user.
_ADAM_UNCAPTURED = "This instance was constructed with capturable=True"


@contextlib.contextmanager
def _uncaptured_steps_expected():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ADAM_UNCAPTURED, category=UserWarning)
        yield


def _check_capturable(opt: Optimizers) -> None:
    for o in opt.opts:
        if not all(g.get("capturable") or False for g in o.param_groups):
            raise ValueError("CapturedStep needs Optimizers(..., capturable=True) on CUDA")


class CapturedStep:
    """A callable ``step(batch, noise_seed, penalty_factor=1.0) -> losses`` that does what
    :func:`mim_fast.train.train_step` does, replaying a CUDA graph of the step for every batch of the first
    full batch's shapes (see the module's docstring).

    ``model`` and ``opt`` (:class:`~mim_fast.train.Optimizers`, built with ``capturable=True`` on CUDA) are
    updated in place. Returns the step's losses (:data:`~mim_fast.train.LOGGED`) as 0-d float32 tensors of
    its own (copied out of the graph's outputs), with no host sync. ``capture``: None (default) captures on
    CUDA; False runs the static-buffer step eagerly (any device). ``warmup``: eager steps before each
    capture, undone afterwards. Counters: ``captures``, ``replays``, ``eager_steps``."""

    def __init__(self, model, opt: Optimizers, config: TrainConfig, device: torch.device, *,
                 capture: Optional[bool] = None, warmup: int = 2):
        device = torch.device(device)
        self.capture = device.type == "cuda" if capture is None else bool(capture)
        if self.capture:
            reason = unsupported(config, device)
            if reason:
                raise ValueError(reason)
            _check_capturable(opt)
        if any(not isinstance(o, torch.optim.Adam) for o in opt.opts):
            raise TypeError("CapturedStep restores Adam's state after the warm-up steps; got %s"
                            % ", ".join(type(o).__name__ for o in opt.opts))
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError("warmup must be an int >= 1; got %r" % (warmup,))
        self.model, self.opt, self.config, self.device, self.warmup = model, opt, config, device, warmup
        self.coef = torch.zeros((), dtype=torch.float32, device=device)
        self.static: Optional[Batch] = None
        self.graph = None
        self.seed: Optional[int] = None
        self.outputs: Optional[torch.Tensor] = None
        self.bindings: Tuple[list, ...] = ()  # what the graph holds by address or has frozen (see _bind)
        # One side stream for every warm-up and capture. cuBLAS keeps a workspace per (handle, stream),
        # allocated on first use and never freed: warming up on the stream that then captures creates them
        # outside the graph's pool (a workspace made during capture would pin the pool after the graph is
        # gone), and one stream keeps them from multiplying epoch after epoch.
        self.stream = torch.cuda.Stream(device) if self.capture else None
        self.captures = self.replays = self.eager_steps = 0

    # -- the step ---------------------------------------------------------------------------------------------
    def __call__(self, batch: Batch, noise_seed: int, penalty_factor: float = 1.0) -> Dict[str, torch.Tensor]:
        if not self._fits(batch):
            self.eager_steps += 1
            with _uncaptured_steps_expected() if self.capture else contextlib.nullcontext():
                return train_lib.train_step(self.model, self.opt, batch, self.config, noise_seed, self.device,
                                            penalty_factor)
        self._load(batch)
        self.coef.fill_(self.config.penalty_weight * penalty_factor)  # a fill kernel: no host-to-device copy
        if not self.capture:
            logged = self._step(noise_seed)
        else:
            with torch.cuda.device(self.device):  # capture and replay on the run's GPU, not the current one
                if self.graph is None or noise_seed != self.seed or not self._still_bound():
                    self._capture(noise_seed)
                self.graph.replay()
            logged = self.outputs
        self.replays += 1
        # A copy: the graph's outputs are overwritten by the next replay, and callers keep the losses.
        return dict(zip(LOGGED, logged.clone().unbind()))

    def _step(self, noise_seed: int) -> torch.Tensor:
        """The step on the static buffers (what is captured); the losses stacked in one (6,) tensor."""
        logged = train_lib.train_step(self.model, self.opt, self.static, self.config, noise_seed, self.device,
                                      penalty_weight=self.coef)
        return torch.stack([logged[k] for k in LOGGED])

    # -- static buffers -------------------------------------------------------------------------------------
    @staticmethod
    def _tensors(batch: Batch) -> List[Tuple[str, torch.Tensor]]:
        pairs = [("inputs." + k, v) for k, v in sorted(batch.inputs.items())]
        pairs += [("lengths." + k, v) for k, v in sorted((batch.lengths or {}).items())]
        return pairs + [("labels", batch.labels), ("index", batch.index)]

    def _fits(self, batch: Batch) -> bool:
        """Whether ``batch`` can go through the static buffers: the shapes and dtypes of the first full batch
        (a batch of ``config.batch_size`` samples; any other size runs eagerly) and the same modalities."""
        if batch.part is not None or len(batch.labels) != self.config.batch_size:
            return False
        if self.static is None:
            return True
        mine, theirs = self._tensors(self.static), self._tensors(batch)
        return len(mine) == len(theirs) and all(
            a == b and s.shape == t.shape and s.dtype == t.dtype for (a, s), (b, t) in zip(mine, theirs))

    def _load(self, batch: Batch) -> None:
        if self.static is None:  # allocated outside the graph's pool; alive as long as this object
            def own(t):
                return t.detach().to(self.device, copy=True)

            self.static = Batch({k: own(v) for k, v in batch.inputs.items()},
                                None if batch.lengths is None else {k: own(v) for k, v in batch.lengths.items()},
                                own(batch.labels), own(batch.index), None, None)
            return
        for (_, dst), (_, src) in zip(self._tensors(self.static), self._tensors(batch)):
            dst.copy_(src, non_blocking=True)

    # -- capture ----------------------------------------------------------------------------------------------
    def _capture(self, noise_seed: int) -> None:
        self.graph = self.outputs = None  # the previous epoch's graph goes first (its own memory pool with it)
        saved = self._save()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream), _uncaptured_steps_expected():
                for _ in range(self.warmup):
                    self._step(noise_seed)
        finally:  # also when a warm-up step raised (or ^C): the model and Adam are as they were
            current.wait_stream(self.stream)
            self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):  # a private memory pool per capture
            self.outputs = self._step(noise_seed)
        self.graph, self.seed = graph, noise_seed
        self.bindings = self._bind()
        self.captures += 1

    # -- what a graph holds by address ------------------------------------------------------------------------
    def _bind(self) -> Tuple[list, ...]:
        """What a replay reads or writes outside the graph's pool and code outside this class may replace or
        change: the model's parameters and buffers (each in its module's dict, and at its address) and each
        Adam's state (its state dict, param_groups, each parameter's state dict and the tensors in it) and
        hyper-parameters (lr, betas, eps, weight decay, ...: Python numbers a replay has frozen, so a changed lr
        would otherwise be ignored). Columns (names, containers, keys, objects, tensors, addresses,
        hyper-parameters), so that :meth:`_still_bound` checks them in C loops (map), not a Python one."""
        net = train_lib._unwrap(self.model)
        rows = []
        for mod_name, mod in net.named_modules():
            for slots in (mod._parameters, mod._buffers):
                rows += [((mod_name + "." if mod_name else "") + k, slots, k, t) for k, t in slots.items()
                         if t is not None]
        tensors = [t for _, _, _, t in rows]
        for i, o in enumerate(self.opt.opts):
            name = "optimizer %d's state" % i
            rows += [(name, vars(o), "state", o.state), (name, vars(o), "param_groups", o.param_groups)]
            for p, st in o.state.items():
                rows += [(name, o.state, p, st)] + [(name, st, k, v) for k, v in st.items() if torch.is_tensor(v)]
        names, slots, keys, objs = (list(c) for c in zip(*rows))
        return names, slots, keys, objs, tensors, [t.data_ptr() for t in tensors], self._hyper()

    def _hyper(self) -> Tuple[list, list]:
        """Every optimizer's hyper-parameters, group by group, as plain Python values, tensors by identity (a
        replay reads a tensor's memory, so an in-place change reaches it; ``==`` on tensors would compare
        values and read them on the host); and those tensors, kept alive so that their ids stay theirs."""
        keep = []

        def key(v):
            if torch.is_tensor(v):
                keep.append(v)
                return ("tensor", id(v))
            return tuple(map(key, v)) if isinstance(v, (tuple, list)) else v

        return [[(k, key(v)) for k, v in g.items() if k != "params"]
                for o in self.opt.opts for g in o.param_groups], keep

    def _still_bound(self) -> bool:
        """Whether every object :meth:`_bind` recorded at the capture is still in its place, every tensor at its
        address and every hyper-parameter unchanged; when one is not, warns with its name (the step is then
        captured again)."""
        names, slots, keys, objs, tensors, ptrs, hyper = self.bindings
        if all(map(operator.is_, map(dict.get, slots, keys), objs)) and \
                list(map(torch.Tensor.data_ptr, tensors)) == ptrs and self._hyper()[0] == hyper[0]:
            return True
        moved = {id(t) for t, p in zip(tensors, ptrs) if t.data_ptr() != p}
        name = next((n for n, d, k, o in zip(names, slots, keys, objs) if d.get(k) is not o or id(o) in moved),
                    "an optimizer's hyper-parameters (lr, betas, ...)")
        warnings.warn("CapturedStep: %s changed since the step was captured (a CUDA graph holds the old tensors' "
                      "addresses and the old Python numbers); capturing the step again" % name, stacklevel=3)
        return False

    def _save(self):
        """Copies of what the warm-up steps change: parameters and buffers, Adam's state (None for a parameter
        without state yet) and the RNG states."""
        net = train_lib._unwrap(self.model)
        with torch.no_grad():
            model = [(t, t.clone()) for t in net.state_dict().values() if torch.is_tensor(t)]
            states = []
            for o in self.opt.opts:
                for group in o.param_groups:
                    for p in group["params"]:
                        st = o.state.get(p)
                        states.append((o, p, {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                                       if st else None))
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        return model, states, rng

    def _restore(self, saved) -> None:
        """Everything :meth:`_save` copied, written back in place (the graph records these very tensors).
        Adam state that the warm-up created is reset to its initial value, zero (step 0, zero moments), as
        the first real step would create it."""
        model, states, (cpu_rng, cuda_rng) = saved
        with torch.no_grad():
            for t, copy in model:
                t.copy_(copy)
            for o, p, copy in states:
                st = o.state.get(p)
                for k, v in (st or {}).items():
                    if torch.is_tensor(v):
                        v.zero_() if copy is None else v.copy_(copy[k])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
