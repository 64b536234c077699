"""Glue that only the MONAI bundles under ``bundles/`` need.

Bundle configs reference these with ``$medimb.bundle_utils...`` or ``_target_``. Everything that does real
work (data, networks, losses, training, explain, evaluation) lives in the library; this module only

- finds the bundle root from the config file being run, so no path depends on the working directory;
- checks the dataset folder and datalist up front, turning a user mistake into one clear line
  (:class:`BundleInputError`) instead of a chain of config-expression errors.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from medimb.atomic import write_text_atomic


class BundleInputError(SystemExit):
    """A mistake in the bundle's inputs (dataset dir, datalist, checkpoint).

    A :class:`SystemExit` on purpose: MONAI's config parser wraps every ``Exception`` raised inside a
    ``$`` expression in ``RuntimeError("Failed to evaluate ...")`` chains; a ``SystemExit`` passes through
    them, so ``python -m monai.bundle run`` (and torchrun) ends with exit status 1 and exactly this message.
    """

    def __init__(self, message: str):
        super().__init__(f"medimb bundle: error: {message}")
        self.message = message

    def __str__(self) -> str:
        return str(self.code)


def _config_root_from_stack() -> Path | None:
    """``config_root_path`` of the :class:`monai.bundle.ConfigWorkflow` that is evaluating this config."""
    from monai.bundle import ConfigWorkflow

    for frame_info in inspect.stack(context=0):
        candidate = frame_info.frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return Path(candidate.config_root_path)
    return None


def _config_root_from_argv(argv: list[str]) -> Path | None:
    """Folder of the first ``--config_file`` on the command line (``X``, ``"['X','Y']"``, ``--config_file=X``)."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value:
            first = value.strip("[]() ").split(",")[0].strip().strip("'\"")
            return Path(first).parent
    return None


def bundle_root() -> str:
    """Absolute path of the bundle being run: the folder that holds ``configs/``.

    Used as the default of the ``bundle_root`` config id so that checkpoints and outputs land inside the
    bundle whatever the working directory; ``--bundle_root DIR`` still overrides it. Looks at the running
    ``ConfigWorkflow`` first, then at ``--config_file`` on the command line, then falls back to the working
    directory (the model-zoo convention of running from the bundle root).
    """
    root = _config_root_from_stack() or _config_root_from_argv(sys.argv)
    if root is None:
        return os.path.abspath(".")
    root = root.resolve()
    return str(root.parent if root.name == "configs" else root)


def check_inputs(dataset_dir: str, datalist: str, num_channels: int | None = None, num_classes: int | None = None) -> bool:
    """Fail early, in one line, on a missing dataset folder or a datalist that cannot be trained on.

    Args:
        dataset_dir: the folder given by ``--dataset_dir`` (the converted data, holding the datalist).
        datalist: path of the datalist JSON (``training``/``validation``/``test`` items with ``image``
            and ``label``; image paths relative to the datalist's folder).
        num_channels: the number of image paths (channels) each item must have, e.g. 3 DCE phases.
        num_classes: labels must lie in ``[0, num_classes)``.

    Returns ``True`` so that it can sit in a bundle's ``initialize`` list. Raises :class:`BundleInputError`.
    """
    from medimb.data.datalist import load_datalist
    from medimb.data.errors import DataError

    if not Path(dataset_dir).is_dir():
        raise BundleInputError(
            f"dataset_dir {str(dataset_dir)!r} does not exist or is not a folder; pass "
            "--dataset_dir /path/to/converted (the folder holding datalist.json from `medimb-prep datalist`)"
        )
    try:
        splits = load_datalist(datalist, num_classes=num_classes)
    except DataError as exc:
        raise BundleInputError(str(exc)) from None
    if num_channels is not None:
        found = len(splits["train"][0]["image"])
        if found != num_channels:
            raise BundleInputError(
                f"{datalist}: items have {found} image(s) (channels) but the bundle expects {num_channels}; "
                f"set --num_channels {found} (and the metadata's num_channels) or rebuild the datalist"
            )
    return True


