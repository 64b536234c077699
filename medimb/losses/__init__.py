"""medimb.losses: CMSL, stage-1 metric-learning losses, re-balancing baselines.

Classification losses: ``loss(logits (B, K), labels (B,))``; metric losses:
``loss(embeddings (B, E), labels (B,))``; :class:`Stage1Loss` combines one of each.
"""

from medimb.losses.cmsl import CosineMarginSigmoidLoss, cosine_head_scale
from medimb.losses.factory import LOSSES, create_loss
from medimb.losses.metric import (
    METRIC_LOSSES,
    ClassCentreTripletLoss,
    Stage1Loss,
    SupConLoss,
    TripletLoss,
    create_metric_loss,
)
from medimb.losses.rebalancing import (
    CrossEntropyLoss,
    DeferredReweighting,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    class_weights_from_counts,
)

__all__ = [
    "ClassCentreTripletLoss", "CosineMarginSigmoidLoss", "CrossEntropyLoss", "DeferredReweighting", "FocalLoss",
    "LDAMLoss", "LOSSES", "LogitAdjustedLoss", "METRIC_LOSSES", "Stage1Loss", "SupConLoss", "TripletLoss",
    "class_weights_from_counts", "cosine_head_scale", "create_loss", "create_metric_loss",
]
