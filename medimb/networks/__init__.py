"""medimb.networks: backbones (3D, 2.5D), embedding and classifier heads, the model contract.

>>> model = create_model("cpunet", in_channels=1, num_classes=2, head="cmsl")
>>> out = model.forward_all(torch.zeros(2, 1, 28, 28, 28))  # logits, features, embedding, feature_map
"""

from medimb.errors import CheckpointError
from medimb.networks.checkpoint import (
    load_checkpoint,
    read_checkpoint_file,
    save_checkpoint,
    write_checkpoint_file,
)
from medimb.networks.heads import (
    HEADS,
    CMSLHead,
    CosineHead,
    EmbeddingHead,
    LinearHead,
    LWSHead,
    TauNormHead,
    create_head,
    tau_normalize,
)
from medimb.networks.model import (
    DEFAULT_MODEL,
    REBALANCE_METHODS,
    ImbalanceClassifier,
    create_model,
    freeze_backbone,
    predict_proba,
    rebalance_classifier,
    unfreeze_backbone,
)
from medimb.networks.registry import BackboneDefaults, backbone_defaults, list_models, register_backbone

__all__ = [
    "BackboneDefaults", "CMSLHead", "CheckpointError", "CosineHead", "DEFAULT_MODEL", "EmbeddingHead", "HEADS",
    "ImbalanceClassifier", "LWSHead", "LinearHead", "REBALANCE_METHODS", "TauNormHead", "backbone_defaults",
    "create_head", "create_model", "freeze_backbone", "list_models", "load_checkpoint", "predict_proba",
    "read_checkpoint_file", "rebalance_classifier", "register_backbone", "save_checkpoint", "tau_normalize",
    "unfreeze_backbone", "write_checkpoint_file",
]
