"""Multi-process training of one MIM model with PyTorch's own engine: torch.distributed, started by
``torchrun`` (gloo carries CPU tensors, NCCL CUDA tensors). mim_fast adds no launcher and no collective
of its own; this module holds the few collective steps `mim-fast train` takes and the rule that splits a
global batch.

How a step stays the single-process step — exactly in real arithmetic, to rounding in float32 (the ranks
add their gradients in another order than one process's matmuls do); see
:func:`mim_fast.train.compute_losses`:

* every rank iterates the same global batches (same shuffle) and takes a contiguous part of each:
  :func:`shard` — for a global batch of B samples on N ranks, the first B mod N ranks take ⌈B/N⌉ samples
  and the others ⌊B/N⌋; nothing is padded or dropped (a rank may get none: the last batch of an epoch
  can be smaller than N), and every sample keeps its global index, which keys its gate noise and
  dropout masks;
* each rank's losses are its share of the global batch's: sums over its samples divided by the global
  batch size B (the gate penalty: its valid steps' share), so the sum over ranks is the global mean
  exactly, whatever the split;
* both gradient sets of MIM's two-phase step are summed over the ranks in one bucketed all_reduce
  (:func:`all_reduce_gradients`), then every rank takes the same Adam steps;
* KGS routing by batch means (``per_sample=False``) sees the whole global batch's predictions
  (:func:`assemble_global`);
* the replicas are compared bit for bit after setup and after every epoch (:func:`check_replicas`): a
  replica that drifted stops the run with an error instead of training on silently.
"""
import contextlib
import datetime
import gc
import hashlib
import json
import os
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["World", "current", "session", "shard", "all_reduce_gradients", "all_reduce_sum", "assemble_global",
           "check_replicas", "agree", "broadcast_outcome", "broadcast_result", "PeerFailed", "ReplicasDiverged",
           "local_rank"]


class World(NamedTuple):
    """This process's place among the training processes: ``rank`` in [0, ``size``)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that evaluates, writes the run folder and prints."""
        return self.rank == 0


class PeerFailed(RuntimeError):
    """Another rank failed (rank 0 reports the reason; the other ranks stop quietly)."""


class ReplicasDiverged(RuntimeError):
    """The model replicas of the ranks are no longer bit-identical."""


def current() -> World:
    """The world of the initialized default process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def local_rank() -> int:
    """torchrun's LOCAL_RANK (the GPU a process uses on its machine), 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def session(timeout_s: float = 1800.0) -> Iterator[World]:
    """The world of this process: when torchrun started it among several (WORLD_SIZE > 1 in the
    environment) and no process group exists yet, join one from the environment (env://) — gloo for CPU
    tensors, plus NCCL for CUDA tensors when this torch has both — and leave it on exit. An existing
    default group (a caller's own) is used as is and left alone."""
    created = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        nccl = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        created = True
    try:
        world = current()
        yield world
        if created:  # nobody leaves while another still finishes its last collective (a CPU tensor: gloo)
            all_reduce_sum(torch.zeros(1), world)
    finally:
        if created:
            dist.destroy_process_group()
            # Free what still references the group now, not during interpreter shutdown, where gloo's
            # worker threads releasing tensors can abort the process
            gc.collect()


def shard(n: int, world: World) -> Tuple[int, int]:
    """[start, stop) of ``world.rank``'s part of a global batch of ``n`` samples: the first n mod size ranks
    take one sample more than the others; the parts are contiguous and in rank order."""
    q, r = divmod(n, world.size)
    start = world.rank * q + min(world.rank, r)
    return start, start + q + (world.rank < r)


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """Σ over ranks of ``t`` (a new tensor; ``t`` itself for a single process)."""
    if world.size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_reduce_gradients(grads: Sequence[Sequence[Optional[torch.Tensor]]],
                         params: Sequence[Sequence[torch.Tensor]], world: World) -> List[List[Optional[torch.Tensor]]]:
    """Sum gradient sets over the ranks: one all_reduce per dtype for all sets together (a bucket of
    every gradient flattened, a None as zeros, plus one flag per gradient). A gradient that is None on
    every rank (a parameter its loss never reaches, e.g. the published ``pooler2``) stays None, as in a
    single process; one that any rank has becomes the sum. ``grads[s][i]`` belongs to ``params[s][i]``;
    a rank with no samples passes all None. Every rank gets bit-identical sums (the collective reduces
    each element once and distributes the result)."""
    if world.size == 1:
        return [list(g) for g in grads]
    slots = [(s, i, p) for s, ps in enumerate(params) for i, p in enumerate(ps)]
    out = [[None] * len(ps) for ps in params]
    for dtype in sorted({p.dtype for _, _, p in slots}, key=str):
        mine = [(s, i, p) for s, i, p in slots if p.dtype == dtype]
        device = mine[0][2].device
        flat = [grads[s][i].reshape(-1) if grads[s][i] is not None else torch.zeros(p.numel(), dtype=dtype,
                                                                                    device=device)
                for s, i, p in mine]
        flags = torch.tensor([grads[s][i] is not None for s, i, _ in mine], dtype=dtype, device=device)
        bucket = torch.cat(flat + [flags])
        dist.all_reduce(bucket)
        sizes = [p.numel() for _, _, p in mine]
        pieces = bucket.split(sizes + [len(mine)])
        reached = pieces[-1] > 0
        for k, (s, i, p) in enumerate(mine):
            if reached[k]:
                out[s][i] = pieces[k].view_as(p)
    return out


