"""MONAI engines for the two stages, instantiable with plain keyword arguments (also from bundle JSON).

- :class:`Stage1Trainer`: a ``SupervisedTrainer`` whose inferer calls ``model.forward_all`` so the loss
  sees logits **and** embeddings: ``loss(logits, embedding, labels)`` for a
  :class:`medimb.losses.Stage1Loss`, ``loss(logits, labels)`` for a plain classification loss.
- :func:`prepare_stage2` + :class:`Stage2Trainer`: frozen backbone, re-balanced classifier head (cRT/LWS),
  trained with class-balanced sampling; only the head's parameters are optimised.
- :func:`create_evaluator`: a ``SupervisedEvaluator`` whose key metric is an imbalance-aware metric
  (balanced accuracy or AUC, :class:`ImbalanceMetric`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys
from torch import nn

from medimb.losses import Stage1Loss
from medimb.training.handlers import GradientClipping
from medimb.networks import freeze_backbone, predict_proba, rebalance_classifier

KEY_METRICS = ("balanced_accuracy", "auc", "macro_f1", "accuracy")


class ForwardAllInferer(Inferer):
    """Inferer returning ``network.forward_all(x)``: ``{"logits": (B, K), "embedding": (B, E), ...}``."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict:
        return network.forward_all(inputs)


class OutputsLoss(nn.Module):
    """Adapts a classification or stage-1 loss to the ``forward_all`` output dict.

    ``loss(logits, embedding, labels)`` when ``uses_embedding`` (a :class:`medimb.losses.Stage1Loss`
    with a metric term), else ``loss(logits, labels)``. Labels (B,) or (B, 1) -> (B,) long.
    """

    def __init__(self, loss: nn.Module | Callable, uses_embedding: bool | None = None):
        super().__init__()
        self.loss = loss
        if uses_embedding is None:
            uses_embedding = isinstance(loss, Stage1Loss)
        self.uses_embedding = bool(uses_embedding)

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1).long()
        logits = outputs["logits"].float()  # losses in fp32 under AMP
        if self.uses_embedding:
            return self.loss(logits, outputs["embedding"].float(), labels)
        return self.loss(logits, labels)


def labels_prepare_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``(image (B, C, *S), label (B,) long)`` on ``device`` from a collated dict batch."""
    image = batchdata["image"]
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    label = torch.as_tensor(batchdata["label"]).reshape(-1).long()
    return image.to(device, non_blocking=non_blocking), label.to(device, non_blocking=non_blocking)


class AugmentingPrepareBatch:
    """``prepare_batch`` that applies a batch augmentation (e.g. :class:`medimb.data.BatchAugmentation`)
    on the device after moving the batch there."""

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.augment = augment

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image, label = labels_prepare_batch(batchdata, device, non_blocking)
        if self.augment is not None:
            image = self.augment(image)
        return image, label


class Stage1Trainer(SupervisedTrainer):
    """Stage 1: instance-balanced sampling, classification (+ metric) loss over ``forward_all``.

    Takes the keyword arguments of ``monai.engines.SupervisedTrainer``; ``loss_function`` is either a
    :class:`medimb.losses.Stage1Loss` ``(logits, embedding, labels)`` or a plain ``(logits, labels)`` loss.
    ``grad_clip_norm``: clip the gradient norm to it before every optimiser step
    (:class:`medimb.training.handlers.GradientClipping`); None or 0: no clipping.
    """

    def __init__(self, *, loss_function: Callable, grad_clip_norm: float | None = None, **kwargs: Any):
        kwargs.setdefault("prepare_batch", labels_prepare_batch)
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("optim_set_to_none", True)
        if kwargs.get("amp") and torch.device(kwargs.get("device", "cpu")).type != "cuda":
            kwargs["amp"] = False  # MONAI's AMP path is CUDA autocast
        kwargs.setdefault("inferer", ForwardAllInferer())  # a bundle's train#inferer may pass its own
        super().__init__(loss_function=OutputsLoss(loss_function), **kwargs)
        if grad_clip_norm:
            GradientClipping(grad_clip_norm).attach(self)


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0,
                            start_factor: float = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """Epoch-level learning-rate schedule (step it once per epoch, e.g. ``monai.handlers.LrScheduleHandler``):
    a linear warm-up from ``start_factor * lr`` to ``lr`` over ``warmup_epochs``, then a cosine decay to 0 over
    the remaining epochs; with ``warmup_epochs=0`` plain ``CosineAnnealingLR(T_max=epochs)``. The warm-up is
    at most ``epochs - 1`` epochs. A torch ``SequentialLR`` of ``LinearLR`` and ``CosineAnnealingLR``, whose
    ``state_dict`` resumes it exactly.
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    epochs = max(1, int(epochs))
    warmup = max(0, min(int(warmup_epochs), epochs - 1))
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=epochs)
    return SequentialLR(optimizer, [LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup),
                                    CosineAnnealingLR(optimizer, T_max=epochs - warmup)], milestones=[warmup])


