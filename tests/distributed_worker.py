"""What tests/test_distributed.py runs under torchrun (one process per rank; gloo on the CPU).

    torchrun --standalone --nproc_per_node N tests/distributed_worker.py run OUT JSON_OVERRIDES [STOP_AFTER_STEPS]
    torchrun --standalone --nproc_per_node N tests/distributed_worker.py resume OUT
    torchrun --standalone --nproc_per_node N tests/distributed_worker.py ddp OUT

``run``/``resume`` call mim_fast.train.run/resume with tests/test_distributed.py's tiny config (plus the
JSON overrides); ``ddp`` checks the pieces a user's own DistributedDataParallel loop meets and writes what
it saw to OUT/rank<r>.pt.
"""
import gc
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mim_fast import distributed  # noqa: E402
from mim_fast import train as T  # noqa: E402
from test_distributed import TINY, ddp_setup  # noqa: E402


def main(argv):
    torch.set_num_threads(1)
    mode, out = argv[0], argv[1]
    if mode == "run":
        stop = int(argv[3]) if len(argv) > 3 else None
        result = T.run(T.TrainConfig(out=out, **{**TINY, **json.loads(argv[2])}), progress=False, threads=1,
                       stop_after_steps=stop)
    elif mode == "resume":
        result = T.resume(out, progress=False, threads=1)
    else:
        result = ddp(out)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, "result-rank%d.json" % rank), "w") as f:
        json.dump(result, f, default=float)


def ddp(out):
    """Two steps of a user's loop with the model wrapped in DistributedDataParallel (compute_losses and
    train_step unwrap it and run its forward under no_sync), then a replica perturbed on purpose."""
    with distributed.session() as world:
        cfg, data, model, opt, steps = ddp_setup(out)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        for seed, batch in steps(world):
            T.train_step(wrapped, opt, batch, cfg, seed, torch.device("cpu"))
        distributed.check_replicas(model, world, "after two steps")  # must pass
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, "rank%d.pt" % world.rank))
        if world.rank == 1:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1e-7
        try:
            distributed.check_replicas(model, world, "after a perturbation")
            caught = None
        except distributed.ReplicasDiverged as e:
            caught = str(e)
        dist.barrier()
        # DDP holds the process group: release it while the interpreter is fully alive (a gloo group
        # destroyed during interpreter shutdown can abort the process)
        del wrapped
        gc.collect()
        return {"caught": caught}


if __name__ == "__main__":
    main(sys.argv[1:])
