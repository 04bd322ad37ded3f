"""The captured training step (mim_fast.graphs, `mim-fast train --cuda-graphs`) up to the capture boundary,
on the CPU: the static-buffer step follows train_step bit for bit, it makes no host sync and builds no
tensor from host data (what capture forbids), the warm-up is undone exactly, the run with it is the run
without it, and what cannot be captured is refused with the reason. The capture itself runs on the GPU
machine (tests/test_cuda_graphs.py)."""
import collections
import dataclasses
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mim_fast import graphs
from mim_fast import train as T
from mim_fast.ops import _checks

CPU = torch.device("cpu")
# device "cpu": these are the CPU tests, also where a GPU is present (a run on "auto" would capture there)
TINY = dict(synthetic={"n_train": 88, "n_dev": 24, "n_test": 24, "T": 7, "dims": [9, 5, 3]}, d_model=10, heads=2,
            batch_size=16, epochs=2, lr=3e-3, device="cpu")

# What capture forbids, as the dispatcher sees it: a read of a value on the host (item(), bool(), int() of a
# tensor: _local_scalar_dense), outputs whose size depends on values (a sync), a tensor built from host data
# (torch.tensor(...): lift_fresh, a host-to-device copy on CUDA).
SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
           "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::lift_fresh", "aten::equal",
           "aten::allclose"}


