"""Training configuration: small dataclasses, one definition per method (the single source of defaults).

``method_config(name)`` returns the :class:`MethodConfig` of a CLI method; ``TrainConfig`` adds the
run-level settings (data, network, seed, device). ``TrainConfig.to_dict()`` is the resolved config written
next to the checkpoints (inherited settings filled in, :meth:`MethodConfig.resolved`), and
``TrainConfig.from_dict`` reads it back. :func:`preprocessing_for` gives a datalist's preprocessing for a
network from its registered defaults. Loads without torch (the CLI imports it to build its parser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medimb.data import Preprocessing


@dataclass
class Stage1Config:
    """Stage 1: representation + classifier, instance-balanced sampling.

    loss: a ``medimb.losses.create_loss`` name; metric_loss: a ``create_metric_loss`` name or None;
    ``L = L_cls + metric_weight * L_metric``. key_metric selects the best epoch on validation.

    The small-data recipe (docs/training.md): AdamW at ``lr`` with a linear warm-up over ``warmup_epochs``
    (from 0.1 x lr) into a cosine decay to 0 (:func:`medimb.training.engines.warmup_cosine_scheduler`), gradient
    norms clipped at ``grad_clip_norm`` (None: off), and at least ``min_steps_per_epoch`` optimiser steps per
    epoch: with fewer than ``batch_size * min_steps_per_epoch`` training items the batch shrinks to
    ``ceil(items / min_steps_per_epoch)`` and the learning rate with its square root (:meth:`batch_and_lr`).
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3  # at batch_size; scaled by sqrt(batch / batch_size) when a small training set shrinks the batch
    weight_decay: float = 1e-4
    warmup_epochs: int = 3
    grad_clip_norm: float | None = 1.0
    min_steps_per_epoch: int = 4
    loss: str = "ce"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    metric_loss: str | None = None
    metric_kwargs: dict[str, Any] = field(default_factory=dict)
    metric_weight: float = 0.1
    key_metric: str = "balanced_accuracy"
    early_stop_patience: int | None = None
    drw_start: float | None = None  # LDAM-DRW: class re-weighting from this fraction of the epochs on

    def batch_and_lr(self, n_train: int) -> tuple[int, float]:
        """The batch size and learning rate used for ``n_train`` training items (see the class docstring)."""
        return small_data_batch_and_lr(n_train, self.batch_size, self.lr, self.min_steps_per_epoch, scale_lr=True)


@dataclass
class Stage2Config:
    """Stage 2: frozen backbone, classifier re-balancing (Kang et al., ICLR 2020).

    rebalance: ``crt`` (re-initialised head, class-balanced re-training), ``lws`` (learnable per-class
    scales, class-balanced) or ``tau_norm`` (``w / ||w||^tau``, tau picked on validation from ``taus``).
    loss_kwargs: None inherits stage 1's when stage 2 trains the same loss (so a stage-1 CMSL margin holds
    in stage 2 too), else none; a dict (even ``{}``) overrides. Resolved by :meth:`MethodConfig.resolved`;
    a Stage2Config used on its own treats None as no kwargs.

    min_steps_per_epoch: with fewer than ``batch_size * min_steps_per_epoch`` training items the batch
    shrinks to ``ceil(items / min_steps_per_epoch)`` (the learning rate stays: a re-initialised head needs
    enough steps to move away from its random start; the frozen backbone's BatchNorm does not mind small
    batches).
    """

    rebalance: str = "crt"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_steps_per_epoch: int = 8
    loss: str = "ce"
    loss_kwargs: dict[str, Any] | None = None
    taus: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    key_metric: str = "balanced_accuracy"

    def batch_and_lr(self, n_train: int) -> tuple[int, float]:
        """The batch size and learning rate used for ``n_train`` training items (see the class docstring)."""
        return small_data_batch_and_lr(n_train, self.batch_size, self.lr, self.min_steps_per_epoch, scale_lr=False)


def small_data_batch_and_lr(n_train: int, batch_size: int, lr: float, min_steps_per_epoch: int,
                            scale_lr: bool) -> tuple[int, float]:
    """``(batch, lr)`` giving at least ``min_steps_per_epoch`` optimiser steps per epoch over ``n_train`` items:
    ``batch = min(batch_size, max(2, ceil(n_train / min_steps_per_epoch)))`` (2: BatchNorm needs two samples),
    and ``lr * sqrt(batch / batch_size)`` when ``scale_lr`` (Adam's square-root scaling rule). Training sets of
    ``batch_size * min_steps_per_epoch`` items or more are unaffected."""
    if min_steps_per_epoch < 1 or n_train < 1:
        return batch_size, lr
    batch = min(batch_size, max(2, math.ceil(n_train / min_steps_per_epoch)))
    return batch, (lr * math.sqrt(batch / batch_size) if scale_lr and batch < batch_size else lr)


