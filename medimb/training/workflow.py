"""The two-stage workflow: data -> stage 1 -> (stage 2) -> checkpoints, metrics.json, plots.

``train(config)`` runs a whole :class:`TrainConfig`; the stages (:func:`run_stage1`, :func:`run_stage2`)
are usable on their own. The handlers live in :mod:`medimb.training.handlers`, prediction and the
evaluation output in :mod:`medimb.evaluation`. Layout of ``config.out``::

    config.json          resolved configuration (TrainConfig.to_dict)
    stage1_best.pt       stage-1 model selected on validation (checkpoint contract)
    final.pt             the model that metrics.json describes (after stage 2 for two-stage methods)
    metrics.json         {"validation": {...}, "test": {...}, "selection": {...}, "method", "class_names", "plots"}
    predictions.csv      one row per validation and test case (medimb.evaluation.predictions_csv)
    plots/<split>/       ROC, PR, confusion matrix, feature projection (medimb.evaluation.report)
    tensorboard/         TensorBoard logs of both stages
    state/               engine states for --resume
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint
from monai.handlers import (
    EarlyStopHandler,
    LrScheduleHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
)
from monai.utils import set_determinism

from medimb.atomic import write_json_atomic
from medimb.data import BatchAugmentation, DataSplits, create_sampler, load_splits
from medimb.data.datalist import DATALIST_SPLITS, case_ids
from medimb.data.errors import surface_data_errors
from medimb.data.loaders import make_loader
from medimb.errors import UserError
from medimb.evaluation.metrics import compute_metrics
from medimb.evaluation.operating_point import BALANCED_ACCURACY, HEAD_PRIOR_KEY, PRIOR, choose_threshold
from medimb.evaluation.prediction import EVAL_BATCH, predict, uses_flip_tta
from medimb.evaluation.predictions_csv import SplitPredictions
from medimb.evaluation.report import write_evaluation
from medimb.networks import create_model, predict_proba, read_checkpoint_file, rebalance_classifier, save_checkpoint
from medimb.runtime import resolve_device
from medimb.training.config import (Stage1Config, Stage2Config, TrainConfig, head_prior, loss_prior,
                                   preprocessing_for, require_head_prior)
from medimb.training.engines import (
    AugmentingPrepareBatch,
    Stage1Trainer,
    Stage2Trainer,
    create_evaluator,
    prepare_stage2,
    trainable_parameters,
    warmup_cosine_scheduler,
)
from medimb.training.handlers import (
    BestEpoch,
    ChecksumSaver,
    EpochProgress,
    EpochSeeder,
    On,
    announce,
    epoch_seed,
    resume_from,
)
from medimb.training.losses import build_classification_loss, build_stage1_loss, drw_schedule

logger = logging.getLogger(__name__)
#: datalist split name of each DataSplits attribute (outputs use the datalist's names)
SPLIT_NAMES = {attr: name for name, attr in DATALIST_SPLITS.items()}


def _loss_value(output: dict) -> float:
    return float(torch.as_tensor(output["loss"]).detach())


def _stats_handlers(**kwargs) -> list:
    """A MONAI StatsHandler (it logs to stdout) only when medimb logs at INFO or below (``--verbose``)."""
    return [StatsHandler(**kwargs)] if logger.isEnabledFor(logging.INFO) else []


@dataclass
class StageResult:
    best_metric: float
    best_epoch: int
    epochs_run: int


def _run_engine(
    *,
    trainer_cls,
    stage: str,
    model: torch.nn.Module,
    loss: torch.nn.Module,
    splits: DataSplits,
    sampler_kind: str,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    key_metric: str,
    out: Path,
    device: torch.device,
    seed: int,
    amp: bool,
    num_workers: int,
    resume: bool,
    progress: bool,
    early_stop_patience: int | None = None,
    epoch_hook=None,
    warmup_epochs: int = 0,
    grad_clip_norm: float | None = None,
) -> StageResult:
    """Shared engine set-up of both stages; the best validation weights are loaded into ``model`` at the end."""
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    sampler = create_sampler(sampler_kind, splits.labels["train"], seed=seed)
    train_loader = make_loader(splits.train, batch_size, sampler, num_workers, device)
    val_loader = make_loader(splits.val, EVAL_BATCH, None, num_workers, device)
    key = f"val_{key_metric}"
    best_name = f"{stage}_best_state.pt"
    # ignite's Checkpoint keeps the best (strictly greater key metric) and the latest epoch; our save handler
    # makes both files atomic and checksummed
    best_saver = Checkpoint({"network": model}, ChecksumSaver(state_dir, best_name), score_name="key_metric",
                            score_function=lambda engine: engine.state.metrics[key], n_saved=1)
    best_epoch = BestEpoch(key)
    val_handlers = [
        best_epoch,
        *_stats_handlers(iteration_log=False, name=f"medimb.{stage}.val"),
        TensorBoardStatsHandler(log_dir=str(out / "tensorboard" / stage), iteration_log=False),
        On(Events.EPOCH_COMPLETED, best_saver),
    ]
    model.to(device)
    evaluator = create_evaluator(model, val_loader, device, key_metric, amp, val_handlers)
    aug = splits.preprocessing.augmentation
    batch_augment = BatchAugmentation(aug, splits.preprocessing.spatial_dims, seed) if aug.on_batch else None
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, epochs, warmup_epochs)  # its state is in save_dict: resumes exactly
    clipping = {"grad_clip_norm": grad_clip_norm} if grad_clip_norm else {}  # Stage1Trainer's option
    save_dict = {"network": model, "optimizer": optimizer, "lr_scheduler": scheduler, "best": best_saver,
                 "best_epoch": best_epoch}
    handlers: list = [
        EpochSeeder(seed, splits.train, sampler, batch_augment),
        LrScheduleHandler(scheduler, print_lr=False),
        ValidationHandler(interval=1, validator=evaluator, epoch_level=True),
        *_stats_handlers(tag_name=f"{stage}_loss", output_transform=_loss_value, name=f"medimb.{stage}.train"),
        TensorBoardStatsHandler(log_dir=str(out / "tensorboard" / stage), tag_name=f"{stage}_loss",
                                output_transform=_loss_value),
        EpochProgress(evaluator, key, desc=stage, enabled=progress),
    ]
    trainer = trainer_cls(
        device=device, max_epochs=epochs, train_data_loader=train_loader, network=model, optimizer=optimizer,
        loss_function=loss, amp=amp, train_handlers=handlers, prepare_batch=AugmentingPrepareBatch(batch_augment),
        **clipping,
    )
    # saved after validation (handlers fire in attach order), so the best-model tracking is current
    save_dict["trainer"] = trainer
    # -> state/<stage>_checkpoint_epoch=<N>.pt, the newest only
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(
        save_dict, ChecksumSaver(state_dir), filename_prefix=stage, score_name="epoch",
        score_function=lambda engine: engine.state.epoch, n_saved=1))
    if epoch_hook is not None:
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epoch_hook(e.state.epoch - 1))
    if early_stop_patience:
        EarlyStopHandler(patience=early_stop_patience, score_function=lambda e: e.state.metrics[key],
                         trainer=trainer).attach(evaluator)
    if resume:
        resume_from(trainer, save_dict, state_dir, stage, epochs, device)
    trainer.run()
    best_file = state_dir / best_name
    if best_file.exists():
        state = read_checkpoint_file(best_file, map_location=device)
        model.load_state_dict(state.get("network", state))
    return StageResult(best_epoch.best, best_epoch.epoch, trainer.state.epoch)


def run_stage1(model, splits: DataSplits, cfg: Stage1Config, out: Path, device: torch.device, *, seed: int = 0,
               amp: bool = True, num_workers: int = 0, resume: bool = False, progress: bool = True) -> StageResult:
    """Stage 1 on ``splits.train`` with instance-balanced sampling; ``model`` ends with the best val weights."""
    loss = build_stage1_loss(cfg.loss, splits.class_counts, cfg.metric_loss, cfg.metric_weight, cfg.loss_kwargs,
                             cfg.metric_kwargs, head=model.classifier).to(device)
    hook = drw_schedule(loss, splits.class_counts, cfg.epochs, cfg.drw_start)
    batch_size, lr = cfg.batch_and_lr(len(splits.train))  # small training sets: smaller batches, lower lr
    return _run_engine(
        trainer_cls=Stage1Trainer, stage="stage1", model=model, loss=loss, splits=splits, sampler_kind="instance",
        epochs=cfg.epochs, batch_size=batch_size, lr=lr, weight_decay=cfg.weight_decay,
        key_metric=cfg.key_metric, out=out, device=device, seed=seed, amp=amp, num_workers=num_workers,
        resume=resume, progress=progress, early_stop_patience=cfg.early_stop_patience, epoch_hook=hook,
        warmup_epochs=cfg.warmup_epochs, grad_clip_norm=cfg.grad_clip_norm,
    )


def _tau_norm(model, splits: DataSplits, cfg: Stage2Config, device, num_workers: int) -> dict:
    """Pick tau on validation (key metric, ties -> smaller tau); no training. Features are computed once."""
    val = predict(model, splits.val, device, num_workers=num_workers)
    feats = torch.as_tensor(val["features"]).to(device)
    scores = {}
    for tau in cfg.taus:
        head = prepare_stage2(model, "tau_norm", tau=float(tau)).classifier if tau == cfg.taus[0] else None
        if head is None:
            head = rebalance_classifier(model, "tau_norm", tau=float(tau))
        with torch.no_grad():
            proba = predict_proba(model, head(feats).float().cpu()).numpy()
        scores[float(tau)] = float(compute_metrics(val["labels"], proba)[cfg.key_metric])
    best_tau = max(scores, key=lambda t: (scores[t], -t))
    rebalance_classifier(model, "tau_norm", tau=best_tau)
    return {"tau": best_tau, "val_scores": scores}


def run_stage2(model, splits: DataSplits, cfg: Stage2Config, out: Path, device: torch.device, *, seed: int = 0,
               amp: bool = True, num_workers: int = 0, resume: bool = False, progress: bool = True) -> dict:
    """Freeze the backbone and re-balance the classifier (cRT / LWS trained class-balanced; tau-norm searched)."""
    if cfg.rebalance == "tau_norm":
        return _tau_norm(model, splits, cfg, device, num_workers)
    # The re-initialised head draws from the global RNG, whose state after stage 1 differs between an
    # uninterrupted run and one resumed at the stage boundary: seed it so both start stage 2 alike.
    torch.manual_seed(epoch_seed(seed, 1))
    prepare_stage2(model, cfg.rebalance)
    loss = build_classification_loss(cfg.loss, splits.class_counts, head=model.classifier,
                                     **(cfg.loss_kwargs or {})).to(device)
    res = _run_engine(
        trainer_cls=Stage2Trainer, stage="stage2", model=model, loss=loss, splits=splits, sampler_kind="class",
        epochs=cfg.epochs, batch_size=cfg.batch_and_lr(len(splits.train))[0], lr=cfg.lr, weight_decay=0.0,
        key_metric=cfg.key_metric,
        out=out, device=device, seed=seed + 1, amp=amp, num_workers=num_workers, resume=resume, progress=progress,
    )
    return {"best_metric": res.best_metric, "best_epoch": res.best_epoch}


def _checkpoint_meta(config: TrainConfig, splits: DataSplits, epoch: int, prior: float | None,
                     operating_point: dict | None = None) -> dict:
    """What a checkpoint records beside the weights; ``prior``: the class prior its head is fitted under
    (:func:`medimb.training.config.head_prior`; for a stage-1 checkpoint, stage 1's)."""
    meta = {
        "preprocessing": splits.preprocessing.to_dict(),
        "class_names": list(splits.class_names),
        "method": config.method.name,
        "epoch": int(epoch),
        "train_config": config.to_dict(),
        "class_counts": splits.class_counts,
        # the prior the final head is fitted under: what the "prior" operating point uses (bundles too)
        HEAD_PRIOR_KEY: prior,
    }
    if operating_point is not None:  # binary models: the decision threshold chosen on validation
        meta["operating_point"] = operating_point
    return meta


def check_network_input(model, preprocessing, network: str) -> None:
    """Warn when the network input ``preprocessing.spatial_size`` is smaller than ``network``'s downsampling
    factor along an axis (its last feature map is then 1 voxel there: global pooling sees padding, attention
    maps have no resolution); raise :class:`UserError` when the network cannot take that size at all (it would
    fail at the first batch)."""
    from medimb.networks.model import downsampling_factor, feature_map_size

    size = tuple(int(s) for s in preprocessing.spatial_size)
    shown = "x".join(map(str, size))
    try:
        fmap = feature_map_size(model, size)
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"network input {shown} is too small for --network {network}: {first}; "
                        "use a larger --spatial-size") from exc
    factor = downsampling_factor(model, size)
    if factor is not None and any(s < f for s, f in zip(size, factor)):
        logger.warning("network input %s is smaller than %s's downsampling factor %s: its last feature map is "
                       "%s voxels, so the network sees little more than padding and attention maps have no "
                       "resolution; use a larger --spatial-size or a network with less downsampling", shown,
                       network, "x".join(map(str, factor)), "x".join(map(str, fmap)))


