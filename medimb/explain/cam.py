"""CAM, Grad-CAM and Grad-CAM++ through ``monai.visualize``, for models following the medimb contract.

MONAI's CAM classes hook a *named* module. A medimb model exposes its last feature map through a
method (``forward_features``), so :class:`FeatureMapClassifier` re-routes the model: the feature map
passes through an ``nn.Identity`` called ``feature_map`` (the hook point), is pooled (the model's
``pool`` when it has one, else the global average) and fed to ``model.classifier``.
:meth:`FeatureMapClassifier.check_matches` verifies on a real input that this gives the model's own
logits, so the gradients Grad-CAM uses are the model's.

Classifier weights for CAM (``CAM_k(i) = w_k . f_i``):
- linear head: the layer's weight and bias (other heads: their ``class_weights()``);
- cosine / CMSL heads (logit ``s * <w_k/|w_k|, f/|f|>``): the L2-normalised class weights, no bias.
  With average pooling ``f = mean_i f_i``, the logit equals ``(s/|f|) * mean_i <w_k/|w_k|, f_i>``, so
  this CAM is the exact per-location decomposition of the logit up to a positive factor.
  With global max pooling (``global_pool="max"``) CAM is no longer a decomposition of the logit (only
  the arg-max location of each channel reaches it); Grad-CAM's gradients follow the model's own pooling.

All maps are rescaled with :func:`medimb.explain.normalize.minmax_per_volume` (1 = attended); MONAI's
default normaliser would invert them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.visualize import CAM, GradCAM, GradCAMpp

from .coam import upsample_to
from .normalize import minmax_per_volume

COSINE_HEADS = ("cosine", "cmsl")


def head_type(model: nn.Module) -> str:
    """The model's head type from ``model.config["head"]`` (``"linear"`` when not recorded)."""
    config = getattr(model, "config", None) or {}
    return str(config.get("head", "linear")).lower()


class FeatureMapClassifier(nn.Module):
    """``model`` re-routed so its last feature map passes through a named module.

    ``forward(x)``: ``(B, C, *S)`` -> logits ``(B, K)`` computed as
    ``model.classifier(pool(feature_map(model.forward_features(x))))``.
    """

    TARGET_LAYER = "feature_map"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.feature_map = nn.Identity()

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, F, *S')`` -> ``(B, F)`` with the model's own pooling when it exposes one, else the mean."""
        for owner in (self.model, getattr(self.model, "backbone", None)):
            pool = getattr(owner, "pool", None)
            if callable(pool):
                return pool(fmap)
        return fmap.flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(self.model.forward_features(x))
        return self.model.classifier(self.pool(fmap))

    def check_matches(self, x: torch.Tensor, atol: float = 1e-4) -> None:
        """Raise ``ValueError`` when the re-routed logits differ from ``model(x)`` on input ``x``."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                ours, theirs = self(x), self.model(x)
        finally:
            self.model.train(was_training)
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=atol, rtol=1e-3):
            raise ValueError(
                "model does not follow the medimb contract: classifier(mean(forward_features(x))) "
                "differs from model(x); CAM/Grad-CAM would explain a different network"
            )


class _LocationClassifier(nn.Module):
    """Applies the class weights used for CAM to one location's feature vector ``(B, F) -> (B, K)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)


def cam_classifier(model: nn.Module) -> _LocationClassifier:
    """The per-location classifier CAM should use for ``model``'s head (see module docstring).

    Uses the head's ``class_weights()`` (the ``(K, F)`` weights it actually applies: normalised for
    cosine/CMSL, tau-normalised, LWS-scaled) when it has one. The bias only shifts the map by a
    constant, which min-max scaling removes, so it is kept only for plain linear heads.
    """
    head = model.classifier
    if callable(getattr(head, "class_weights", None)):
        weight = head.class_weights()
    elif head_type(model) in COSINE_HEADS:
        weight = F.normalize(head.weight, dim=1)
    else:
        weight = head.weight
    bias = None if head_type(model) in COSINE_HEADS else getattr(head, "bias", None)
    return _LocationClassifier(weight, bias)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _MonaiCAMExplainer:
    """Shared call path: MONAI computes the raw map; we upsample and min-max scale it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.wrapped = FeatureMapClassifier(model)

    def _batch_classes(self, x: torch.Tensor, class_idx: int | None) -> list[int] | None:
        return None if class_idx is None else [int(class_idx)] * x.shape[0]

    def compute_map(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` in [0, 1] (:meth:`raw_map`, min-max scaled per volume)."""
        return minmax_per_volume(self.raw_map(x, class_idx))

    def raw_map(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` unscaled map upsampled to the input grid; ``class_idx=None``
        explains the predicted class.

        The model leaves in the mode it came in: MONAI's hooks switch to eval for the map and then restore
        the *wrapper's* mode, which would otherwise put an eval model into training mode (BatchNorm then
        normalises every later input with its own statistics and overwrites the running statistics).
        """
        was_training = self.model.training
        self.wrapped.train(was_training)
        try:
            raw = self.compute_map(x, class_idx).detach().float()
        finally:
            self.wrapped.train(was_training)
        return upsample_to(raw, x.shape[2:])


class CAMExplainer(_MonaiCAMExplainer):
    """Class activation map (Zhou et al. 2016) via ``monai.visualize.CAM``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.location_classifier = cam_classifier(model)
        self.cam = CAM(
            self.wrapped,
            target_layers=FeatureMapClassifier.TARGET_LAYER,
            fc_layers=lambda _module: self.location_classifier,
            upsampler=lambda size: _identity,
            postprocessing=_identity,
        )

    def compute_map(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> raw ``(B, 1, *S')`` map on the feature grid."""
        with torch.no_grad():
            return self.cam.compute_map(x, class_idx=self._batch_classes(x, class_idx))


class GradCAMExplainer(_MonaiCAMExplainer):
    """Grad-CAM (Selvaraju et al.) via ``monai.visualize.GradCAM``; ``plus=True`` gives Grad-CAM++."""

    def __init__(self, model: nn.Module, plus: bool = False) -> None:
        super().__init__(model)
        cls = GradCAMpp if plus else GradCAM
        self.cam = cls(
            self.wrapped,
            target_layers=FeatureMapClassifier.TARGET_LAYER,
            upsampler=lambda size: _identity,
            postprocessing=_identity,
        )

    def compute_map(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> raw ``(B, 1, *S')`` map on the feature grid (needs one backward pass)."""
        # the input needs a graph even when every parameter is frozen
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return self.cam.compute_map(x, class_idx=class_idx)
