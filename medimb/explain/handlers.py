"""The overlay folder of ``medimb explain``, written by a MONAI evaluator handler (the bundles' inference).

A bundle's ``inference.json`` runs a ``monai.engines.SupervisedEvaluator`` over the cases (preprocessed with
the checkpoint's evaluation transforms, the network loaded by ``CheckpointLoader``, logits turned into class
probabilities by the ``postprocessing``). :class:`ExplainWriter` turns each iteration's decollated outputs
into what ``medimb explain`` writes, through the same per-case functions (:mod:`medimb.explain.pipeline`):
``<case>_<method>_on-<bg>.nii.gz`` heatmaps and ``_label`` maps in the source geometry, previews, and at the
end predictions.csv, index.html, load_in_slicer.py and explain.json. The folder is staged and renamed into
place when the run completes, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from medimb.errors import UserError
from medimb.evaluation.operating_point import resolve_operating_point
from medimb.networks import predict_proba

from .methods import create_explainer
from .outputs import staged_folder
from .pipeline import (_check_rerouting, _class_names, calibrate_maps, check_items_fit_model,
                       explain_preprocessed, resolve_map_scale, write_case, write_folder_files)
from .settings import CLASS_FREE_EXPLAINERS, ExplainSettings, background_channels

logger = logging.getLogger(__name__)

#: the key of each dataset item's position in ``items`` (the handler finds the case's source files by it)
INDEX_KEY = "case_index"


def dataset_items(items: Sequence[dict]) -> list[dict]:
    """What a bundle's inference ``dataset`` holds for ``items``
    (:func:`medimb.explain.inputs.resolve_items`): ``{"image": [path per channel], "case_index": i}``; the
    rest of each item (case name, split, truth mask) stays with :class:`ExplainWriter`, so unlabelled cases
    collate (no ``None`` label in the batch)."""
    return [{"image": list(item["image"]), INDEX_KEY: i} for i, item in enumerate(items)]


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DataParallel``/``DistributedDataParallel`` wrapper (explainers hook its
    layers)."""
    return getattr(network, "module", network)