def build_model(config: TrainConfig, splits: DataSplits):
    """``create_model`` for the data (channels, classes, dims) and the method's head."""
    pre = splits.preprocessing
    return create_model(
        config.network,
        in_channels=pre.in_channels,
        num_classes=splits.num_classes,
        spatial_dims=pre.spatial_dims,
        head=config.method.head,
        head_kwargs=dict(config.method.head_kwargs),
        **config.network_kwargs,
    )


def evaluate_splits(model, splits: DataSplits, device, num_workers: int = 0,
                    flip_tta: bool = False) -> tuple[list[SplitPredictions], dict[str, Any]]:
    """Predictions of ``model`` on the validation and test splits (validation first), and their pooled
    features by split name."""
    tta = uses_flip_tta(flip_tta, splits.preprocessing)
    parts, features = [], {}
    for attr in ("val", "test"):
        dataset = getattr(splits, attr)
        pred = predict(model, dataset, device, num_workers=num_workers, flip_tta=tta)
        parts.append(SplitPredictions(SPLIT_NAMES[attr], case_ids(dataset.data), pred["labels"], pred["proba"]))
        features[SPLIT_NAMES[attr]] = pred["features"]
    return parts, features


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """:func:`run_training`, with input-data errors raised inside MONAI transforms surfaced as :class:`DataError`."""
    with surface_data_errors():
        return run_training(config, resume=resume, progress=progress)