@dataclass
class MethodConfig:
    """One CLI method: classifier head, stage 1 and (for two-stage methods) stage 2."""

    name: str
    description: str
    head: str = "linear"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config | None = None

    def resolved(self) -> MethodConfig:
        """A copy with the inherited settings filled in (the one place they are resolved): stage 2's
        ``loss_kwargs`` are a copy of stage 1's when it trains the same loss and sets none, else ``{}``.
        Training runs this and config.json records it."""
        m = _copy_method(self)
        s2 = m.stage2
        if s2 is not None and s2.loss_kwargs is None:
            same = s2.loss.replace("-", "_") == m.stage1.loss.replace("-", "_")
            s2.loss_kwargs = dict(m.stage1.loss_kwargs) if same else {}
        return m


def _two_stage(name: str, description: str, metric: str | None, **stage1: Any) -> MethodConfig:
    return MethodConfig(
        name=name,
        description=description,
        stage1=Stage1Config(metric_loss=metric, key_metric="auc", **stage1),
        stage2=Stage2Config(rebalance="crt"),
    )


#: every CLI method, defined once
METHODS: dict[str, MethodConfig] = {
    m.name: m
    for m in (
        MethodConfig("ce", "cross-entropy, instance-balanced sampling (the plain baseline)"),
        MethodConfig("weighted-ce", "cross-entropy with inverse-frequency class weights",
                     stage1=Stage1Config(loss="weighted-ce")),
        MethodConfig("focal", "focal loss (gamma 2): down-weights easy, mostly majority examples",
                     stage1=Stage1Config(loss="focal")),
        # LDAM's scale is the cosine head's (medimb.training.losses.build_classification_loss)
        MethodConfig("ldam-drw", "LDAM margins (larger for rare classes) with deferred re-weighting",
                     head="cosine", head_kwargs={"scale": 30.0},
                     stage1=Stage1Config(loss="ldam", drw_start=0.8)),
        MethodConfig("balanced-softmax", "balanced softmax: logits shifted by log class priors in training",
                     stage1=Stage1Config(loss="balanced-softmax")),
        _two_stage("crt", "two-stage: CE stage 1, classifier re-training with class-balanced sampling", None),
        _two_stage("two-stage-triplet", "two-stage: CE + triplet (batch-hard mining) stage 1, cRT stage 2",
                   "triplet"),
        _two_stage("two-stage-supcon", "two-stage: CE + supervised contrastive stage 1, cRT stage 2", "supcon"),
        # margin 0: it won every validation sweep of s and m (docs/benchmarks.md, "Sweeps")
        MethodConfig("cmsl", "Cosine Margin Sigmoid Loss on an L2-normalised cosine head",
                     head="cmsl", stage1=Stage1Config(loss="cmsl", loss_kwargs={"margin": 0.0})),
        MethodConfig("cmsl-two-stage", "CMSL + supervised contrastive stage 1, cRT of the CMSL head in stage 2",
                     head="cmsl",
                     stage1=Stage1Config(loss="cmsl", loss_kwargs={"margin": 0.0}, metric_loss="supcon",
                                         key_metric="auc"),
                     stage2=Stage2Config(rebalance="crt", loss="cmsl")),
    )
}
# The recommended default (see docs/training.md for the measurement behind the choice).
METHODS["two-stage"] = replace(
    METHODS["two-stage-supcon"],
    name="two-stage",
    description="recommended: CE + supervised contrastive stage 1, cRT stage 2",
)


#: stage-1 losses whose head models the class-balanced posterior (inverse-frequency weights; balanced
#: softmax trains with the log-prior shift and predicts without it)
_BALANCING_LOSSES = ("weighted-ce", "balanced-softmax")


def head_prior(method: MethodConfig, class_counts: Sequence[int]) -> float | None:
    """The positive-class prior a binary model's final head is fitted under: the threshold of the
    ``"prior"`` operating point (:mod:`medimb.evaluation.operating_point`). ``class_counts``: the
    training split's (negatives, positives).

    0.5 after a stage 2 that re-trains the head with class-balanced sampling (cRT, LWS); otherwise
    :func:`loss_prior` of stage 1. None where no single prior describes the head (tau-normalisation and
    the losses :func:`loss_prior` names) and for multi-class models.
    """
    s2 = method.stage2
    if s2 is None:
        return loss_prior(method.stage1.loss, class_counts, method.head)
    binary = len(class_counts) == 2 and min(class_counts) > 0
    return 0.5 if binary and s2.rebalance in ("crt", "lws") and s2.loss in ("ce", "cmsl") else None


def require_head_prior(method: MethodConfig) -> None:
    """:class:`~medimb.errors.UserError` when a binary model of ``method`` has no head prior, so the
    ``"prior"`` operating point cannot apply (checked before anything is trained or written)."""
    if head_prior(method, [1, 1]) is None:
        from medimb.errors import UserError

        raise UserError(f"--operating-point prior: the head of method {method.name!r} is fitted under no single "
                        "class prior (tau-norm, focal, LDAM-DRW, single-stage CMSL); use balanced_accuracy")