class ExplainWriter:
    """MONAI handler for a ``SupervisedEvaluator`` (``decollate=True``) whose dataset is
    :func:`dataset_items` of ``items``: explains every case and writes the overlay folder ``output_dir``.

    Per iteration, each decollated case's preprocessed ``image`` ``(C, *S)`` MetaTensor (its applied
    operations invert the maps to the source grid) and ``pred`` (its ``(K,)`` class probabilities, from the
    evaluator's postprocessing) go to :func:`medimb.explain.pipeline.explain_preprocessed`, then
    :func:`~medimb.explain.pipeline.write_case`; the network is not run again for the prediction.

    Args:
        output_dir: the overlay folder (created at the end; must be empty or absent unless ``overwrite``).
        items: the cases, :func:`medimb.explain.inputs.resolve_items`.
        checkpoint: the checkpoint dict (:func:`medimb.networks.read_checkpoint_file`): its ``preprocessing``,
            ``class_names`` and binary operating point.
        settings: methods, thresholds, background, map scale
            (:class:`~medimb.explain.settings.ExplainSettings`).
        transform: the evaluation transforms the dataset applies (to invert the maps).
        calibration_items: validation cases on which ``settings.map_scale`` ``auto``/``calibrated`` calibrates
            one scale per method.
        decision_threshold: overrides the checkpoint's operating point (binary models).
        overwrite: replace a non-empty ``output_dir``.
        checkpoint_name: the checkpoint's file name, recorded in explain.json.
        network: the model to explain; default the evaluator's network.
        keep: entries of ``output_dir`` this run wrote before the evaluator started (``converted``: a DICOM
            study converted or a 4D DCE file split by :func:`medimb.explain.inputs.resolve_items`), moved into
            the final folder, which the overlays and the Slicer scenes point at.
    """

    def __init__(self, output_dir: str | Path, items: Sequence[dict], checkpoint: dict,
                 settings: ExplainSettings, transform, calibration_items: Sequence[dict] | None = None,
                 decision_threshold: float | None = None, overwrite: bool = False, checkpoint_name: str = "",
                 network: torch.nn.Module | None = None, image_key: str = "image", pred_key: str = "pred",
                 keep: Sequence[str] = ()):
        self.output_dir = Path(output_dir)
        self.items = list(items)
        self.meta = checkpoint
        self.preprocessing = dict(checkpoint["preprocessing"])
        self.settings = settings
        self.transform = transform
        self.calibration_items = list(calibration_items or [])
        self.decision_threshold = decision_threshold
        self.overwrite = overwrite
        self.checkpoint_name = checkpoint_name
        self.network = network
        self.image_key, self.pred_key = image_key, pred_key
        self.keep = tuple(keep)
        self._stack: contextlib.ExitStack | None = None
        self.summary: dict = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def _model(self, engine) -> torch.nn.Module:
        return _unwrap(self.network if self.network is not None else engine.network)

    def started(self, engine) -> None:
        """Check the cases against the model, open the staging folder, calibrate the map scale."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise UserError("inference writes one overlay folder from one process; run it without torchrun "
                            "(multi_gpu_evaluate.json is the multi-GPU evaluation)")
        model = self._model(engine)
        check_items_fit_model(model, self.preprocessing, self.items)
        channels = int(self.preprocessing.get("in_channels", 1))
        try:
            background_channels(self.settings.background, channels)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        methods = list(self.settings.methods)
        if methods and not hasattr(model, "forward_features"):
            raise UserError(f"explain_methods {methods} need the medimb network (network_def with its "
                            f"checkpoint weights); this network ({type(model).__name__}) has no feature map "
                            "to explain: pass --explain_methods \"[]\" for predictions only")
        self.map_scale = resolve_map_scale(self.settings, self.calibration_items) if methods else "per-case"
        if self.map_scale == "calibrated":
            check_items_fit_model(model, self.preprocessing, self.calibration_items)
        self.num_classes = int((self.meta.get("config") or {}).get("num_classes", 0)) or None
        try:
            self.point = resolve_operating_point(self.num_classes or 0, self.meta, self.decision_threshold)
        except ValueError as exc:
            raise UserError(f"decision_threshold: {exc}") from None
        self.decision = None if self.point is None else self.point["threshold"]
        self.explainers = {m: create_explainer(m, model) for m in methods}
        self._stack = contextlib.ExitStack()
        # the bundle checked that output_dir was empty (or --overwrite true) before the inputs were converted
        present = tuple(name for name in self.keep if (self.output_dir / name).exists())
        self.staging = self._stack.enter_context(
            staged_folder(self.output_dir, overwrite=self.overwrite or bool(present), keep=present))
        self.rows: dict[int, dict] = {}
        self.cases: dict[int, Any] = {}
        self.scales = None
        model.eval()
        if any(m not in CLASS_FREE_EXPLAINERS for m in methods):
            _check_rerouting(model, self.transform, self.items[0], channels)
        if self.map_scale == "calibrated":
            self.scales = calibrate_maps(model, self.transform, self.calibration_items, methods,
                                         self.settings.target_class, self.explainers, threshold=self.decision)

    def iteration_completed(self, engine) -> None:
        """Explain and write each case of the batch (``engine.state.batch``/``output``: decollated lists)."""
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(output, list):
            raise TypeError("ExplainWriter needs the evaluator's decollated outputs (decollate=True)")
        model = self._model(engine)
        model.eval()  # the evaluator's eval_mode restores the training flag after each iteration
        for case_in, case_out in zip(batch, output):
            index = int(case_in[INDEX_KEY])
            item = self.items[index]
            exp = explain_preprocessed(model, self.transform, {"image": case_out[self.image_key]}, item,
                                       list(self.settings.methods), self.settings.target_class, predict_proba,
                                       self.explainers, scales=self.scales, threshold=self.decision,
                                       probabilities=case_out[self.pred_key])
            self.num_classes = self.num_classes or len(exp.probabilities)
            class_names = _class_names(self.meta, len(exp.probabilities))
            self.rows[index] = write_case(self.staging, exp, self.settings, class_names, item=item)
            self.cases[index] = exp

    def completed(self, engine) -> None:
        """Write the folder files and move the folder into place."""
        missing = [self.items[i]["case"] for i in range(len(self.items)) if i not in self.cases]
        if missing:
            raise RuntimeError(f"the evaluator did not run {len(missing)} case(s), e.g. {missing[:3]}")
        order = range(len(self.items))
        self.summary = write_folder_files(
            self.staging, self.output_dir, self.items, [self.cases[i] for i in order],
            [self.rows[i] for i in order], self.settings, self.meta, self.num_classes, self.point,
            self.map_scale, self.scales, self.calibration_items, self.checkpoint_name)
        self._stack.close()  # staging -> output_dir
        self._stack = None
        logger.info("%d case(s) explained -> %s", len(self.items), self.output_dir)

    def exception_raised(self, engine, exc: BaseException) -> None:
        """Delete the staging folder, then let the error end the run (ignite does not re-raise by itself)."""
        if self._stack is not None:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
            self._stack = None
        raise exc