def run_training(config: TrainConfig, resume: bool = False, progress: bool = True,
                 operating_rule: str = BALANCED_ACCURACY) -> dict:
    """Run the method of ``config`` end to end; returns the metrics.json content
    (:func:`medimb.evaluation.report.write_evaluation`: ``{"validation": metrics, "test": metrics, ...}``).

    Binary models: the decision threshold is chosen on validation by ``operating_rule``
    (``"balanced_accuracy"``, ``"prior"`` or ``"sensitivity>=T"``, :mod:`medimb.evaluation.operating_point`),
    stored in ``final.pt`` under ``"operating_point"`` and used for every decision metric, predictions.csv and
    plot. ``"prior"`` with a method whose head has no known prior (:func:`medimb.training.config.head_prior`)
    is refused before training.

    Deterministic for a given seed (``monai.utils.set_determinism``); ``resume=True`` continues from the
    newest state in ``config.out/state`` (a finished stage 1 is not repeated).
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    set_determinism(seed=config.seed)
    splits = load_splits(config.data, cache=config.cache, cache_dir=out / "cache",
                         preprocessing=partial(preprocessing_for, config.network, spatial_size=config.spatial_size,
                                               slices=config.slices))
    if operating_rule == PRIOR and splits.num_classes == 2:
        require_head_prior(config.method)
    prior = head_prior(config.method, splits.class_counts)
    model = build_model(config, splits)
    check_network_input(model, splits.preprocessing, config.network)
    write_json_atomic(out / "config.json", config.to_dict())
    method = config.method.resolved()
    common = dict(seed=config.seed, amp=config.amp, num_workers=config.num_workers, resume=resume, progress=progress)

    stage1_file = out / "stage1_best.pt"
    selection: dict[str, Any] = {}
    if resume and stage1_file.exists() and (out / "state" / "stage1.done").exists():
        model.load_state_dict(read_checkpoint_file(stage1_file)["model"])
        selection["stage1"] = json.loads((out / "state" / "stage1.done").read_text())
        announce(f"resuming after stage 1: it finished (best epoch {selection['stage1'].get('best_epoch')}), "
                 f"weights from {stage1_file}")
    else:
        res = run_stage1(model, splits, method.stage1, out, device, **common)
        selection["stage1"] = {"key_metric": f"val_{method.stage1.key_metric}", "best": res.best_metric,
                               "best_epoch": res.best_epoch, "epochs_run": res.epochs_run}
        stage1_prior = loss_prior(method.stage1.loss, splits.class_counts, method.head)
        save_checkpoint(stage1_file, model, **_checkpoint_meta(config, splits, res.best_epoch, stage1_prior))
        write_json_atomic(out / "state" / "stage1.done", selection["stage1"])
    if method.stage2 is not None:
        selection["stage2"] = run_stage2(model, splits, method.stage2, out, device, **common)
    parts, features = evaluate_splits(model, splits, device, config.num_workers, config.flip_tta)
    point = None
    if splits.num_classes == 2:  # the operating point, on the validation predictions (parts[0])
        point = choose_threshold(parts[0].labels, parts[0].proba, operating_rule,
                                 head_prior=prior)
        parts = [dataclasses.replace(part, threshold=point["threshold"]) for part in parts]
    save_checkpoint(out / "final.pt", model,
                    **_checkpoint_meta(config, splits, selection["stage1"]["best_epoch"], prior, point))
    extra: dict[str, Any] = {"method": method.name, "selection": selection}
    if point is not None:
        extra["operating_point"] = {**point, "source": "chosen on validation, stored in final.pt"}
    return write_evaluation(out, parts, splits.class_names, features, extra=extra)