def assemble_global(local: torch.Tensor, start: int, size: int, world: World) -> torch.Tensor:
    """The whole global batch of a per-sample tensor, detached: ``local`` (..., b) holds this rank's
    samples [start, start + b) of ``size``; returns (..., size) on every rank, bit for bit the values the
    ranks hold (each column is one rank's value plus zeros from the others)."""
    full = local.new_zeros(local.shape[:-1] + (size,))
    full[..., start:start + local.shape[-1]] = local.detach()
    return all_reduce_sum(full, world)


def _digest(module: torch.nn.Module) -> bytes:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def check_replicas(module: torch.nn.Module, world: World, when: str) -> None:
    """Collective: raise :class:`ReplicasDiverged` on every rank unless every rank's ``module`` (its
    state_dict: parameters and buffers) is bit-identical to rank 0's. ``when`` names the moment in the
    message."""
    if world.size == 1:
        return
    mine = torch.tensor(list(_digest(module)), dtype=torch.uint8)
    every = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    differ = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
    if differ:
        raise ReplicasDiverged("%s: the model on rank%s %s is not bit-identical to rank 0's (the ranks would "
                               "train different models); stopping" % (when, "s" if len(differ) > 1 else "",
                                                                      ", ".join(map(str, differ))))


def _gather_text(text: Optional[str], world: World) -> List[Optional[str]]:
    """Every rank's ``text`` (None or at most 1000 bytes of UTF-8), through CPU tensors: in a process group
    with both gloo and NCCL they take gloo, whatever device this process has (or has not yet) chosen."""
    data = b"" if text is None else text.encode()[:1000]
    mine = torch.zeros(1001, dtype=torch.uint8)
    mine[0] = text is not None
    if data:
        mine[1:1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    every = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    return [t[1:].numpy().tobytes().rstrip(b"\0").decode(errors="replace") if t[0] else None for t in every]


def agree(error: Optional[BaseException], world: World) -> None:
    """Collective, after a phase every rank runs (setup): if any rank failed, every rank raises — rank 0 its
    own error, or :class:`PeerFailed` naming the first rank that failed and why; the other ranks raise
    :class:`PeerFailed` (rank 0 reports). A single process re-raises its error."""
    if world.size == 1:
        if error is not None:
            raise error
        return
    messages = _gather_text(None if error is None else ((str(error).splitlines() or [""])[0] or
                                                         type(error).__name__), world)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if world.main and error is not None:
        raise error
    rank, message = failed[0]
    raise PeerFailed("rank %d failed: %s" % (rank, message)) from error


def broadcast_result(result: dict, world: World) -> dict:
    """Rank 0's ``result`` (a JSON-able dict) on every rank (through CPU tensors, see :func:`_gather_text`)."""
    if world.size == 1:
        return result
    data = json.dumps(result, default=float).encode() if world.main else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, 0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if world.main else torch.empty(int(size),
                                                                                              dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return result if world.main else json.loads(buf.numpy().tobytes().decode())


def broadcast_outcome(error: Optional[BaseException], world: World) -> None:
    """Collective, after a phase only rank 0 runs (evaluation, writing the run folder): rank 0 re-raises its
    error; the other ranks raise :class:`PeerFailed` when it failed."""
    if world.size > 1:
        flag = torch.tensor([error is not None], dtype=torch.int32)
        dist.broadcast(flag, 0)
        if bool(flag) and not world.main:
            raise PeerFailed("rank 0 failed (it reports why)")
    if error is not None:
        raise error
