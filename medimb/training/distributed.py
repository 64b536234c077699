"""Multi-GPU training with the medimb engines: the process group that ``torchrun`` describes and the DDP
wrapper that keeps the model API (``forward_all``, ``backbone_frozen``) the engines use.
``medimb.runtime.is_main_process`` says which process writes files."""

from __future__ import annotations

import os

from medimb.errors import UserError


def _ddp_classes():
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    class _AllOutputs(nn.Module):
        """``forward(x) = model.forward_all(x)``, so DDP's forward (and its gradient all-reduce) runs it."""

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.forward_all(x)

    class DistributedClassifier(DistributedDataParallel):
        """DDP around a medimb model that keeps the API the medimb engines use.

        ``forward_all(x)`` goes through ``DistributedDataParallel.forward``, so gradients are all-reduced
        (calling ``ddp.module.forward_all`` would silently skip that); ``backbone_frozen`` is the wrapped
        model's, so ``Stage2Trainer`` accepts it. ``ddp(x)`` also returns the ``forward_all`` dict.
        """

        def forward_all(self, x):
            return self(x)

        @property
        def backbone_frozen(self) -> bool:
            return bool(getattr(self.module.model, "backbone_frozen", False))

    return _AllOutputs, DistributedClassifier


def distributed(model, device, find_unused_parameters: bool = True):
    """Wrap ``model`` (already on ``device``) for DistributedDataParallel training with medimb engines.

    Call it after :func:`medimb.training.engines.prepare_stage2` in stage 2: DDP registers the
    parameters that require gradients when it is built. ``find_unused_parameters`` defaults to True
    because ``forward_all`` computes the embedding even when no metric loss uses it.
    """
    import torch

    wrapper_cls, ddp_cls = _ddp_classes()
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return ddp_cls(wrapper_cls(model), device_ids=ids, output_device=ids[0] if ids else None,
                   find_unused_parameters=find_unused_parameters)


def init_distributed() -> dict:
    """Join the process group that ``torchrun`` describes (idempotent); returns ``rank``, ``world_size``,
    ``local_rank``. Backend NCCL with CUDA, gloo otherwise (CPU runs and CI)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise UserError(
                "distributed training needs torchrun: torchrun --nproc_per_node=N -m monai.bundle run --config_file ..."
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0))}


def finish_distributed() -> None:
    """Wait for every rank (rank 0 may still be writing the checkpoint), then leave the process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