def is_main_process() -> bool:
    """True on rank 0 of an initialised process group, or when not distributed."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def class_counts(items: list[dict], num_classes: int) -> list[int]:
    """Items per class ``(K,)`` of datalist ``items`` (each with an int ``label``)."""
    counts = [0] * int(num_classes)
    for item in items:
        counts[int(item["label"])] += 1
    return counts


class CheckpointSaver:
    """Ignite handler for the validator: writes a medimb checkpoint (docs/architecture.md) when the key
    metric improves, so ``models/*.pt`` work with ``medimb.networks.load_checkpoint``, ``medimb explain``,
    MONAI's ``CheckpointLoader(load_dict={"model": net})`` and ``ckpt_export --key_in_ckpt model``.

    MONAI's own ``CheckpointSaver`` stores only state dicts; the medimb contract also needs the
    architecture (``model.config``) and the preprocessing that inference must repeat. Writes on rank 0
    only; atomic (``medimb.networks.save_checkpoint``).

    Args:
        save_path: the checkpoint file, e.g. ``models/model.pt``.
        network: the un-wrapped model (not the DDP wrapper) whose weights are saved.
        preprocessing: a :class:`medimb.data.Preprocessing` (or its dict).
        class_names: one name per class.
        method: recorded in the checkpoint, e.g. ``"cmsl-stage1"``.
        key_metric_name: metric of the validator's ``state.metrics`` to maximise; default its key metric.
    """

    def __init__(self, save_path: str, network, preprocessing, class_names: list[str], method: str,
                 key_metric_name: str | None = None):
        self.save_path = save_path
        self.network = network
        self.preprocessing = preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else dict(preprocessing)
        self.class_names = [str(n) for n in class_names]
        self.method = method
        self.key_metric_name = key_metric_name
        self.best = float("-inf")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        from medimb.networks import save_checkpoint

        name = self.key_metric_name or engine.state.key_metric_name
        value = float(engine.state.metrics[name])
        if not value > self.best:  # the first of equal scores is kept
            return
        self.best = value
        if is_main_process():
            save_checkpoint(self.save_path, self.network, preprocessing=self.preprocessing,
                            class_names=self.class_names, method=self.method, epoch=int(engine.state.epoch),
                            key_metric={name: value})


def _ddp_classes():
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    class _AllOutputs(nn.Module):
        """``forward(x) = model.forward_all(x)``, so DDP's forward (and its gradient all-reduce) runs it."""

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.forward_all(x)

    class DistributedClassifier(DistributedDataParallel):
        """DDP around a medimb model that keeps the API the medimb engines use.

        ``forward_all(x)`` goes through ``DistributedDataParallel.forward``, so gradients are all-reduced
        (calling ``ddp.module.forward_all`` would silently skip that); ``backbone_frozen`` is the wrapped
        model's, so ``Stage2Trainer`` accepts it. ``ddp(x)`` also returns the ``forward_all`` dict.
        """

        def forward_all(self, x):
            return self(x)

        @property
        def backbone_frozen(self) -> bool:
            return bool(getattr(self.module.model, "backbone_frozen", False))

    return _AllOutputs, DistributedClassifier


def distributed(model, device, find_unused_parameters: bool = True):
    """Wrap ``model`` (already on ``device``) for DistributedDataParallel training with medimb engines.

    Call it after :func:`medimb.training.engines.prepare_stage2` in stage 2: DDP registers the
    parameters that require gradients when it is built. ``find_unused_parameters`` defaults to True
    because ``forward_all`` computes the embedding even when no metric loss uses it.
    """
    import torch

    wrapper_cls, ddp_cls = _ddp_classes()
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return ddp_cls(wrapper_cls(model), device_ids=ids, output_device=ids[0] if ids else None,
                   find_unused_parameters=find_unused_parameters)


def report_checkpoint(path: str) -> str:
    """Log where the best checkpoint is (the bundle's ``finalize`` step); raise if training wrote none."""
    import logging

    if is_main_process():
        if not Path(path).is_file():
            raise BundleInputError(f"no checkpoint was written to {path}: did validation run (val_interval)?")
        logging.getLogger("medimb.bundle").info("best checkpoint: %s", path)
    return path


def check_checkpoint(path: str, what: str = "the") -> bool:
    """One clear line when a checkpoint the bundle needs is missing (e.g. stage 2 before stage 1)."""
    if not Path(path).is_file():
        raise BundleInputError(
            f"{what} checkpoint {path} does not exist; run the earlier bundle step first or pass --ckpt_dir / the "
            "checkpoint path override"
        )
    return True


def load_model(path: str, num_channels: int | None = None, num_classes: int | None = None, device="cpu"):
    """``medimb.networks.load_checkpoint(path)[0]``, with a one-line error when it does not fit the bundle.

    Returns the model (eval mode) on ``device``; ``num_channels``/``num_classes`` are checked against the
    checkpoint's architecture.
    """
    from medimb.networks import load_checkpoint

    check_checkpoint(path)
    try:
        model, _ = load_checkpoint(path, map_location=device)
    except Exception as exc:  # noqa: BLE001 - any unreadable/mismatched checkpoint becomes one line
        raise BundleInputError(str(exc).splitlines()[0]) from None
    config = model.config
    for key, want in (("in_channels", num_channels), ("num_classes", num_classes)):
        if want is not None and int(config[key]) != int(want):
            raise BundleInputError(f"{path}: the checkpoint's network has {key}={config[key]}, the bundle expects {want}")
    return model


def load_preprocessing(path: str) -> dict:
    """The ``preprocessing`` dict stored in a medimb checkpoint (to rebuild the evaluation transforms).

    Read like every checkpoint (``medimb.networks.read_checkpoint_file``: weights-only load, checksum)."""
    from medimb.networks import read_checkpoint_file

    check_checkpoint(path)
    try:
        meta = read_checkpoint_file(path)
    except Exception as exc:  # noqa: BLE001 - unreadable/corrupt checkpoint: one line
        raise BundleInputError(str(exc).splitlines()[0]) from None
    if not meta.get("preprocessing"):
        raise BundleInputError(f"{path} has no 'preprocessing' entry: not a checkpoint written by medimb")
    return meta["preprocessing"]


class MetricsReport:
    """Ignite handler for an evaluator: collects logits (B, K) and labels (B,) over one epoch, then writes
    ``output_dir/metrics.json`` (``medimb.evaluation.metrics.compute_metrics``), ``output_dir/predictions.csv``
    and the ROC, PR and confusion-matrix plots (``medimb.evaluation.plots``). Rank 0 only; atomic writes.

    Args:
        output_dir: folder for the outputs.
        network: the model, its head decides softmax vs sigmoid (``medimb.networks.predict_proba``).
        class_names: one name per class.
        split: name of the evaluated split, recorded in ``metrics.json``.
    """

    def __init__(self, output_dir: str, network, class_names: list[str], split: str = "test",
                 cases: list[str] | None = None):
        self.output_dir = Path(output_dir)
        self.network = network
        self.class_names = [str(n) for n in class_names]
        self.split = split
        self.cases = cases
        self.written: dict[str, str] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine) -> None:
        self._logits, self._labels = [], []

    def _collect(self, engine) -> None:
        import torch

        out = engine.state.output
        self._logits.append(out["pred"].detach().float().cpu())
        self._labels.append(torch.as_tensor(out["label"]).reshape(-1).cpu())

    def _write(self, engine) -> None:
        import csv
        import io
        import json

        import torch

        from medimb.evaluation import plots
        from medimb.evaluation.metrics import compute_metrics
        from medimb.networks import predict_proba

        if not is_main_process():
            return
        labels = torch.cat(self._labels).numpy()
        proba = predict_proba(self.network, torch.cat(self._logits)).numpy()
        metrics = compute_metrics(labels, proba)
        report = {"split": self.split, "class_names": self.class_names, **metrics}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.output_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case", "label", "predicted", *[f"prob_{n}" for n in self.class_names]])
        cases = self.cases or [str(i) for i in range(len(labels))]
        for case, y, p in zip(cases, labels, proba):
            writer.writerow([case, int(y), int(p.argmax()), *[f"{v:.6f}" for v in p]])
        write_text_atomic(self.output_dir / "predictions.csv", buf.getvalue())
        self.written = {"metrics": str(self.output_dir / "metrics.json")}
        if len(set(labels.tolist())) > 1:  # curves need both classes
            for name, fn in (("roc", plots.plot_roc), ("pr", plots.plot_pr)):
                self.written[name] = str(fn(labels, proba, self.output_dir / f"{name}.png", class_names=self.class_names))
        self.written["confusion_matrix"] = str(plots.plot_confusion_matrix(
            labels, proba, self.output_dir / "confusion_matrix.png", class_names=self.class_names))
        import logging

        keys = ("balanced_accuracy", "auc", "accuracy", "macro_f1")
        logging.getLogger("medimb.bundle").info(
            "%s metrics: %s -> %s", self.split,
            ", ".join(f"{k}={metrics[k]:.3f}" if metrics[k] is not None else f"{k}=n/a" for k in keys),
            self.output_dir / "metrics.json")


def explain(ckpt_path: str, data: str, output_dir: str, methods: list[str], split: str | None = "test",
            threshold: float | None = None, previews: bool = True) -> dict:
    """Inference with overlays through ``medimb.explain``: ``output_dir/predictions.csv`` and, per case, the
    heatmap NIfTI in the source geometry, its label map, PNG previews, ``index.html`` and ``load_in_slicer.py``.

    ``data``: a datalist JSON (``split`` picks one split, None = all), a folder of NIfTI files or one file.
    The output folder is replaced (the explain pipeline stages it and moves it into place). User mistakes
    become :class:`BundleInputError`. Returns the explain summary.
    """
    import logging

    from medimb.cli import UserError
    from medimb.explain.inputs import resolve_items
    from medimb.explain.pipeline import ExplainSettings, load_model as load_explain_model, run_explain

    settings = ExplainSettings(methods=list(methods), previews=bool(previews))
    if threshold is not None:
        settings.threshold = float(threshold)
    try:
        items = resolve_items(data, split)
        model, meta = load_explain_model(ckpt_path)
        summary = run_explain(model, meta, items, output_dir, settings, overwrite=True, progress=False,
                              checkpoint_name=Path(ckpt_path).name)
    except UserError as exc:
        raise BundleInputError(str(exc)) from None
    logging.getLogger("medimb.bundle").info(
        "explained %d case(s) with %s -> %s (predictions.csv, index.html, load_in_slicer.py)",
        len(summary["cases"]), ", ".join(settings.methods), output_dir)
    return summary


def check_dataset_dir(dataset_dir: str, data: str) -> bool:
    """One clear line when the dataset folder or the input (datalist, folder, file) of inference is missing."""
    if not Path(dataset_dir).is_dir():
        raise BundleInputError(
            f"dataset_dir {str(dataset_dir)!r} does not exist or is not a folder; pass --dataset_dir /path/to/data"
        )
    if not Path(data).exists():
        raise BundleInputError(f"{data} does not exist; pass --datalist (a datalist JSON, a NIfTI folder or file)")
    return True


def fit_pixdim(image_paths, spatial_size, orientation: str = "RAS") -> tuple[float, ...]:
    """Voxel spacing (mm, in the array-axis order of ``orientation``) at which the largest field of view
    among ``image_paths`` (one path or a list) fills ``spatial_size`` (also in that order):
    :func:`medimb.data.datasets.infer_pixdim`
    for orientations other than RAS, e.g. ``"SAR"`` (axial slices first, as the 2.5D ``slice_pool``
    network reads them along the first spatial axis)."""
    from medimb.data.datasets import infer_pixdim

    world = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    axes = [world[c] for c in orientation.upper()]
    if sorted(axes) != [0, 1, 2] or len(spatial_size) != 3:
        raise BundleInputError(f"orientation {orientation!r} / spatial_size {list(spatial_size)} are not a 3D axis order")
    size_ras = [0, 0, 0]
    for ax, w in enumerate(axes):
        size_ras[w] = int(spatial_size[ax])
    pix_ras = infer_pixdim(image_paths, tuple(size_ras))
    return tuple(pix_ras[w] for w in axes)


def init_distributed() -> dict:
    """Join the process group that ``torchrun`` describes (idempotent); returns ``rank``, ``world_size``,
    ``local_rank``. Backend NCCL with CUDA, gloo otherwise (CPU runs and CI)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise BundleInputError(
                "multi_gpu_train.json needs torchrun: torchrun --nproc_per_node=N -m monai.bundle run --config_file ..."
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0))}


def finish_distributed() -> None:
    """Wait for every rank (rank 0 may still be writing the checkpoint), then leave the process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
