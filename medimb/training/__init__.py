"""medimb.training: the two-stage recipe on ``monai.engines``.

Public pieces (also usable from bundle JSON with ``_target_``): :class:`Stage1Trainer`,
:class:`Stage2Trainer`, :func:`prepare_stage2`, :func:`create_evaluator`, :class:`ImbalanceMetric`,
:func:`build_stage1_loss`, the handlers (:mod:`medimb.training.handlers`), the configs
(:class:`TrainConfig`, :func:`method_config`) and :func:`train`. Imported on first use (PEP 562), so
``medimb.training.config`` loads without torch.
"""

from medimb.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("METHODS", "MethodConfig", "Stage1Config", "Stage2Config", "TrainConfig", "method_config"),
                    "config"),
    **dict.fromkeys(("AugmentingPrepareBatch", "ForwardAllInferer", "ImbalanceMetric", "OutputsLoss",
                     "Stage1Trainer", "Stage2Trainer", "create_evaluator", "labels_prepare_batch", "prepare_stage2",
                     "trainable_parameters", "warmup_cosine_scheduler"), "engines"),
    **dict.fromkeys(("build_classification_loss", "build_stage1_loss", "drw_schedule"), "losses"),
    **dict.fromkeys(("run_stage1", "run_stage2", "train"), "workflow"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
