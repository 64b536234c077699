"""The model wrapper (the contract in docs/architecture.md) and its factory.

``create_model(name, in_channels=..., num_classes=..., head=...)`` builds backbone + embedding head +
classifier head; ``model.config`` rebuilds the same architecture with ``create_model(**model.config)``,
including a stage-2 head swapped in by :func:`rebalance_classifier`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import medimb.networks.backbones  # noqa: F401  (registers the backbones)
import medimb.networks.slices  # noqa: F401
from medimb.networks.backbones import Backbone
from medimb.networks.heads import HEADS, EmbeddingHead, LWSHead, TauNormHead, create_head
from medimb.networks.registry import backbone_defaults, get_backbone_builder

DEFAULT_MODEL = "cpunet"
REBALANCE_METHODS = ("crt", "lws", "tau_norm")


class ImbalanceClassifier(nn.Module):
    """Backbone -> pooled features -> classifier head (logits) and embedding head (metric losses).

    Shapes: input ``(B, C, *S)``; feature map ``(B, F, *S')``; features ``(B, F)``; logits ``(B, K)``;
    embedding ``(B, E)`` L2-normalised. ``classifier.weight`` is ``(K, F)``.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, embedding: nn.Module, config: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.embedding = embedding
        self._config = config
        self.backbone_frozen = False
        if config["channels_last"]:
            self.backbone.to(memory_format=self._memory_format)

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the arguments that rebuild this architecture: ``create_model(**model.config)``."""
        return copy.deepcopy(self._config)

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self._config["spatial_dims"] == 3 else torch.channels_last

    def _check_input(self, x: torch.Tensor) -> None:
        expected = 2 + self._config["spatial_dims"]
        if x.ndim != expected or x.shape[1] != self._config["in_channels"]:
            raise ValueError(
                f"{self._config['name']} expects input (B, {self._config['in_channels']}, "
                f"{'D, H, W' if expected == 5 else 'H, W'}), got shape {tuple(x.shape)}"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, F, *S')`` last convolutional feature map, ReLU applied."""
        self._check_input(x)
        if self._config["channels_last"]:
            x = x.contiguous(memory_format=self._memory_format)
        return self.backbone(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *S)`` -> the backbone's feature map at the end of each resolution level, finest first
        (``(B, F_l, *S_l)``, ReLU applied; the last is :meth:`forward_features`); ``NotImplementedError`` for
        backbones that do not expose them (``Backbone.forward_stages``)."""
        self._check_input(x)
        if self._config["channels_last"]:
            x = x.contiguous(memory_format=self._memory_format)
        return self.backbone.forward_stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, K)`` logits (``s * cos`` for cosine/CMSL heads)."""
        return self.classifier(self.backbone.pool(self.forward_features(x)))

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C, *S) ->`` ``{"logits": (B, K), "features": (B, F), "embedding": (B, E), "feature_map": (B, F, *S')}``."""
        feature_map = self.forward_features(x)
        features = self.backbone.pool(feature_map)
        return {
            "logits": self.classifier(features),
            "features": features,
            "embedding": self.embedding(features),
            "feature_map": feature_map,
        }

    def train(self, mode: bool = True) -> "ImbalanceClassifier":
        """As ``nn.Module.train``, but a frozen backbone/embedding stays in eval mode (BN stats fixed)."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
            self.embedding.eval()
        return self

    def _set_classifier(self, head: nn.Module) -> None:
        self.classifier = head
        self._config["head"] = head.head_type
        self._config["head_kwargs"] = head.head_kwargs()


def create_model(
    name: str = DEFAULT_MODEL,
    *,
    in_channels: int,
    num_classes: int,
    spatial_dims: int = 3,
    head: str = "linear",
    head_kwargs: dict[str, Any] | None = None,
    embedding_dim: int = 128,
    channels_last: bool | None = None,
    global_pool: str = "avg",
    **kwargs: Any,
) -> ImbalanceClassifier:
    """Build a classifier from the backbone registered as ``name`` (see :func:`list_models`).

    Args:
        name: backbone name, e.g. ``"cpunet"`` (default, CPU-aware), ``"resnet18"``, ``"densenet121"``,
            ``"slice_pool"`` (2.5D).
        in_channels: C, input channels (e.g. DCE phases).
        num_classes: K >= 2.
        spatial_dims: 2 or 3 (2.5D backbones take 3D input).
        head: ``"linear"``, ``"cosine"``, ``"cmsl"``, ``"lws"`` or ``"tau_norm"``.
        head_kwargs: passed to the head, e.g. ``{"scale": 16.0}`` for cosine/CMSL.
        embedding_dim: E, size of the L2-normalised embedding for metric losses.
        channels_last: run the backbone in channels-last memory format; ``None`` takes the backbone's
            preference (on for ``cpunet``, where it was measured faster on CPU).
        global_pool: how the feature map becomes the feature vector: ``"avg"`` (default), ``"max"`` or
            ``"avgmax"`` (see ``medimb.networks.backbones.GLOBAL_POOLS``); recorded in ``config``
            when not the default. Backbones with their own pooling (``slice_pool``) accept only ``"avg"``.
        **kwargs: backbone arguments, e.g. ``widths=(24, 48, 96)``, over the backbone's registered
            ``default_kwargs`` (:func:`medimb.networks.backbone_defaults`).
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if head not in HEADS:
        raise KeyError(f"unknown head {head!r}; known: {', '.join(sorted(HEADS))}")
    kwargs = {**backbone_defaults(name).default_kwargs, **kwargs}
    backbone = get_backbone_builder(name)(in_channels, spatial_dims, **kwargs)
    if global_pool != "avg":
        if type(backbone).pool is not Backbone.pool:
            raise ValueError(f"{name} pools its feature map its own way; global_pool={global_pool!r} does not apply")
        backbone.set_global_pool(global_pool)
    classifier = create_head(head, backbone.num_features, num_classes, **(head_kwargs or {}))
    embedding = EmbeddingHead(backbone.num_features, embedding_dim)
    if channels_last is None:
        channels_last = bool(getattr(backbone, "prefers_channels_last", False))
    config = {
        "name": name,
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "spatial_dims": int(spatial_dims),
        "head": head,
        "head_kwargs": classifier.head_kwargs(),
        "embedding_dim": int(embedding_dim),
        "channels_last": bool(channels_last),
        **({"global_pool": global_pool} if global_pool != "avg" else {}),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
    }
    return ImbalanceClassifier(backbone, classifier, embedding, config)


def freeze_backbone(model: ImbalanceClassifier) -> ImbalanceClassifier:
    """Stage 2: freeze backbone and embedding head (no grad, BatchNorm kept in eval mode).

    The running statistics and weights then stay bit-identical however long the classifier
    trains; ``model.train()`` keeps the frozen parts in eval mode. Returns ``model``.
    """
    return _set_backbone_frozen(model, True)


def unfreeze_backbone(model: ImbalanceClassifier) -> ImbalanceClassifier:
    """Undo :func:`freeze_backbone`."""
    return _set_backbone_frozen(model, False)


def _set_backbone_frozen(model: ImbalanceClassifier, frozen: bool) -> ImbalanceClassifier:
    for part in (model.backbone, model.embedding):
        for param in part.parameters():
            param.requires_grad_(not frozen)
    model.backbone_frozen = frozen
    model.train(model.training)  # re-applies the eval-mode rule for frozen BatchNorm
    return model


def rebalance_classifier(model: ImbalanceClassifier, method: str, **kwargs: Any) -> nn.Module:
    """Swap in a stage-2 classifier (Kang et al. 2020) and record it in ``model.config``.

    - ``"crt"``: a freshly initialised head of the same type and settings (retrain it with
      class-balanced sampling); ``kwargs`` override the head settings.
    - ``"lws"``: :class:`LWSHead` from the current head (weights frozen, per-class scales learnable).
    - ``"tau_norm"``: :class:`TauNormHead` from the current linear head, ``tau=`` (default 1.0).

    Returns the new head (on the old head's device and dtype); its parameters that should be
    trained are the ones with ``requires_grad``.
    """
    old = model.classifier
    weight = old.weight
    if method == "crt":
        if old.head_type not in ("linear", "cosine", "cmsl"):
            raise TypeError(f"cRT re-initialises the stage-1 head; the current head is {old.head_type!r}")
        new = create_head(old.head_type, weight.shape[1], weight.shape[0], **{**old.head_kwargs(), **kwargs})
        new.to(weight.device, weight.dtype)
    elif method == "lws":
        new = LWSHead.from_head(old, **kwargs)
    elif method == "tau_norm":
        new = TauNormHead.from_head(old, **kwargs)
    else:
        raise ValueError(f"method must be one of {REBALANCE_METHODS}, got {method!r}")
    model._set_classifier(new)
    return new


def _activation_of(model_or_head: nn.Module | str) -> str:
    if isinstance(model_or_head, str):
        if model_or_head in ("softmax", "sigmoid"):
            return model_or_head
        if model_or_head in HEADS:
            return HEADS[model_or_head].activation
        raise ValueError(f"unknown head type {model_or_head!r}; known: {', '.join(sorted(HEADS))}")
    head = getattr(model_or_head, "classifier", model_or_head)
    if not hasattr(head, "activation"):
        raise TypeError(f"cannot tell the activation of {type(head).__name__}")
    return head.activation


def predict_proba(model_or_head: nn.Module | str, logits: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``(B, K)`` logits -> ``(B, K)`` class probabilities for a model, head, head type or activation.

    Softmax heads (linear, tau-norm, LWS on linear, cosine): ``softmax(logits)``. Sigmoid heads (CMSL):
    ``sigmoid(s * cos)`` one-vs-rest, and with ``normalize=True`` (default) divided by their sum so
    rows sum to 1 (needed for ranking classes, argmax, multi-class AUC and calibration); the
    un-normalised one-vs-rest scores come with ``normalize=False``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    if _activation_of(model_or_head) == "softmax":
        return torch.softmax(logits, dim=1)
    proba = torch.sigmoid(logits)
    if normalize:
        # sigmoids can all underflow to 0 at large s; clamp so the division stays finite
        proba = proba / proba.sum(dim=1, keepdim=True).clamp_min(torch.finfo(proba.dtype).tiny)
    return proba


def feature_map_size(model: ImbalanceClassifier, input_size: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial size ``S'`` of the last feature map ``(B, F, *S')`` for inputs of spatial size ``S``.

    Shape inference only: a copy of the architecture (``model.config``) runs on the ``meta`` device, so
    nothing is computed or allocated. Raises the network's own error when it cannot take that size at all.
    """
    config = model.config
    with torch.device("meta"):
        probe = create_model(**config).eval()
    with torch.no_grad():
        x = torch.empty(1, config["in_channels"], *input_size, device="meta")
        return tuple(int(s) for s in probe.forward_features(x).shape[2:])


def downsampling_factor(model: ImbalanceClassifier, input_size: tuple[int, ...]) -> tuple[int, ...] | None:
    """Per spatial axis, how many input voxels one feature-map voxel spans (``S / S'`` on a large input,
    64 times ``input_size``); ``None`` for networks that take only one size along some axis (e.g. the fixed
    slice count of ``slice_channels``)."""
    big = tuple(int(s) * 64 for s in input_size)
    try:
        fmap = feature_map_size(model, big)
    except (RuntimeError, ValueError):
        return None
    return tuple(max(1, round(b / f)) for b, f in zip(big, fmap))