def prepare_stage2(network: nn.Module, rebalance: str = "crt", **head_kwargs: Any) -> nn.Module:
    """Freeze backbone + embedding (BN in eval mode) and swap in the stage-2 head; returns ``network``.

    ``rebalance``: ``"crt"`` (re-initialised head of the stage-1 type), ``"lws"`` (learnable per-class
    scales) or ``"tau_norm"`` (no training; ``tau=``).
    """
    freeze_backbone(network)
    rebalance_classifier(network, rebalance, **head_kwargs)
    return network


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (after :func:`prepare_stage2`: the head only)."""
    return [p for p in network.parameters() if p.requires_grad]


class Stage2Trainer(SupervisedTrainer):
    """Stage 2: trains the re-balanced head of a network prepared by :func:`prepare_stage2`.

    Plain ``(logits, labels)`` loss, usually CE with a class-balanced sampler (Kang et al., ICLR 2020).
    Raises if the backbone is not frozen, so stage 2 can never change the representation.
    ``grad_clip_norm`` as for :class:`Stage1Trainer` (None: no clipping; what ``medimb train`` uses in stage 2).
    """

    def __init__(self, *, network: nn.Module, loss_function: Callable, grad_clip_norm: float | None = None,
                 **kwargs: Any):
        if not getattr(network, "backbone_frozen", False):
            raise ValueError("stage 2 needs a frozen backbone: call medimb.training.prepare_stage2(network) first")
        kwargs.setdefault("prepare_batch", labels_prepare_batch)
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("optim_set_to_none", True)
        if kwargs.get("amp") and torch.device(kwargs.get("device", "cpu")).type != "cuda":
            kwargs["amp"] = False
        loss = OutputsLoss(loss_function, uses_embedding=False)
        kwargs.setdefault("inferer", ForwardAllInferer())
        super().__init__(network=network, loss_function=loss, **kwargs)
        if grad_clip_norm:
            GradientClipping(grad_clip_norm).attach(self)


class ImbalanceMetric(Metric):
    """Ignite metric over a whole evaluation epoch: collects logits, returns one value of
    :func:`medimb.evaluation.metrics.compute_metrics` (``metric`` = ``balanced_accuracy``, ``auc``, ...).

    ``activation``: the network (its head decides softmax vs sigmoid) or ``"softmax"``/``"sigmoid"``.
    The full metrics dict of the last epoch is kept in ``self.last``.
    """

    def __init__(self, metric: str = "balanced_accuracy", activation: nn.Module | str = "softmax",
                 output_transform: Callable = lambda out: (out[Keys.PRED], out[Keys.LABEL])):
        if metric not in KEY_METRICS:
            raise ValueError(f"key metric must be one of {KEY_METRICS}, got {metric!r}")
        self.metric = metric
        self.activation = activation
        self.last: dict = {}
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, output) -> None:
        logits, labels = output
        self._logits.append(logits.detach().float().cpu())
        self._labels.append(torch.as_tensor(labels).reshape(-1).cpu())

    def compute(self) -> float:
        from medimb.evaluation.metrics import compute_metrics

        logits = torch.cat(self._logits)
        proba = predict_proba(self.activation, logits).numpy()
        self.last = compute_metrics(torch.cat(self._labels).numpy(), proba)
        value = self.last[self.metric]
        return float(value) if value is not None and np.isfinite(value) else 0.0


def create_evaluator(
    network: nn.Module,
    val_data_loader,
    device: str | torch.device = "cpu",
    key_metric: str = "balanced_accuracy",
    amp: bool = False,
    val_handlers: Sequence | None = None,
) -> SupervisedEvaluator:
    """``SupervisedEvaluator`` with key metric ``val_<key_metric>`` computed on logits (B, K)."""
    metric = ImbalanceMetric(key_metric, activation=network)
    return SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=val_data_loader,
        network=network,
        prepare_batch=labels_prepare_batch,
        key_val_metric={f"val_{key_metric}": metric},
        val_handlers=val_handlers,
        amp=bool(amp) and torch.device(device).type == "cuda",
        decollate=False,
    )