def loss_prior(loss: str, class_counts: Sequence[int], head: str = "linear") -> float | None:
    """The positive-class prior of a binary head trained with ``loss`` on instance-sampled data: the
    training positive fraction for plain CE on a linear head (a metric-learning term does not touch the
    head), 0.5 for the balancing losses (weighted CE, balanced softmax), None for the rest (focal, LDAM,
    CMSL: no single prior describes their probabilities) and for multi-class models."""
    if len(class_counts) != 2 or min(class_counts) <= 0:
        return None
    loss = loss.replace("_", "-")
    if loss in _BALANCING_LOSSES:
        return 0.5
    if loss == "ce" and head == "linear":
        return class_counts[1] / sum(class_counts)
    return None


def method_config(name: str) -> MethodConfig:
    """A copy of the :class:`MethodConfig` registered as ``name``."""
    try:
        m = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
    return _copy_method(m)


def _copy_method(m: MethodConfig) -> MethodConfig:
    d = asdict(m)
    s2 = d.pop("stage2")
    return MethodConfig(
        **{k: v for k, v in d.items() if k != "stage1"},
        stage1=Stage1Config(**d["stage1"]),
        stage2=Stage2Config(**{**s2, "taus": tuple(s2["taus"])}) if s2 else None,
    )


@dataclass
class TrainConfig:
    """A whole run. ``network_kwargs`` go to ``medimb.networks.create_model`` (e.g. ``widths``).

    ``method`` is stored resolved (:meth:`MethodConfig.resolved`, a copy): set the method's stage-1 settings
    before making the TrainConfig for stage 2 to inherit them.
    """

    data: str
    out: str
    method: MethodConfig
    network: str = "cpunet"
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    cache: str = "memory"
    num_workers: int = 0
    spatial_size: tuple[int, ...] | None = None
    slices: int | None = None
    flip_tta: bool = True  # final metrics average predictions over flips (when training flips; see predict)

    def __post_init__(self) -> None:
        self.method = self.method.resolved()

    def to_dict(self) -> dict:
        """The resolved configuration (:meth:`MethodConfig.resolved`), as config.json records it."""
        return {**asdict(self), "method": asdict(self.method.resolved())}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        method = d.pop("method")
        method = _copy_method(method) if isinstance(method, MethodConfig) else _method_from_dict(method)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}")
        if d.get("spatial_size") is not None:
            d["spatial_size"] = tuple(d["spatial_size"])
        return cls(method=method, **d)


def _method_from_dict(d: dict) -> MethodConfig:
    d = dict(d)
    s1 = Stage1Config(**d.pop("stage1"))
    s2 = d.pop("stage2")
    s2 = Stage2Config(**{**s2, "taus": tuple(s2["taus"])}) if s2 else None
    return MethodConfig(**d, stage1=s1, stage2=s2)


def preprocessing_for(network: str, train_items: Sequence[dict], spatial_size: Sequence[int] | None = None,
                      slices: int | None = None, **overrides: Any) -> Preprocessing:
    """A datalist's preprocessing for ``network`` (training, the CLI and the bundles call this):
    :func:`medimb.data.datasets.default_nifti_preprocessing` of ``train_items`` (datalist items, ``image`` a list
    of paths) at the network's registered defaults (:func:`medimb.networks.backbone_defaults`) for whatever is
    not given: the input size, the orientation and, for 2.5D backbones, the slab of K slices.

    ``spatial_size`` is in the axis order of the orientation (RAS); for 2.5D its first two entries are the
    in-plane size. ``slices`` with a 3D network feeds it the ``(C, K, X, Y)`` slab as a volume.
    ``overrides``: other :class:`~medimb.data.Preprocessing` fields, e.g. ``channel_wise=True`` (bundles:
    ``--preprocessing#channel_wise true``).

    The channel names of the items (``"channel_names"``: the datalist's ``"channels"``, e.g. ``phase-00`` ...
    ``phase-03``, as :func:`medimb.data.datalist.read_datalist` attaches them) are recorded as
    ``channels``, so that the checkpoint says which phases/kinds its network takes (``medimb predict``).
    """
    from dataclasses import replace

    from medimb.data.datasets import default_nifti_preprocessing
    from medimb.networks import backbone_defaults

    defaults = backbone_defaults(network)
    size = tuple(spatial_size) if spatial_size else defaults.default_size
    pre = default_nifti_preprocessing(train_items, size, slices or defaults.slices, orientation=defaults.orientation)
    names = train_items[0].get("channel_names") if train_items else None
    if names and len(names) == pre.in_channels and "channels" not in overrides:
        overrides["channels"] = tuple(str(n) for n in names)
    return replace(pre, **overrides) if overrides else pre
