"""The two-stage workflow: data -> stage 1 -> (stage 2) -> checkpoints, metrics.json, plots.

``train(config)`` runs a whole :class:`TrainConfig`; the pieces (:func:`run_stage1`, :func:`run_stage2`,
:func:`predict`) are usable on their own. Layout of ``config.out``::

    config.json          resolved configuration (TrainConfig.to_dict)
    stage1_best.pt       stage-1 model selected on validation (checkpoint contract)
    final.pt             the model that metrics.json describes (after stage 2 for two-stage methods)
    metrics.json         {"val": {...}, "test": {...}, "selection": {...}}
    plots/               ROC, PR, confusion matrix, embedding projection (test split)
    tensorboard/         TensorBoard logs of both stages
    state/               engine states for --resume
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.data import DataLoader
from monai.handlers import (
    EarlyStopHandler,
    LrScheduleHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
)
from monai.utils import set_determinism
from tqdm.auto import tqdm

from medimb.atomic import write_text_atomic
from medimb.data import BatchAugmentation, DataSplits, create_sampler, load_splits
from medimb.data.errors import surface_data_errors
from medimb.networks import (
    create_model,
    predict_proba,
    read_checkpoint_file,
    save_checkpoint,
    write_checkpoint_file,
)
from medimb.training.config import Stage1Config, Stage2Config, TrainConfig
from medimb.training.engines import (
    AugmentingPrepareBatch,
    Stage1Trainer,
    Stage2Trainer,
    create_evaluator,
    prepare_stage2,
    trainable_parameters,
)
from medimb.training.losses import build_classification_loss, build_stage1_loss, drw_schedule

logger = logging.getLogger(__name__)
EVAL_BATCH = 64


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class EpochSeeder:
    """Re-seeds augmentation, dropout and the sampler at every epoch start from ``(seed, epoch)``.

    Each epoch's randomness is then a function of the epoch number alone, so a run resumed from the
    end of epoch k continues exactly as the uninterrupted run would (on CPU, ``num_workers=0``).
    """

    def __init__(self, seed: int, dataset, sampler, batch_augment=None) -> None:
        self.seed, self.dataset, self.sampler, self.batch_augment = seed, dataset, sampler, batch_augment

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        epoch = engine.state.epoch  # 1-based, already incremented at EPOCH_STARTED
        torch.manual_seed(self.seed * 10007 + epoch)
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=(self.seed * 10007 + epoch) % (2**32))
        if self.batch_augment is not None:
            self.batch_augment.set_random_state(self.seed * 10007 + epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class ChecksumSaver(BaseSaveHandler):
    """Ignite save handler that writes engine states with :func:`medimb.networks.write_checkpoint_file`:
    atomically and with a content checksum, so ``--resume`` never meets a truncated file silently and a
    corrupt one is a one-line error (MONAI's ``CheckpointSaver`` writes with plain ``torch.save``, in place).

    ``filename`` fixes the file name (the best-model state); otherwise ignite's name is used.
    """

    def __init__(self, dirname: Path, filename: str | None = None) -> None:
        self.dirname, self.filename = Path(dirname), filename

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        write_checkpoint_file(self.dirname / (self.filename or filename), checkpoint)

    def remove(self, filename: str) -> None:
        (self.dirname / (self.filename or filename)).unlink(missing_ok=True)


class _On:
    """A callable attached to ``event`` by MONAI's ``handlers`` lists (they call ``attach(engine)``)."""

    def __init__(self, event, handler) -> None:
        self.event, self.handler = event, handler

    def attach(self, engine) -> None:
        engine.add_event_handler(self.event, self.handler)


def announce(message: str) -> None:
    """One status line on stderr (above any progress bar), whatever the logging level: e.g. what a resumed
    run continues from."""
    tqdm.write(f"medimb: {message}", file=sys.stderr)


class BestEpoch:
    """Remembers the trainer epoch of the best validation key metric (strictly greater wins, as the
    best-model Checkpoint decides); has ``state_dict`` so it survives a resume."""

    def __init__(self, key: str) -> None:
        self.key, self.best, self.epoch = key, -float("inf"), -1

    def attach(self, evaluator) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator) -> None:
        value = float(evaluator.state.metrics[self.key])
        if value > self.best:
            self.best, self.epoch = value, int(evaluator.state.epoch)  # == trainer epoch (ValidationHandler)

    def state_dict(self) -> dict:
        return {"best": self.best, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.epoch = float(state["best"]), int(state["epoch"])


class EpochProgress:
    """tqdm bar over epochs showing the loss and the validation key metric."""

    def __init__(self, evaluator, key: str, desc: str, enabled: bool) -> None:
        self.evaluator, self.key, self.desc, self.enabled = evaluator, key, desc, enabled
        self.bar = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _start(self, engine) -> None:
        self.bar = tqdm(total=engine.state.max_epochs, initial=engine.state.epoch, desc=self.desc,
                        unit="epoch", disable=not self.enabled, dynamic_ncols=True)

    def _update(self, engine) -> None:
        value = self.evaluator.state.metrics.get(self.key)
        loss = engine.state.output.get("loss") if isinstance(engine.state.output, dict) else None
        post = {}
        if loss is not None:
            post["loss"] = f"{float(torch.as_tensor(loss).detach()):.3f}"
        if value is not None:
            post[self.key] = f"{value:.3f}"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def _close(self, engine) -> None:
        if self.bar is not None:
            self.bar.close()


def _last_state(state_dir: Path, prefix: str) -> Path | None:
    """The newest ``<prefix>_checkpoint_epoch=N.pt`` resume file, or None."""
    found = []
    for p in state_dir.glob(f"{prefix}_checkpoint_epoch=*.pt"):
        m = re.search(r"epoch=(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _resume_from(trainer, save_dict: dict, state_dir: Path, stage: str, epochs: int, device) -> None:
    """Restore ``save_dict`` from the newest ``state/<stage>_checkpoint_epoch=N.pt`` when ``trainer`` starts.

    The file is read (and its checksum checked) now, so a truncated or corrupt state is a one-line
    :class:`~medimb.networks.CheckpointError` naming it before any work; says on stderr what is resumed.
    """
    last = _last_state(state_dir, stage)
    if last is None:
        announce(f"--resume: no saved {stage} state in {state_dir}; {stage} starts from epoch 0")
        return
    state = read_checkpoint_file(last, map_location=device)
    missing = sorted(set(save_dict) - set(state))
    if missing:
        from medimb.networks import CheckpointError

        raise CheckpointError(f"{last}: not a {stage} resume state (missing {missing})")
    engine = state["trainer"]  # ignite stores the iteration and the epoch length, not always the epoch
    done = int(engine.get("epoch") or engine.get("iteration", 0) // max(1, engine.get("epoch_length") or 1))
    announce(f"resuming {stage} from {last} (epoch {done} of {epochs} done)")

    def restore(engine) -> None:  # at STARTED, after ignite has reset the state of a fresh run
        Checkpoint.load_objects(to_load=save_dict, checkpoint=state, strict=True)
        engine.state.max_epochs = epochs

    trainer.add_event_handler(Events.STARTED, restore)


def _loss_value(output: dict) -> float:
    return float(torch.as_tensor(output["loss"]).detach())


def _stats_handlers(**kwargs) -> list:
    """A MONAI StatsHandler (it logs to stdout) only when medimb logs at INFO or below (``--verbose``)."""
    return [StatsHandler(**kwargs)] if logger.isEnabledFor(logging.INFO) else []


def _loader(dataset, batch_size: int, sampler=None, num_workers: int = 0, device=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      pin_memory=device is not None and device.type == "cuda")


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
) -> StageResult:
    """Shared engine set-up of both stages; the best validation weights are loaded into ``model`` at the end."""
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    sampler = create_sampler(sampler_kind, splits.labels["train"], seed=seed)
    train_loader = _loader(splits.train, batch_size, sampler, num_workers, device)
    val_loader = _loader(splits.val, EVAL_BATCH, None, num_workers, device)
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
        _On(Events.EPOCH_COMPLETED, best_saver),
    ]
    model.to(device)
    evaluator = create_evaluator(model, val_loader, device, key_metric, amp, val_handlers)
    aug = splits.preprocessing.augmentation
    batch_augment = BatchAugmentation(aug, splits.preprocessing.spatial_dims, seed) if aug.on_batch else None
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
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
        _resume_from(trainer, save_dict, state_dir, stage, epochs, device)
    trainer.run()
    best_file = state_dir / best_name
    if best_file.exists():
        state = read_checkpoint_file(best_file, map_location=device)
        model.load_state_dict(state.get("network", state))
    return StageResult(best_epoch.best, best_epoch.epoch, trainer.state.epoch)


def run_stage1(model, splits: DataSplits, cfg: Stage1Config, out: Path, device: torch.device, *, seed: int = 0,
               amp: bool = True, num_workers: int = 0, resume: bool = False, progress: bool = True,
               head_kwargs: dict | None = None) -> StageResult:
    """Stage 1 on ``splits.train`` with instance-balanced sampling; ``model`` ends with the best val weights."""
    loss = build_stage1_loss(cfg.loss, splits.class_counts, cfg.metric_loss, cfg.metric_weight, cfg.loss_kwargs,
                             cfg.metric_kwargs, head_kwargs).to(device)
    hook = drw_schedule(loss, splits.class_counts, cfg.epochs, cfg.drw_start)
    return _run_engine(
        trainer_cls=Stage1Trainer, stage="stage1", model=model, loss=loss, splits=splits, sampler_kind="instance",
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
        key_metric=cfg.key_metric, out=out, device=device, seed=seed, amp=amp, num_workers=num_workers,
        resume=resume, progress=progress, early_stop_patience=cfg.early_stop_patience, epoch_hook=hook,
    )


def flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a ``(B, C, *S)`` tensor, as tensor dims: ``[(), (2,), (3,), (2, 3), ...]``
    (``2**spatial_dims`` entries, the identity first)."""
    axes = range(2, 2 + spatial_dims)
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(2**spatial_dims)]


@torch.no_grad()
def predict(model, dataset, device: torch.device, batch_size: int = EVAL_BATCH, num_workers: int = 0,
            flip_tta: bool = False) -> dict:
    """Run ``model.forward_all`` over ``dataset``: ``labels`` (N,), ``logits`` (N, K), ``proba`` (N, K),
    ``features`` (N, F), ``embedding`` (N, E) as numpy arrays.

    ``flip_tta``: test-time augmentation by flips, for models trained with random flips of every spatial
    axis. ``proba`` is then the mean of the class probabilities over all ``2**spatial_dims`` flipped copies
    of each input (8 in 3D, 4 in 2D), ``logits`` their mean; ``features``/``embedding`` stay those of the
    unflipped input.
    """
    model.eval().to(device)
    out: dict[str, list] = {"labels": [], "logits": [], "features": [], "embedding": [], "proba": []}
    for batch in _loader(dataset, batch_size, None, num_workers, device):
        x = batch["image"]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device)
        res = model.forward_all(x)
        out["labels"].append(torch.as_tensor(batch["label"]).reshape(-1))
        for k in ("features", "embedding"):
            out[k].append(res[k].float().cpu())
        logits = [res["logits"].float().cpu()]
        if flip_tta:
            logits += [model(x.flip(dims)).float().cpu() for dims in flip_combinations(x.ndim - 2)[1:]]
        out["logits"].append(torch.stack(logits).mean(0))
        out["proba"].append(torch.stack([predict_proba(model, z) for z in logits]).mean(0))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def _tau_norm(model, splits: DataSplits, cfg: Stage2Config, device, num_workers: int) -> dict:
    """Pick tau on validation (key metric, ties -> smaller tau); no training. Features are computed once."""
    from medimb.evaluation.metrics import compute_metrics

    val = predict(model, splits.val, device, num_workers=num_workers)
    feats = torch.as_tensor(val["features"]).to(device)
    scores = {}
    for tau in cfg.taus:
        head = prepare_stage2(model, "tau_norm", tau=float(tau)).classifier if tau == cfg.taus[0] else None
        if head is None:
            from medimb.networks import rebalance_classifier

            head = rebalance_classifier(model, "tau_norm", tau=float(tau))
        with torch.no_grad():
            proba = predict_proba(model, head(feats).float().cpu()).numpy()
        scores[float(tau)] = float(compute_metrics(val["labels"], proba)[cfg.key_metric])
    best_tau = max(scores, key=lambda t: (scores[t], -t))
    from medimb.networks import rebalance_classifier

    rebalance_classifier(model, "tau_norm", tau=best_tau)
    return {"tau": best_tau, "val_scores": scores}


def run_stage2(model, splits: DataSplits, cfg: Stage2Config, out: Path, device: torch.device, *, seed: int = 0,
               amp: bool = True, num_workers: int = 0, resume: bool = False, progress: bool = True) -> dict:
    """Freeze the backbone and re-balance the classifier (cRT / LWS trained class-balanced; tau-norm searched)."""
    if cfg.rebalance == "tau_norm":
        return _tau_norm(model, splits, cfg, device, num_workers)
    # The re-initialised head draws from the global RNG, whose state after stage 1 differs between an
    # uninterrupted run and one resumed at the stage boundary: seed it so both start stage 2 alike.
    torch.manual_seed(seed * 10007 + 1)
    prepare_stage2(model, cfg.rebalance)
    head_kwargs = model.config.get("head_kwargs", {})
    loss = build_classification_loss(cfg.loss, splits.class_counts, head_kwargs, **cfg.loss_kwargs).to(device)
    res = _run_engine(
        trainer_cls=Stage2Trainer, stage="stage2", model=model, loss=loss, splits=splits, sampler_kind="class",
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0, key_metric=cfg.key_metric,
        out=out, device=device, seed=seed + 1, amp=amp, num_workers=num_workers, resume=resume, progress=progress,
    )
    return {"best_metric": res.best_metric, "best_epoch": res.best_epoch}


def _checkpoint_meta(config: TrainConfig, splits: DataSplits, epoch: int) -> dict:
    return {
        "preprocessing": splits.preprocessing.to_dict(),
        "class_names": list(splits.class_names),
        "method": config.method.name,
        "epoch": int(epoch),
        "train_config": config.to_dict(),
        "class_counts": splits.class_counts,
    }


def check_network_input(model, preprocessing, network: str) -> None:
    """Warn when the network input ``preprocessing.spatial_size`` is smaller than ``network``'s downsampling
    factor along an axis (its last feature map is then 1 voxel there: global pooling sees padding, attention
    maps have no resolution); raise :class:`UserError` when the network cannot take that size at all (it would
    fail at the first batch)."""
    from medimb.cli import UserError
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


def uses_flip_tta(requested: bool, preprocessing) -> bool:
    """Flip TTA only for models whose training augmentation flipped every axis (``flip_prob > 0``)."""
    return bool(requested) and preprocessing.augmentation.flip_prob > 0


def evaluate_splits(model, splits: DataSplits, device, num_workers: int = 0,
                    flip_tta: bool = False) -> tuple[dict, dict]:
    """Metrics of ``model`` on val and test; returns ``(metrics, predictions)`` keyed by split."""
    from medimb.evaluation.metrics import compute_metrics

    tta = uses_flip_tta(flip_tta, splits.preprocessing)
    preds = {s: predict(model, getattr(splits, s), device, num_workers=num_workers, flip_tta=tta)
             for s in ("val", "test")}
    metrics = {s: compute_metrics(p["labels"], p["proba"]) for s, p in preds.items()}
    return metrics, preds


def write_plots(pred: dict, class_names: list[str], plot_dir: Path) -> list[str]:
    """ROC, PR, confusion matrix and a PCA of the pooled features (what the classifier sees) of one split's
    predictions (``predict`` output: labels (N,), proba (N, K), features (N, F)); returns the PNG paths."""
    from medimb.evaluation import plots

    y, proba = pred["labels"], pred["proba"]
    written = [
        plots.plot_roc(y, proba, plot_dir / "roc.png", class_names=class_names),
        plots.plot_pr(y, proba, plot_dir / "pr.png", class_names=class_names),
        plots.plot_confusion_matrix(y, proba, plot_dir / "confusion_matrix.png", class_names=class_names),
    ]
    if len(y) >= 3:  # a projection needs 3 points; a tiny split still gets its other plots
        written.append(plots.plot_embedding(pred["features"], y, plot_dir / "features_pca.png",
                                            class_names=class_names))
    else:
        logger.warning("%d case(s) in the split: no feature projection plot (needs 3)", len(y))
    return [str(x) for x in written]


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """:func:`run_training`, with input-data errors raised inside MONAI transforms surfaced as :class:`DataError`."""
    with surface_data_errors():
        return run_training(config, resume=resume, progress=progress)


def run_training(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run the method of ``config`` end to end; returns ``{"val": metrics, "test": metrics, ...}``.

    Deterministic for a given seed (``monai.utils.set_determinism``); ``resume=True`` continues from the
    newest state in ``config.out/state`` (a finished stage 1 is not repeated).
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    set_determinism(seed=config.seed)
    splits = load_splits(config.data, cache=config.cache, cache_dir=out / "cache",
                         spatial_size=config.spatial_size, slices=config.slices)
    model = build_model(config, splits)
    check_network_input(model, splits.preprocessing, config.network)
    write_json(out / "config.json", config.to_dict())
    method = config.method
    common = dict(seed=config.seed, amp=config.amp, num_workers=config.num_workers, resume=resume, progress=progress)

    stage1_file = out / "stage1_best.pt"
    selection: dict[str, Any] = {}
    if resume and stage1_file.exists() and (out / "state" / "stage1.done").exists():
        model.load_state_dict(read_checkpoint_file(stage1_file)["model"])
        selection["stage1"] = json.loads((out / "state" / "stage1.done").read_text())
        announce(f"resuming after stage 1: it finished (best epoch {selection['stage1'].get('best_epoch')}), "
                 f"weights from {stage1_file}")
    else:
        res = run_stage1(model, splits, method.stage1, out, device, head_kwargs=method.head_kwargs, **common)
        selection["stage1"] = {"key_metric": f"val_{method.stage1.key_metric}", "best": res.best_metric,
                               "best_epoch": res.best_epoch, "epochs_run": res.epochs_run}
        save_checkpoint(stage1_file, model, **_checkpoint_meta(config, splits, res.best_epoch))
        write_json(out / "state" / "stage1.done", selection["stage1"])
    if method.stage2 is not None:
        selection["stage2"] = run_stage2(model, splits, method.stage2, out, device, **common)
    metrics, preds = evaluate_splits(model, splits, device, config.num_workers, config.flip_tta)
    save_checkpoint(out / "final.pt", model, **_checkpoint_meta(config, splits, selection["stage1"]["best_epoch"]))
    result = {"val": metrics["val"], "test": metrics["test"], "selection": selection,
              "method": method.name, "class_names": splits.class_names}
    write_json(out / "metrics.json", result)
    result["plots"] = write_plots(preds["test"], splits.class_names, out / "plots")
    return result