class SyncProbe(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNCING:
            self.seen[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def _setup(tmp_path, **kw):
    cfg = T.TrainConfig(out=str(tmp_path / "run"), **{**TINY, **kw})
    data = T.load_for_training(cfg)
    torch.manual_seed(1)
    model = T.build_model(data, cfg)
    return cfg, data, model, T.Optimizers(model, cfg, CPU)


def _twin(model, cfg):
    twin = T.build_model(T.load_for_training(cfg), cfg)
    twin.load_state_dict(model.state_dict())
    return twin, T.Optimizers(twin, cfg, CPU)


VARIANTS = [
    dict(),
    dict(penalty_warmup=1.5, penalty_scale="task"),  # the weight changes every step: the tensor input
    dict(penalty_scale="sample", per_sample=False, optimizer="joint"),
    dict(backend="torch", drop_last=False, adam="default"),  # reference ops; a last batch of 8 runs eagerly
]


@pytest.mark.parametrize("kw", VARIANTS, ids=["demo", "warmup-task", "sample-joint", "torch-lastbatch"])
def test_static_buffer_step_follows_train_step_bit_for_bit(tmp_path, kw):
    cfg, data, model, opt = _setup(tmp_path, **kw)
    twin, twin_opt = _twin(model, cfg)
    step = graphs.CapturedStep(twin, twin_opt, cfg, CPU, capture=False)
    for epoch in (1, 2):
        seed = T._epoch_seed(0, epoch, 1)
        epoch_batches = list(T.batches(data.train, cfg.batch_size, shuffle=True, device=CPU, seed=epoch,
                                       drop_last=cfg.drop_last))
        for i, batch in enumerate(epoch_batches):
            ramp = T.penalty_ramp(cfg, epoch, i, len(epoch_batches))
            want = T.train_step(model, opt, batch, cfg, seed, CPU, ramp)
            got = step(batch, seed, ramp)
            assert list(got) == list(T.LOGGED)
            for k in T.LOGGED:
                assert torch.equal(got[k], want[k]), (epoch, i, k, got[k], want[k])
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    n = len(data.train)
    assert step.eager_steps == (2 * (n % 16 != 0) if not cfg.drop_last else 0)
    assert step.replays == 2 * (n // 16)
    # the static buffers hold the last full batch; the caller's tensors were copied, never aliased
    assert all(step.static.inputs[m].data_ptr() != b.inputs[m].data_ptr() for m, b in
               ((m, epoch_batches[0]) for m in step.static.inputs))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_step_makes_no_host_sync_and_no_host_to_device_copy(tmp_path, monkeypatch, backend):
    """The captured region under a dispatcher probe. On CUDA the ops skip the value checks that read a CPU
    tensor's values (can_inspect_values is False there): the probe runs with CUDA's answer."""
    cfg, data, model, opt = _setup(tmp_path, backend=backend, penalty_warmup=2.0, penalty_scale="sample")
    step = graphs.CapturedStep(model, opt, cfg, CPU, capture=False)
    batch = next(T.batches(data.train, 16, shuffle=True, device=CPU, seed=3))
    step(batch, 5, 0.25)  # Adam's state exists from here on, as at capture
    monkeypatch.setattr(_checks, "can_inspect_values", lambda t: False)
    with SyncProbe() as probe:
        step._step(5)
    assert not probe.seen, dict(probe.seen)
    with SyncProbe() as probe:  # the probe can fail
        torch.ones(3).sum().item()
        torch.tensor([1.0, 2.0])
    assert probe.seen["aten::_local_scalar_dense"] == 1 and probe.seen["aten::lift_fresh"] == 1


def test_warmup_is_undone_exactly(tmp_path):
    """_save/_restore around steps: parameters, Adam's state and the RNG state come back bit for bit; Adam
    state the steps created is reset to zero (what the first real step creates)."""
    cfg, data, model, opt = _setup(tmp_path)
    step = graphs.CapturedStep(model, opt, cfg, CPU, capture=False)
    batches = list(T.batches(data.train, 16, shuffle=True, device=CPU, seed=4))
    step._load(batches[0])
    fresh = step._save()
    assert all(s is None for _, _, s in fresh[1])
    for _ in range(2):
        step._step(9)
    step._restore(fresh)
    for (t, copy) in fresh[0]:
        assert torch.equal(t, copy)
    for o in opt.opts:
        for st in o.state.values():
            assert st and all(not v.any() for v in st.values() if torch.is_tensor(v))
    step(batches[1], 9)
    before_params = {k: v.clone() for k, v in model.state_dict().items()}
    before_state = [{k: v.clone() for k, v in st.items()} for o in opt.opts for st in o.state.values()]
    saved = step._save()
    rng = torch.get_rng_state()
    torch.rand(5)
    step._step(9)
    step._step(9)
    assert not all(torch.equal(v, before_params[k]) for k, v in model.state_dict().items())
    step._restore(saved)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_params[k]), k
    after = [st for o in opt.opts for st in o.state.values()]
    for a, b in zip(after, before_state):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_run_with_the_captured_step_is_the_run_without(tmp_path, monkeypatch):
    """The whole run through CapturedStep (without capture: monkeypatched past the CUDA check) writes the
    same history as the plain run, bit for bit, and records the option."""
    cfg = T.TrainConfig(out=str(tmp_path / "plain"), **{**TINY, "drop_last": False, "penalty_warmup": 1.0})
    plain = T.run(cfg, progress=False, log=lambda *a: None)
    monkeypatch.setattr(graphs, "unsupported", lambda *a, **k: None)
    made = []
    real = graphs.CapturedStep

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(graphs, "CapturedStep", spy)
    graphed = T.run(dataclasses.replace(cfg, out=str(tmp_path / "graphed")), progress=False, log=lambda *a: None,
                    cuda_graphs=True)
    assert len(made) == 1 and made[0].capture is False and made[0].replays == 10 and made[0].eager_steps == 2
    assert graphed["sessions"][-1]["cuda_graphs"] is True and plain["sessions"][-1]["cuda_graphs"] is False
    for a, b in zip(plain["history"], graphed["history"]):
        for part in ("train", "dev", "test"):
            assert a[part] == b[part], (a["epoch"], part)
    resumed = T.resume(str(tmp_path / "graphed"), {"epochs": 3}, progress=False, log=lambda *a: None,
                       cuda_graphs=True)
    assert [s["cuda_graphs"] for s in resumed["sessions"]] == [True, True] and len(made) == 2
    assert made[1].replays == 5 and resumed["epochs_done"] == 3


def test_what_cannot_be_captured_is_refused_with_the_reason(tmp_path):
    cfg = T.TrainConfig(out=str(tmp_path / "run"), **TINY)
    gpu = torch.device("cuda")
    assert graphs.unsupported(cfg, gpu) is None
    for why, args, kwargs in (("need a CUDA device", (cfg, CPU), {}),
                              ("under torchrun", (cfg, gpu), dict(world_size=2)),
                              ("amp fp16", (dataclasses.replace(cfg, amp="fp16"), gpu), {}),
                              ("dropout='torch'", (dataclasses.replace(cfg, dropout="torch"), gpu), {}),
                              ("--compile", (cfg, gpu), dict(compile=True)),
                              ("BERT", (dataclasses.replace(cfg, bert_path=str(tmp_path)), gpu), {})):
        assert why in graphs.unsupported(*args, **kwargs)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        T.run(cfg, progress=False, log=lambda *a: None, cuda_graphs=True)
    assert not (tmp_path / "run").exists()  # refused before the first write
    _, _, model, opt = _setup(tmp_path)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        graphs.CapturedStep(model, opt, cfg, CPU, capture=True)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        graphs.CapturedStep(model, opt, cfg, CPU, capture=False, warmup=0)
    with pytest.raises(ValueError, match="capturable optimizers need a CUDA device"):
        T.Optimizers(model, cfg, CPU, capturable=True)
    r = subprocess.run([sys.executable, "-m", "mim_fast", "train", "--device", "cpu", "--cuda-graphs", "--epochs", "1",
                        "--out", str(tmp_path / "cli")], capture_output=True, text=True)
    assert r.returncode == 2 and "error: CUDA graphs need a CUDA device; the run is on cpu" in r.stderr, r.stderr
    assert not (tmp_path / "cli").exists()


def _addresses(step):
    """Where the tensors a CUDA graph of the step holds live: the model's parameters and buffers, Adam's state."""
    net = T._unwrap(step.model)
    return [t.data_ptr() for t in [*net.parameters(), *net.buffers()]] + [
        v.data_ptr() for o in step.opt.opts for st in o.state.values() for v in st.values() if torch.is_tensor(v)]


def _cuda_stand_ins(monkeypatch, holder, log):
    """torch.cuda's stream and graph API replaced by stand-ins, each checked against the real signature. A
    capture executes nothing (the stand-in undoes what the captured code did, as a real capture never runs
    it) and notes the addresses of the tensors it was captured on; a replay asserts they are unchanged (a
    real graph would go on using the old ones) and reruns the step on the static buffers into the captured
    outputs."""
    import contextlib
    import inspect

    monkeypatch.setattr(graphs, "unsupported", lambda *a, **k: None)
    monkeypatch.setattr(graphs, "_check_capturable", lambda opt: None)

    def checked(real, stand_in):
        def call(*a, **k):
            inspect.signature(real).bind(*a, **k)
            return stand_in(*a, **k)
        return call

    class Stream:
        def wait_stream(self, other):
            log.append("wait")

    class Graph:
        def replay(self):
            step = holder["step"]
            log.append("replay")
            assert _addresses(step) == self.addresses, "a replay on tensors other than those captured"
            step.outputs.copy_(step._step(step.seed))

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global"):
        assert isinstance(g, Graph) and stream is holder["step"].stream
        saved = holder["step"]._save()
        log.append("capture")
        yield
        holder["step"]._restore(saved)
        g.addresses = _addresses(holder["step"])

    cuda = torch.cuda
    for name, stand_in in (("Stream", lambda device=None, priority=0: Stream()),
                           ("current_stream", lambda device=None: Stream()),
                           ("stream", lambda stream: contextlib.nullcontext()),
                           ("device", lambda device: contextlib.nullcontext()),
                           ("graph", graph)):
        monkeypatch.setattr(cuda, name, checked(getattr(cuda, name), stand_in))
    monkeypatch.setattr(cuda, "CUDAGraph", Graph)


def test_capture_branch_with_stand_ins_for_the_cuda_runtime(tmp_path, monkeypatch):
    """The CUDA-only branch of CapturedStep — warm-up on its side stream, undo, capture, replay, a new
    capture per epoch, the device guard — run on the CPU with torch.cuda's stream and graph API replaced by
    stand-ins (_cuda_stand_ins). The trajectory must be train_step's, bit for bit."""
    cfg, data, model, opt = _setup(tmp_path, drop_last=False)
    twin, twin_opt = _twin(model, cfg)
    log, holder = [], {}
    _cuda_stand_ins(monkeypatch, holder, log)
    step = holder["step"] = graphs.CapturedStep(twin, twin_opt, cfg, CPU, capture=True, warmup=2)
    for epoch in (1, 2):
        seed = T._epoch_seed(0, epoch, 1)
        epoch_batches = list(T.batches(data.train, 16, shuffle=True, device=CPU, seed=epoch))
        for i, batch in enumerate(epoch_batches):
            want = T.train_step(model, opt, batch, cfg, seed, CPU)
            got = step(batch, seed)
            for k in T.LOGGED:
                assert torch.equal(got[k], want[k]), (epoch, i, k)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert (step.captures, step.replays, step.eager_steps) == (2, 10, 2)
    per_epoch = ["wait", "wait", "capture"] + ["replay"] * 5
    assert log == per_epoch * 2, log


REPLACEMENTS = {
    # p.data = ...: the same Parameter object, new memory (as model.to(...) does)
    "param.data": lambda model, opt: setattr(next(model.parameters()), "data", next(model.parameters()).data.clone()),
    # an optimizer's load_state_dict: new state dicts and tensors (a state_dict holds the live ones: a copy)
    "adam": lambda model, opt: [o.load_state_dict(__import__("copy").deepcopy(o.state_dict())) for o in opt.opts],
    # one tensor of Adam's state replaced in its dict
    "adam-tensor": lambda model, opt: [st.__setitem__("exp_avg", st["exp_avg"].clone())
                                       for st in list(opt.opts[-1].state.values())[:1]],
    # a hyper-parameter changed (a learning-rate schedule): a replay has the old value frozen in
    "lr": lambda model, opt: [g.__setitem__("lr", g["lr"] * 0.5) for o in opt.opts for g in o.param_groups],
    # a buffer replaced in its module (module.name = tensor keeps it a buffer, persistent or not)
    "buffer": lambda model, opt: setattr(model.encoders.audio.positions, "table",
                                         model.encoders.audio.positions.table.clone()),
}


@pytest.mark.parametrize("how", sorted(REPLACEMENTS))
def test_replaced_tensors_are_captured_again(tmp_path, monkeypatch, how):
    """A graph holds the addresses it was captured on and the Python numbers it was captured with. When the
    model's parameters or buffers, or Adam's state, are replaced between two steps (same values, new
    tensors), or Adam's learning rate changes (in both runs), the next call must capture again, with a
    warning, rather than replay onto the old memory or with the old rate (the stand-in replay asserts the
    addresses and reruns the step with the current rate, as a new capture would); the trajectory stays
    train_step's, bit for bit."""
    cfg, data, model, opt = _setup(tmp_path)
    twin, twin_opt = _twin(model, cfg)
    log, holder = [], {}
    _cuda_stand_ins(monkeypatch, holder, log)
    step = holder["step"] = graphs.CapturedStep(twin, twin_opt, cfg, CPU, capture=True, warmup=1)
    seed = T._epoch_seed(0, 1, 1)
    for i, batch in enumerate(T.batches(data.train, 16, shuffle=True, device=CPU, seed=1)):
        if i == 2:
            before = _addresses(step)
            REPLACEMENTS[how](twin, twin_opt)
            if how == "lr":
                REPLACEMENTS[how](model, opt)
            else:
                assert _addresses(step) != before  # the replacement did replace
            with pytest.warns(UserWarning, match="changed since the step was captured"):
                got = step(batch, seed)
        else:
            got = step(batch, seed)
        want = T.train_step(model, opt, batch, cfg, seed, CPU)
        for k in T.LOGGED:
            assert torch.equal(got[k], want[k]), (i, k)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert step.captures == 2
    assert log.count("capture") == 2 and log.index("capture", log.index("capture") + 1) > log.index("replay")


def test_expected_uncaptured_adam_steps_do_not_warn():
    """torch's Adam(capturable=True) warns once per optimizer when it steps outside a capture; the warm-up
    steps and the eager steps of another batch shape do so by design, and CapturedStep hides exactly that
    warning. The filter's text must still be the one torch warns with."""
    import inspect
    import warnings

    import torch.optim.optimizer as optimizer

    assert graphs._ADAM_UNCAPTURED in inspect.getsource(optimizer)
    torch_text = (graphs._ADAM_UNCAPTURED + " or some of all the param_groups came with capturable=True, but "
                  "step() is running without CUDA graph capture.")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with graphs._uncaptured_steps_expected():
            warnings.warn(torch_text, UserWarning)
            warnings.warn("another warning", UserWarning)
        warnings.warn(torch_text, UserWarning)
    assert [str(w.message) for w in seen] == ["another warning", torch_text]


def test_a_failed_warmup_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    """A warm-up step that raises (or ^C) before the capture: parameters, Adam's state and the RNG come back
    bit for bit, and the error propagates (a later capture would otherwise warm up from a moved model)."""
    import contextlib

    cfg, data, model, opt = _setup(tmp_path)
    monkeypatch.setattr(graphs, "unsupported", lambda *a, **k: None)
    monkeypatch.setattr(graphs, "_check_capturable", lambda opt: None)

    class Stream:
        def wait_stream(self, other):
            pass

    for name, stand_in in (("Stream", lambda device=None, priority=0: Stream()),
                           ("current_stream", lambda device=None: Stream()),
                           ("stream", lambda stream: contextlib.nullcontext()),
                           ("device", lambda device: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, stand_in)
    step = graphs.CapturedStep(model, opt, cfg, CPU, capture=True, warmup=3)
    batches = list(T.batches(data.train, 16, shuffle=True, device=CPU, seed=4))
    T.train_step(model, opt, batches[0], cfg, 9, CPU)  # Adam has state
    step._load(batches[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_state = [{k: v.clone() for k, v in st.items()} for o in opt.opts for st in o.state.values()]
    rng = torch.get_rng_state()
    real, calls = step._step, []

    def fails_second(seed):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(seed)

    monkeypatch.setattr(step, "_step", fails_second)
    with pytest.raises(KeyboardInterrupt):
        step._capture(9)
    assert len(calls) == 2 and step.graph is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = [st for o in opt.opts for st in o.state.values()]
    for a, b in zip(after, before_state):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("adam", ["default", "fused"])
def test_resume_keeps_this_runs_adam_flags(tmp_path, adam):
    """Optimizers.load_state_dict keeps the run's own capturable/fused flags (torch would take the
    checkpoint's): a --cuda-graphs checkpoint resumed on the CPU steps, with Adam's step count where this
    run's Adam keeps it, and the trajectory is the one of an optimizer that never saw the flag."""
    cfg, data, model, opt = _setup(tmp_path, adam=adam)
    batch = next(iter(T.batches(data.train, 16, shuffle=True, device=CPU, seed=4)))
    T.train_step(model, opt, batch, cfg, 9, CPU)
    import copy

    state = copy.deepcopy(opt.state_dict())  # (a state_dict holds the live tensors: each load gets its own)
    twin, twin_opt = _twin(model, cfg)
    twin_opt.load_state_dict(copy.deepcopy(state))  # as saved by this run
    for s in state["opts"]:  # as saved by a --cuda-graphs run
        for g in s["param_groups"]:
            g["capturable"] = True
    resumed, resumed_opt = _twin(model, cfg)
    resumed_opt.load_state_dict(state)
    stepped = 0
    for o in resumed_opt.opts:
        for g in o.param_groups:
            assert g["capturable"] is False and bool(g.get("fused")) == (adam == "fused")
            for p in g["params"]:
                st = o.state.get(p, {}).get("step")
                if st is not None:  # (a parameter no loss reached this step has no state yet)
                    assert st.dtype == torch.float32 and st.device.type == "cpu" and float(st) == 1.0
                    stepped += 1
    assert stepped
    for m, o in ((twin, twin_opt), (resumed, resumed_opt)):
        torch.manual_seed(3)
        T.train_step(m, o, batch, cfg, 11, CPU)
    for (k, a), b in zip(twin.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_step_forward_on_fake_cuda_under_capture(tmp_path, monkeypatch, backend):
    """The captured step's forward with every loss, on fake CUDA tensors (FakeTensorMode: no driver) while
    torch.cuda says a capture is under way: the ops take their CUDA and capture branches, and a host sync
    (.item(), a value-dependent shape) or a CPU tensor mixed into the CUDA graph raises here. (The backward
    cannot run this way: autograd's engine needs a real device; the CPU test above covers its syncs. Nor
    can autocast: without a driver torch turns CUDA autocast off.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = T.TrainConfig(out=str(tmp_path / "run"), **{**TINY, "backend": backend})
    data = T.load_for_training(cfg)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    dev = torch.device("cuda")
    with torch.backends.cudnn.flags(enabled=False), FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device("cuda"):
            model = T.build_model(data, cfg)
        batch = next(iter(T.batches(data.train, 16, shuffle=True, device=dev, seed=3)))
        _, _, task, loss_a, loss_b = T.compute_losses(model, batch, cfg, 5, dev,
                                                      penalty_weight=torch.full((), 0.5, device=dev))
        for v in (task, loss_a, loss_b):
            assert v.device.type == "cuda" and v.shape == ()
