"""Checkpoints as in docs/architecture.md: ``{"model": state_dict, "config": model.config, **meta}``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medimb.atomic import atomic_output
from medimb.networks.model import ImbalanceClassifier, create_model

RESERVED_KEYS = ("model", "config")


class CheckpointError(ValueError):
    """A file that is not a medimb checkpoint, or whose weights do not fit its configuration."""


def save_checkpoint(path: str | os.PathLike, model: ImbalanceClassifier, **meta: Any) -> Path:
    """Write ``model`` and ``meta`` (e.g. ``preprocessing``, ``class_names``, ``method``, ``epoch``) atomically.

    The file is written to a temporary name in the same folder and renamed, so a crash never
    leaves a truncated checkpoint at ``path``. Returns ``path``.
    """
    clash = [key for key in RESERVED_KEYS if key in meta]
    if clash:
        raise ValueError(f"meta may not use the reserved key(s) {clash}")
    if not hasattr(model, "config"):
        raise TypeError(f"expected a model from medimb.networks.create_model, got {type(model).__name__}")
    path = Path(path)
    payload = {"model": model.state_dict(), "config": model.config, **meta}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:5]}{' ...' if len(shapes) > 5 else ''}")
    if problems:
        raise CheckpointError(f"{path}: weights do not match the stored config: " + "; ".join(problems))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[ImbalanceClassifier, dict[str, Any]]:
    """Rebuild the model from ``path``; returns ``(model in eval mode, the checkpoint dict without "model")``.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for a file that is
    not a medimb checkpoint (no ``config``/``model``), a config ``create_model`` rejects, or weights
    whose keys or shapes do not match that config.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for non-checkpoint files
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or not all(key in payload for key in RESERVED_KEYS):
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a medimb checkpoint (needs 'model' and 'config', has {keys})")
    config = payload["config"]
    try:
        model = create_model(**config)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the stored config cannot build a model ({exc}); config={config}") from exc
    _check_state_dict(model, payload["model"], path)
    model.load_state_dict(payload["model"])
    model.to(map_location)
    model.eval()
    meta = {key: value for key, value in payload.items() if key != "model"}
    return model, meta
