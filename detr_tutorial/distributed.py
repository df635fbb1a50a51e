"""Training on several processes with ``torchrun`` and DistributedDataParallel (DDP).

``torchrun --nproc_per_node N -m detr_tutorial.train ...`` starts N copies of the
training command and gives each one its ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` (and the rendezvous address) as environment variables; this
module turns them into a process group (gloo on the CPU, NCCL on CUDA) and a
:class:`~detr_tutorial.engine.Trainer` that trains as one process would:

* **Batches.** The preset's batch size is the *global* batch: every optimiser
  step sees that many images, split evenly over the ``WORLD_SIZE`` processes
  (a world size that does not divide it is refused). The learning rate is
  therefore the preset's, unchanged: no linear scaling rule is needed because
  the step is the same step. :class:`ShardedBatchSampler` draws each epoch's
  shuffle exactly as the single-process loader does (from the seeded torch RNG
  stream that checkpoints save, a new order every epoch), cuts it into the
  same global batches and gives rank ``r`` the ``r``-th slice of each.
* **Loss.** DDP averages the gradients over ranks, so each rank's loss must be
  normalised by the global batch's count divided by the world size: the number
  of target boxes, as the official DETR does (``num_boxes`` all-reduced in
  ``SetCriterion``), and the class weights of DETR's cross-entropy (the
  official code averages per rank there, which is not the global batch's loss).
  The logged losses are averaged over ranks: rank 0's log is the global batch's.
* **BatchNorm.** A trainable BatchNorm (the book's small backbone) normalises
  with the statistics of the global batch: ``torch.nn.SyncBatchNorm`` on CUDA,
  :class:`CpuSyncBatchNorm2d` on the CPU (PyTorch's works on GPUs only).
  ``FrozenBatchNorm2d`` (ResNet backbones) needs nothing.
* **Files.** Only rank 0 writes the run folder (checkpoints, metrics, the
  command record) and evaluates, on the whole validation split; the other ranks
  wait for it at the next step. Every rank reads ``--resume``'s checkpoint
  (on several machines it must be readable on each), so all continue from the
  same weights, optimiser state and RNG state, hence the same next shuffle.

With dropout, every rank draws its masks from the same RNG stream; the presets
train with dropout 0. A non-finite loss stops the rank that computed it with
:class:`~detr_tutorial.divergence.NonFiniteLossError` (a non-finite gradient,
all-reduced, stops every rank); torchrun then stops the others.
"""
from __future__ import annotations

import datetime
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

__all__ = ["CpuSyncBatchNorm2d", "ShardedBatchSampler", "any_rank", "check_batch_split", "cleanup", "distribute",
           "init_from_env", "is_distributed", "is_main_process", "launched_by_torchrun", "mean_over_ranks",
           "mean_record", "rank", "shard_loader", "sync_batchnorm", "world_size"]

#: how long the other ranks wait at a collective (rank 0's evaluation included) before giving up
TIMEOUT = datetime.timedelta(hours=1)


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (it sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``)."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the group (torchrun's ``WORLD_SIZE`` before :func:`init_from_env`); 1 without torchrun."""
    if is_distributed():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def rank() -> int:
    if is_distributed():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def is_main_process() -> bool:
    """Rank 0: the process that writes files and evaluates."""
    return rank() == 0


