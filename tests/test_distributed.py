"""Multi-process training (mim_fast.distributed, `torchrun ... mim_fast train`), run for real: torchrun
starts 2 or 3 processes on this CPU (gloo). The property tested is world-size invariance — the same seed
and global batch size give the same run on 1, 2 and 3 processes — including a global batch that does not
divide evenly (16 samples on 3 ranks: 6/5/5) and a last batch smaller than the number of processes (1
sample: the other ranks have none), routing by batch means, bit-exact --resume under torchrun (also onto
another number of processes), a user's DistributedDataParallel loop, and the replica check.

What "the same run" means, measured: the metrics of every epoch agree to 1e-5 and every parameter to
float32 reduction-order noise (the processes sum their gradients in another order than one process's
matmuls do). One kind of parameter is the exception, and is checked against its own bound: the attention
key biases (``in_proj_bias[D:2D]``) have an exact gradient of 0 (softmax is shift-invariant), so their
float32 gradient is pure rounding noise, which Adam normalizes into steps of up to ~lr whatever its size.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mim_fast import distributed
from mim_fast import train as T

from _params import assert_param_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
# 97 training samples in global batches of 16: 6 full batches (8/8 on 2 ranks, 6/5/5 on 3) and a last
# batch of 1 sample (rank 0 only). 2 epochs, 14 steps.
TINY = dict(synthetic={"n_train": 97, "n_dev": 32, "n_test": 32, "T": 8, "dims": [8, 6, 5], "min_length": 3},
            d_model=10, heads=2, batch_size=16, epochs=2, lr=3e-3, seed=3)
STEPS = 14


def env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def torchrun(n, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def worker(n, *args):
    return torchrun(n, WORKER, *args)


def final_model(out):
    done = T.runs.checkpoints(out)
    return torch.load(done[0][1], weights_only=True)["model"]


def assert_same_run(a, b, steps=STEPS, lr=TINY["lr"]):
    """Run folders a and b hold the same run: metrics to 1e-5, parameters to float32 reduction-order noise
    (see the module docstring for the attention key biases)."""
    ma, mb = (json.load(open(os.path.join(o, "metrics.json"))) for o in (a, b))
    assert len(ma["history"]) == len(mb["history"])

    def numbers(d, path=""):
        if isinstance(d, dict):
            for k, v in d.items():
                if k != "seconds":
                    yield from numbers(v, path + "." + k)
        elif isinstance(d, (int, float)) and not isinstance(d, bool):
            yield path, d

    for ha, hb in zip(ma["history"], mb["history"]):
        na, nb = dict(numbers(ha)), dict(numbers(hb))
        assert na.keys() == nb.keys()
        for k in na:
            assert abs(na[k] - nb[k]) <= 1e-5, (k, na[k], nb[k])
    pa, pb = final_model(a), final_model(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert_param_close(k, pa[k], pb[k], steps * lr)  # key biases: pure-noise gradient, Adam's bound


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process runs (in this process): per-sample and batch-mean routing."""
    base = tmp_path_factory.mktemp("single")
    outs = {}
    for name, extra in (("per_sample", {}), ("batch", {"per_sample": False})):
        outs[name] = str(base / name)
        T.run(T.TrainConfig(out=outs[name], **{**TINY, **extra}), progress=False, threads=1, log=lambda *a: None)
    return outs


