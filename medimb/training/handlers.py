"""Ignite handlers of the medimb training engines, used by ``medimb.training.workflow`` and the bundles'
JSON (``_target_``): per-epoch seeding, checksummed engine states and resume, best-epoch tracking, the
progress bar, and the writer of medimb checkpoints for bundle validators."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from tqdm.auto import tqdm

from medimb.errors import CheckpointError
from medimb.networks import read_checkpoint_file, save_checkpoint, write_checkpoint_file
from medimb.runtime import is_main_process

#: spacing between the seeds of consecutive runs' epochs (a prime, so seed s epoch e never meets seed s')
SEED_STRIDE = 10007


def epoch_seed(seed: int, epoch: int) -> int:
    """The random seed of ``epoch`` (1-based) of a run seeded ``seed``; stage 2 of a run uses ``seed + 1``
    and seeds its new head with ``epoch_seed(seed, 1)`` (:func:`medimb.training.workflow.run_stage2`)."""
    return seed * SEED_STRIDE + epoch


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
        seed = epoch_seed(self.seed, epoch)
        torch.manual_seed(seed)
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed % (2**32))
        if self.batch_augment is not None:
            self.batch_augment.set_random_state(seed)
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


class GradientClipping:
    """Clips the gradient norm of the trainer's optimised parameters to ``max_norm`` after every backward
    pass, before the optimiser step (MONAI's ``IterationEvents.BACKWARD_COMPLETED``; under AMP the gradients
    are unscaled first, as ``GradScaler`` documents). Stateless, so a resumed run clips exactly as an
    uninterrupted one. Not meant for MONAI's gradient accumulation (it would clip partial sums).

    ``Stage1Trainer(grad_clip_norm=...)`` attaches it; bundles can list it in ``train_handlers``.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        if not max_norm > 0:
            raise ValueError(f"gradient clipping needs max_norm > 0, got {max_norm}")
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)


class On:
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


def last_state(state_dir: Path, prefix: str) -> Path | None:
    """The newest ``<prefix>_checkpoint_epoch=N.pt`` resume file, or None."""
    found = []
    for p in state_dir.glob(f"{prefix}_checkpoint_epoch=*.pt"):
        m = re.search(r"epoch=(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def resume_from(trainer, save_dict: dict, state_dir: Path, stage: str, epochs: int, device) -> None:
    """Restore ``save_dict`` from the newest ``state/<stage>_checkpoint_epoch=N.pt`` when ``trainer`` starts.

    The file is read (and its checksum checked) now, so a truncated or corrupt state is a one-line
    :class:`~medimb.networks.CheckpointError` naming it before any work; says on stderr what is resumed.
    """
    last = last_state(state_dir, stage)
    if last is None:
        announce(f"--resume: no saved {stage} state in {state_dir}; {stage} starts from epoch 0")
        return
    state = read_checkpoint_file(last, map_location=device)
    missing = sorted(set(save_dict) - set(state))
    if missing:
        raise CheckpointError(f"{last}: not a {stage} resume state (missing {missing})")
    engine = state["trainer"]  # ignite stores the iteration and the epoch length, not always the epoch
    done = int(engine.get("epoch") or engine.get("iteration", 0) // max(1, engine.get("epoch_length") or 1))
    announce(f"resuming {stage} from {last} (epoch {done} of {epochs} done)")

    def restore(engine) -> None:  # at STARTED, after ignite has reset the state of a fresh run
        Checkpoint.load_objects(to_load=save_dict, checkpoint=state, strict=True)
        engine.state.max_epochs = epochs

    trainer.add_event_handler(Events.STARTED, restore)


class BestCheckpointWriter:
    """Ignite handler for the validator: writes a medimb checkpoint (docs/architecture.md) when the key
    metric improves, so ``models/*.pt`` work with ``medimb.networks.load_checkpoint``, ``medimb explain``,
    MONAI's ``CheckpointLoader(load_dict={"model": net})`` and ``ckpt_export --key_in_ckpt model``.

    (MONAI's ``CheckpointSaver`` stores only state dicts; the medimb contract also needs the architecture,
    ``model.config``, and the preprocessing that inference must repeat.) Writes on rank 0 only; atomic and
    checksummed (``medimb.networks.save_checkpoint``). The bundles' validator uses it.

    Args:
        save_path: the checkpoint file, e.g. ``models/model.pt``.
        network: the un-wrapped model (not the DDP wrapper) whose weights are saved.
        preprocessing: a :class:`medimb.data.Preprocessing` (or its dict).
        class_names: one name per class.
        method: recorded in the checkpoint, e.g. ``"cmsl-stage1"``.
        key_metric_name: metric of the validator's ``state.metrics`` to maximise; default its key metric.
        head_prior: the positive-class prior the head is fitted under (binary; None if none), recorded for
            the ``"prior"`` operating point (:func:`medimb.training.config.head_prior`).
    """

    def __init__(self, save_path: str, network, preprocessing, class_names: list[str], method: str,
                 key_metric_name: str | None = None, head_prior: float | None = None):
        self.save_path = save_path
        self.network = network
        self.preprocessing = preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else dict(preprocessing)
        self.class_names = [str(n) for n in class_names]
        self.method = method
        self.key_metric_name = key_metric_name
        self.head_prior = None if head_prior is None else float(head_prior)
        self.best = float("-inf")

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        name = self.key_metric_name or engine.state.key_metric_name
        value = float(engine.state.metrics[name])
        if not value > self.best:  # the first of equal scores is kept
            return
        self.best = value
        if is_main_process():
            save_checkpoint(self.save_path, self.network, preprocessing=self.preprocessing,
                            class_names=self.class_names, method=self.method, epoch=int(engine.state.epoch),
                            key_metric={name: value}, head_prior=self.head_prior)
