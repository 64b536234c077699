"""The evaluation output of a sharded multi-process evaluation (``torchrun``, a bundle's
``multi_gpu_evaluate.json``): every rank evaluates its shard, rank 0 writes the report of the whole split."""

from __future__ import annotations

from typing import Sequence

import torch

from medimb.evaluation.report import EvaluationReport


def interleave(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Undo a ``DistributedSampler(shuffle=False)`` split without padding (MONAI's ``even_divisible=False``):
    rank ``r`` of ``W`` held items ``r, r + W, r + 2W, ...``; ``parts[r]`` is its ``(N_r, ...)`` tensor.
    Returns the ``(sum N_r, ...)`` tensor in dataset order."""
    world, total = len(parts), sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        if len(part) != len(range(rank, total, world)):
            raise ValueError(f"rank {rank} holds {len(part)} of {total} items; expected an unpadded, "
                             "unshuffled DistributedSampler shard (even_divisible=False, shuffle=False)")
    return torch.cat([parts[i % world][i // world].unsqueeze(0) for i in range(total)]) if total else parts[0]


class DistributedEvaluationReport(EvaluationReport):
    """:class:`~medimb.evaluation.report.EvaluationReport` for an evaluator whose loader is sharded across the
    ranks of a process group by ``monai.data.DistributedSampler(shuffle=False, even_divisible=False)``.

    At the end of the epoch every rank's logits ``(N_r, K)`` and labels ``(N_r,)`` are gathered
    (``all_gather_object``) and put back in dataset order (:func:`interleave`), so rank 0 writes metrics.json,
    predictions.csv and the plots of the whole split, with the case ids in their order. Without a process
    group (one process) it is :class:`EvaluationReport`.
    """

    def _write(self, engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            local = (torch.cat(self._logits) if self._logits else torch.zeros(0, 0),
                     torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long))
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            self._logits = [interleave([g[0] for g in gathered])]
            self._labels = [interleave([g[1] for g in gathered])]
        super()._write(engine)