def check_batch_split(batch_size: int, world: int) -> int:
    """The per-process batch of a global ``batch_size`` split over ``world`` processes; ValueError if uneven."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"the world size must be an int >= 1, got {world!r}")
    if batch_size % world:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ValueError(f"the global batch size {batch_size} cannot be split evenly over world size {world} "
                         f"(torchrun's --nproc_per_node x --nnodes); choose a world size in {divisors}")
    return batch_size // world


def init_from_env(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL for CUDA, gloo for the CPU) -> this rank's device."""
    if not launched_by_torchrun():
        raise RuntimeError("init_from_env needs torchrun's RANK, LOCAL_RANK and WORLD_SIZE environment variables")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def _on_backend(tensor: Tensor) -> Tensor:
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of ``value`` over all ranks (a detached copy); ``value`` itself when not distributed."""
    if not is_distributed():
        return value
    total = _on_backend(value.detach().clone())
    dist.all_reduce(total)
    return (total / dist.get_world_size()).to(value.device)


def mean_record(record: dict, keep: tuple[str, ...] = ("step", "epoch", "lr")) -> dict:
    """A step's log record with every value but ``keep`` averaged over ranks (the global batch's losses when
    each rank's loss is its share of the global batch's); ``record`` itself when not distributed."""
    if not is_distributed():
        return record
    keys = [k for k in record if k not in keep]
    values = mean_over_ranks(torch.tensor([record[k] for k in keys], dtype=torch.float64))
    return {**record, **dict(zip(keys, values.tolist()))}


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank, so that all ranks take the same branch."""
    if not is_distributed():
        return flag
    count = _on_backend(torch.tensor([int(flag)]))
    dist.all_reduce(count)
    return bool(count.item())


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s slice of each global batch that ``sampler`` and ``batch_size`` make.

    Every rank iterates ``sampler`` (a ``RandomSampler`` draws its seed from the
    global torch RNG, as in one process, so the RNG streams stay aligned), and
    rank 0's order is broadcast so that all ranks cut the same batches whatever
    their RNG states. ``len``: the number of global batches.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, rank: int, world: int) -> None:
        check_batch_split(batch_size, world)
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.rank, self.world = rank, world
        n = len(sampler)
        if not drop_last and 0 < n % batch_size < world:
            raise ValueError(f"the last batch of {n % batch_size} images cannot give each of {world} ranks one; "
                             f"use drop_last=True or another batch size")

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        if is_distributed():
            shared = _on_backend(order)
            dist.broadcast(shared, src=0)
            order = shared.cpu()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield torch.tensor_split(order[start:start + self.batch_size], self.world)[self.rank].tolist()


def shard_loader(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """``loader`` (batches of the global size) as rank ``rank`` of ``world`` sees it: the same dataset,
    collate function and workers, and the slices of :class:`ShardedBatchSampler`."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError(f"loader must be a DataLoader with a batch_size, got {type(loader).__name__}")
    batches = ShardedBatchSampler(loader.sampler, loader.batch_size, loader.drop_last, rank, world)
    return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients over ranks too (each rank's output feeds its loss)."""

    @staticmethod
    def forward(ctx, value: Tensor) -> Tensor:
        total = value.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises with the statistics of the global batch across ranks, on any device.

    Two differentiable all-reduces per layer in training (the sum, then the sum of
    squared deviations from the global mean); their backward sums the gradients
    over ranks, so that after DDP's averaging every rank holds the gradient of
    the global batch's loss. Outside training or a process group it is BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W)
        if not (self.training and is_distributed()):
            return super().forward(x)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        count = mean_over_ranks(count) * dist.get_world_size()  # N: the global batch's values per channel
        mean = _SumOverRanks.apply(x.sum((0, 2, 3))) / count  # (C,)
        centred = x - mean[None, :, None, None]
        var = _SumOverRanks.apply(centred.pow(2).sum((0, 2, 3))) / count  # (C,), biased as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = 1 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1), factor)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        return out * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every trainable ``nn.BatchNorm2d`` synchronised across ranks (weights and buffers kept):
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm2d` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = CpuSyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
            # the same tensors, not copies: the optimiser holds these parameters
            synced.weight, synced.bias = child.weight, child.bias
            synced.running_mean, synced.running_var = child.running_mean, child.running_var
            synced.num_batches_tracked = child.num_batches_tracked
            synced.train(child.training)
            setattr(model, name, synced)
        else:
            sync_batchnorm(child, device)
    return model


def distribute(trainer, device: Optional[torch.device] = None) -> None:
    """Make ``trainer`` (a :class:`~detr_tutorial.engine.Trainer` whose loader yields global batches) train
    as one rank of the process group: DDP with synchronised BatchNorm, its slice of each batch, and on
    ranks other than 0 no files, no evaluation and no progress bars. Call after loading a checkpoint."""
    if not is_distributed():
        raise RuntimeError("distribute needs a process group: call init_from_env first (under torchrun)")
    device = trainer.device if device is None else device
    trainer.train_loader = shard_loader(trainer.train_loader, dist.get_rank(), dist.get_world_size())
    model = sync_batchnorm(trainer.model, device)
    trainer.forward_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if not is_main_process():
        trainer.out_dir, trainer.val_loader, trainer.progress = None, None, False

