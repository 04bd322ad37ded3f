"""pytest-benchmark of MIM's whole training step (forward, both gradient sets, both Adam steps) with the
fused ops vs the eager reference ops: same model, same data, the paper's dimensions (D=80, T=50; batch 16
and 256), three modalities (text features 768-d, audio 74-d, vision 47-d, as MOSI with BERT features).

Providers: "reference" (backend="torch": the eager reference ops) and "fused" (backend="auto": the fastest
fused backend for the device). extra_info records steps/s.

Run:   python -m pytest benchmarks/bench_train_step.py --benchmark-json=out.json
Smoke: python -m pytest benchmarks/bench_train_step.py --benchmark-disable
"""
import pytest
import torch

from mim_fast import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("batch_size", [16, 256])
@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_train_step(benchmark, provider, batch_size):
    train_step = bench.train_step_fn("eager" if provider == "reference" else "auto", batch_size, torch.float32,
                                     DEVICE)

    def step():
        train_step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    benchmark.group = "train_step B=%d D=80 T=50" % batch_size
    benchmark.extra_info.update(provider=provider, B=batch_size, device=str(DEVICE))
    benchmark.pedantic(step, rounds=10 if batch_size > 16 else 30, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["steps/s"] = 1.0 / benchmark.stats.stats.median
