"""medimb.training: the two-stage workflow on ``monai.engines``.

Public pieces (also usable from bundle JSON with ``_target_``): :class:`Stage1Trainer`,
:class:`Stage2Trainer`, :func:`prepare_stage2`, :func:`create_evaluator`, :class:`ImbalanceMetric`,
:func:`build_stage1_loss`, the configs (:class:`TrainConfig`, :func:`method_config`) and :func:`train`.
"""

from medimb.training.config import METHODS, MethodConfig, Stage1Config, Stage2Config, TrainConfig, method_config
from medimb.training.engines import (
    AugmentingPrepareBatch,
    ForwardAllInferer,
    ImbalanceMetric,
    OutputsLoss,
    Stage1Trainer,
    Stage2Trainer,
    create_evaluator,
    labels_prepare_batch,
    prepare_stage2,
    trainable_parameters,
)
from medimb.training.losses import build_classification_loss, build_stage1_loss, drw_schedule
from medimb.training.workflow import predict, run_stage1, run_stage2, train

__all__ = [
    "METHODS", "AugmentingPrepareBatch", "ForwardAllInferer", "ImbalanceMetric", "MethodConfig", "OutputsLoss",
    "Stage1Config", "Stage1Trainer", "Stage2Config", "Stage2Trainer", "TrainConfig", "build_classification_loss",
    "build_stage1_loss", "create_evaluator", "drw_schedule", "labels_prepare_batch", "method_config", "predict",
    "prepare_stage2", "run_stage1", "run_stage2", "train", "trainable_parameters",
]
