"""Stage-1 metric-learning losses (pytorch-metric-learning) and the combined stage-1 loss.

Metric losses take ``loss(embeddings (B, E), labels (B,))``; embeddings are the model's
L2-normalised ``forward_all(x)["embedding"]``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import nn

from medimb.validation import check_finite, labels_outside

TRIPLET_MINERS = ("batch_hard", "semihard", "all")


def _check_embeddings(embeddings: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if embeddings.ndim != 2 or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{name}: expects embeddings (B, E) and labels (B,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    check_finite(embeddings, name, "embeddings", error=ValueError)


class TripletLoss(nn.Module):
    """Triplet margin loss with mining: ``"batch_hard"`` (hardest positive and negative per anchor,
    pml ``BatchHardMiner``), ``"semihard"`` (pml ``TripletMarginMiner(type_of_triplets="semihard")``)
    or ``"all"`` triplets. Euclidean distance on L2-normalised embeddings.
    A batch without a valid triplet (one class only) gives a zero loss that keeps the graph.
    """

    def __init__(self, margin: float = 0.2, miner: str = "batch_hard") -> None:
        super().__init__()
        if miner not in TRIPLET_MINERS:
            raise ValueError(f"miner must be one of {TRIPLET_MINERS}, got {miner!r}")
        self.margin = float(margin)
        self.miner_name = miner
        self.loss = pml_losses.TripletMarginLoss(margin=margin)
        self.miner = {
            "batch_hard": lambda: pml_miners.BatchHardMiner(),
            "semihard": lambda: pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard"),
            "all": lambda: None,
        }[miner]()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``embeddings (B, E)``, ``labels (B,)`` -> scalar."""
        _check_embeddings(embeddings, labels, type(self).__name__)
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, indices)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020), pml ``SupConLoss`` with temperature ``temperature``."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.loss = pml_losses.SupConLoss(temperature=temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``embeddings (B, E)``, ``labels (B,)`` -> scalar."""
        _check_embeddings(embeddings, labels, type(self).__name__)
        return self.loss(embeddings, labels)


class ClassCentreTripletLoss(nn.Module):
    """Triplets between samples and learnable class centres (the class-centre variant).

    Each sample is an anchor, its own class centre the positive and every other class centre a
    negative: ``relu(d(x, c_y) - d(x, c_k) + margin)`` averaged over the violating triplets (pml
    ``TripletMarginLoss`` with the centres as reference embeddings). Unlike sample triplets it works
    with any batch composition, even a minority sample alone in its batch. The centres
    ``(K, E)`` are L2-normalised parameters: **add this module's parameters to the optimiser**
    (``Stage1Loss.parameters()`` includes them).
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.2) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.margin = float(margin)
        self.centres = nn.Parameter(F.normalize(torch.randn(num_classes, embedding_dim), dim=1))
        self.loss = pml_losses.TripletMarginLoss(margin=margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``embeddings (B, E)``, ``labels (B,)`` -> scalar."""
        _check_embeddings(embeddings, labels, type(self).__name__)
        if embeddings.shape[1] != self.centres.shape[1]:
            raise ValueError(f"ClassCentreTripletLoss: embedding size {embeddings.shape[1]} != {self.centres.shape[1]}")
        num_classes = self.centres.shape[0]
        bad = labels_outside(labels, num_classes)
        if bad:
            raise ValueError(f"ClassCentreTripletLoss: label(s) {bad} outside the class range [0, {num_classes - 1}]")
        centre_labels = torch.arange(num_classes, device=labels.device)
        centres = F.normalize(self.centres, dim=1).to(embeddings.dtype)
        return self.loss(embeddings, labels, ref_emb=centres, ref_labels=centre_labels)


METRIC_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "triplet": TripletLoss,
    "triplet_batch_hard": lambda **kw: TripletLoss(miner="batch_hard", **kw),
    "triplet_semihard": lambda **kw: TripletLoss(miner="semihard", **kw),
    "supcon": SupConLoss,
    "class_centre_triplet": ClassCentreTripletLoss,
}


def create_metric_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a metric loss: ``"triplet"`` (``miner=``), ``"triplet_batch_hard"``, ``"triplet_semihard"``,
    ``"supcon"``, ``"class_centre_triplet"`` (needs ``num_classes`` and ``embedding_dim``)."""
    key = name.replace("-", "_")
    if key not in METRIC_LOSSES:
        raise KeyError(f"unknown metric loss {name!r}; known: {', '.join(sorted(METRIC_LOSSES))}")
    return METRIC_LOSSES[key](**kwargs)


class Stage1Loss(nn.Module):
    """``L = L_cls(logits, labels) + weight * L_metric(embeddings, labels)``.

    ``forward`` returns the total; ``parts`` holds the last ``{"classification", "metric", "total"}``
    as detached scalar tensors for logging (no device sync until you read them). ``metric_loss=None`` or ``weight=0`` skips the metric term (and its cost).
    """

    def __init__(self, classification_loss: nn.Module, metric_loss: nn.Module | None = None, weight: float = 0.5) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.classification_loss = classification_loss
        self.metric_loss = metric_loss
        self.weight = float(weight)
        self.parts: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits (B, K)``, ``embeddings (B, E)``, ``labels (B,)`` -> scalar."""
        classification = self.classification_loss(logits, labels)
        if self.metric_loss is None or self.weight == 0:
            metric = classification.new_zeros(())
            total = classification
        else:
            metric = self.metric_loss(embeddings, labels)
            total = classification + self.weight * metric
        self.parts = {
            "classification": classification.detach(),
            "metric": metric.detach(),
            "total": total.detach(),
        }
        return total