def test_shard_splits_every_sample_once_in_rank_order():
    for n in range(0, 20):
        for size in (1, 2, 3, 4):
            parts = [distributed.shard(n, distributed.World(r, size)) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(parts[r][1] == parts[r + 1][0] for r in range(size - 1))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [distributed.shard(16, distributed.World(r, 3)) for r in range(3)] == [(0, 6), (6, 11), (11, 16)]


@pytest.fixture(scope="module")
def on(tmp_path_factory):
    """on(n): the tiny run on n processes under torchrun (run once per module) → (run folder, torchrun's
    output)."""
    done = {}

    def get(n):
        if n not in done:
            out = str(tmp_path_factory.mktemp("world%d" % n) / "run")
            done[n] = out, worker(n, "run", out, "{}")
        return done[n]
    return get


@pytest.mark.parametrize("n", [2, 3])
def test_one_run_on_1_2_and_3_processes(single, on, n):
    out, res = on(n)
    assert_same_run(single["per_sample"], out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert cfg["world_size"] == n and metrics["config"]["world_size"] == n
    assert metrics["sessions"][0]["world_size"] == n
    assert res.stdout.count("epoch | train L1") == 1  # only rank 0 prints
    results = [json.load(open(os.path.join(out, "result-rank%d.json" % r))) for r in range(n)]
    assert all(r == results[0] for r in results)  # every process returns rank 0's result
    assert sorted(f for f in os.listdir(out) if not f.startswith("result-")) == sorted(
        ["config.json", "metrics.json", "best.pt", "curves.png", "gates.png"] +
        ["checkpoint-epoch%04d.pt" % e for e in (1, 2)])


def test_routing_by_batch_means_sees_the_global_batch(tmp_path, single):
    """per_sample=False routes by the global batch's mean errors on every process (assembled by an
    all_reduce; a rank with no samples in the last batch takes part with nothing)."""
    out = str(tmp_path / "run")
    worker(2, "run", out, json.dumps({"per_sample": False}))
    assert_same_run(single["batch"], out)


def test_resume_under_torchrun_is_bit_exact_and_may_change_the_process_count(tmp_path, on):
    full, _ = on(2)
    cut, moved = str(tmp_path / "cut"), str(tmp_path / "moved")
    worker(2, "run", cut, "{}", str(STEPS // 2 + 2))  # stopped 2 steps into epoch 2: resumes from epoch 1
    shutil.copytree(cut, moved)
    worker(2, "resume", cut)
    a, b = final_model(full), final_model(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha, hb = (json.load(open(os.path.join(o, "metrics.json")))["history"] for o in (full, cut))
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in hist] for hist in (ha, hb)]
    assert strip[0] == strip[1]
    # the same interrupted run resumed on 3 processes: the same run up to rounding
    worker(3, "resume", moved)
    assert_same_run(full, moved)
    sessions = json.load(open(os.path.join(moved, "metrics.json")))["sessions"]
    assert [s["world_size"] for s in sessions] == [2, 3]
    assert json.load(open(os.path.join(moved, "config.json")))["world_size"] == 3


def ddp_setup(out):
    """The pieces of tests/distributed_worker.py's ddp mode, also used here for the single-process reference:
    config, data, model, optimizers and two steps' (seed, batch) for a world."""
    cfg = T.TrainConfig(out=out, **{**TINY, "batch_size": 13})
    data = T.load_for_training(cfg)
    torch.manual_seed(0)
    model = T.build_model(data, cfg)
    opt = T.Optimizers(model, cfg, torch.device("cpu"))

    def steps(world):
        every = T.batches(data.train, 13, shuffle=True, device=torch.device("cpu"), seed=1, world=world)
        return [(5, next(every)), (6, next(every))]

    return cfg, data, model, opt, steps


def test_a_users_ddp_loop_and_the_replica_check(tmp_path):
    """train_step(DistributedDataParallel(model), ...) on 2 processes gives the single-process step (DDP's
    own reducer would not see autograd.grad's gradients: the forward runs under no_sync and the step
    all-reduces both sets), the replicas stay bit-identical, and a replica changed by one ulp is caught."""
    out = str(tmp_path)
    worker(2, "ddp", out)
    cfg, data, model, opt, steps = ddp_setup(out)
    for seed, batch in steps(distributed.World()):
        T.train_step(model, opt, batch, cfg, seed, torch.device("cpu"))
    ranks = [torch.load(os.path.join(out, "rank%d.pt" % r), weights_only=True) for r in range(2)]
    for k, v in model.state_dict().items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        if not k.endswith("in_proj_bias"):
            torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)
    for r in range(2):
        caught = json.load(open(os.path.join(out, "result-rank%d.json" % r)))["caught"]
        assert caught and "rank 1 is not bit-identical to rank 0's" in caught, caught


def test_a_step_on_several_processes_needs_the_batch_part():
    cfg = T.TrainConfig(out="unused", **TINY)
    data = T.load_for_training(cfg)
    batch = next(T.batches(data.train, 4, shuffle=False, device=torch.device("cpu")))
    with pytest.raises(ValueError, match="needs each batch's place in the global batch"):
        T._global_part(batch, distributed.World(0, 2))


def test_mim_fast_train_under_torchrun(tmp_path):
    """The command itself: `torchrun -m mim_fast train` and the `mim-fast` script under torchrun (--resume);
    rank 0 alone prints; an error every rank meets is reported once, as one line."""
    out = str(tmp_path / "cli")
    args = ["--out", out, "--d-model", "10", "--batch-size", "64", "--quiet", "--threads", "1"]
    res = torchrun(2, "-m", "mim_fast", "train", "--epochs", "1", *args)
    assert res.stdout.count("epoch | train L1") == 1 and "2 processes (global batch 64)" in res.stdout
    script = os.path.join(os.path.dirname(sys.executable), "mim-fast")
    if not os.path.exists(script):
        pytest.skip("the mim-fast script is not installed next to %s" % sys.executable)
    res = torchrun(2, "--no-python", script, "train", "--resume", "--epochs", "2", *args)
    assert res.stdout.count("resuming") == 1 and res.stdout.count("    2 |") == 1, res.stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and metrics["config"]["world_size"] == 2
    assert [s["world_size"] for s in metrics["sessions"]] == [2, 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mim_fast",
           "train", "--epochs", "1", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, cwd=ROOT)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mim-fast train")]
    assert len(errors) == 1 and "already holds a run" in errors[0], res.stderr[-3000:]
