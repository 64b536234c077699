"""Samplers for the two stages: instance-balanced (stage 1) and class-balanced (stage 2, cRT/LWS).

Both shard across ``num_replicas`` processes (each ``rank`` draws a disjoint, deterministic share) and
reshuffle per epoch through ``set_epoch(epoch)``; they work without an initialised process group.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


class ClassBalancedSampler(Sampler[int]):
    """Draw indices so that every class is drawn with equal probability (Kang et al., ICLR 2020).

    Each draw picks a class uniformly, then an item of that class uniformly (with replacement).
    Per epoch, ``num_samples * num_replicas`` draws are generated from ``seed + epoch``; rank ``r`` takes
    draws ``r, r + num_replicas, ...``, so ranks never share a draw and every run is reproducible.

    Args:
        labels: (N,) class index of every dataset item.
        num_samples: draws per rank per epoch; default ``ceil(N / num_replicas)``.
        num_replicas, rank: distributed sharding (default single process).
        seed: base seed, combined with the epoch set by :meth:`set_epoch`.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        num_samples: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size == 0:
            raise ValueError("ClassBalancedSampler needs at least one label")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.classes = np.unique(labels)
        self.members = [torch.as_tensor(np.flatnonzero(labels == c)) for c in self.classes]
        self.num_samples = int(num_samples) if num_samples else math.ceil(labels.size / num_replicas)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        cls = torch.randint(len(self.members), (total,), generator=g)
        u = torch.rand(total, generator=g, dtype=torch.float64)
        sizes = torch.tensor([len(m) for m in self.members])
        within = (u * sizes[cls]).long().clamp_max(sizes[cls] - 1)
        draws = [int(self.members[c][w]) for c, w in zip(cls.tolist(), within.tolist())]
        return iter(draws[self.rank :: self.num_replicas])


def create_sampler(
    kind: str,
    labels: Sequence[int] | np.ndarray,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
    num_samples: int | None = None,
) -> Sampler[int]:
    """``kind="instance"``: every item once per epoch, shuffled (``DistributedSampler``);
    ``kind="class"``: :class:`ClassBalancedSampler`. Both have ``set_epoch``."""
    if kind == "instance":
        return DistributedSampler(
            range(len(labels)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
    if kind == "class":
        return ClassBalancedSampler(labels, num_samples, num_replicas=num_replicas, rank=rank, seed=seed)
    raise ValueError(f"unknown sampler {kind!r}; choose 'instance' or 'class'")
