"""Checkpoints as in docs/architecture.md:
``{"model": state_dict, "config": model.config, **meta, "sha256": digest}``.

Every checkpoint medimb writes (the model files ``stage1_best.pt``/``final.pt``/bundle ``models/*.pt`` and
the engine states under ``state/`` that ``--resume`` reads) goes through :func:`write_checkpoint_file`, and
every one it reads through :func:`read_checkpoint_file`: ``torch.load(weights_only=True)`` (nothing is
unpickled beyond tensors and plain containers) and a SHA-256 of the content checked against the digest stored
beside it. A truncated, corrupted or hand-edited file is a :class:`CheckpointError` (one line naming the
file), never a model with garbage weights. Files written before the digest existed load with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medimb.atomic import atomic_output
from medimb.errors import CheckpointError, CheckpointNotFoundError
from medimb.networks.model import ImbalanceClassifier, create_model

logger = logging.getLogger(__name__)

RESERVED_KEYS = ("model", "config")
#: key of the content digest inside every checkpoint file medimb writes
CHECKSUM_KEY = "sha256"


def _feed(h, obj: Any) -> None:
    """Add ``obj`` to hash ``h`` canonically: what is hashed is the content, not its pickled bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}|".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):  # a tuple may come back as a list from other writers: same content
        h.update(f"L{len(obj)}|".encode())
        for value in obj:
            _feed(h, value)
    else:  # str, int, float, bool, None, torch.dtype/device ...: repr is exact and deterministic
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())


def checkpoint_digest(payload: Mapping) -> str:
    """SHA-256 (hex) of a checkpoint dict's content: every entry but ``CHECKSUM_KEY``; tensors by dtype, shape
    and bytes. Independent of the device the tensors are on and of how the file was serialised."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def write_checkpoint_file(path: str | os.PathLike, payload: Mapping) -> Path:
    """``torch.save`` ``payload`` plus its :func:`checkpoint_digest` under ``CHECKSUM_KEY``, atomically
    (temporary file in the same folder, then rename): a crash never leaves a truncated file at ``path``."""
    path = Path(path)
    if CHECKSUM_KEY in payload:
        raise ValueError(f"payload may not use the reserved key {CHECKSUM_KEY!r}")
    data = {**payload, CHECKSUM_KEY: checkpoint_digest(payload)}
    with atomic_output(path) as tmp:
        torch.save(data, tmp)
    return path


def read_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely and check its digest; returns it without ``CHECKSUM_KEY``.

    ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled. Raises
    :class:`~medimb.errors.CheckpointNotFoundError` (a ``FileNotFoundError`` too) for a missing file and :class:`CheckpointError` for a file torch cannot read
    (truncated, not a checkpoint), that is not a dict, or whose content does not match its stored digest.
    A dict without a digest (written before medimb stored one) is returned with a logged warning.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for truncated or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: truncated, corrupt or not a "
                              f"checkpoint ({first})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (holds a {type(payload).__name__})")
    stored = payload.pop(CHECKSUM_KEY, None)
    if stored is None:
        logger.warning("%s has no %s checksum (written before medimb stored one): loaded without an integrity "
                       "check; re-save it to add one", path, CHECKSUM_KEY)
        return payload
    actual = checkpoint_digest(payload)
    if stored != actual:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt (stored sha256 "
                              f"{str(stored)[:12]}..., content {actual[:12]}...); restore it from a copy or "
                              "re-create it")
    return payload


def save_checkpoint(path: str | os.PathLike, model: ImbalanceClassifier, **meta: Any) -> Path:
    """Write ``model`` and ``meta`` (e.g. ``preprocessing``, ``class_names``, ``method``, ``epoch``) with a
    content checksum, atomically (:func:`write_checkpoint_file`): a crash never leaves a truncated checkpoint
    at ``path``. Returns ``path``.
    """
    clash = [key for key in (*RESERVED_KEYS, CHECKSUM_KEY) if key in meta]
    if clash:
        raise ValueError(f"meta may not use the reserved key(s) {clash}")
    if not hasattr(model, "config"):
        raise TypeError(f"expected a model from medimb.networks.create_model, got {type(model).__name__}")
    return write_checkpoint_file(path, {"model": model.state_dict(), "config": model.config, **meta})


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


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    needs_preprocessing: bool = False,
) -> tuple[ImbalanceClassifier, dict[str, Any]]:
    """The one checkpoint loader: rebuild the model from ``path``; returns ``(model in eval mode on
    map_location, the checkpoint dict without "model")``.

    Reads through :func:`read_checkpoint_file` (weights-only load, checksum check). Every failure is a
    one-line :class:`~medimb.errors.CheckpointError` naming the file: missing
    (:class:`~medimb.errors.CheckpointNotFoundError`), truncated or corrupt, not a medimb checkpoint (no
    ``config``/``model``), a config ``create_model`` rejects, weights whose keys or shapes do not match that
    config, a network whose ``in_channels``/``num_classes`` differ from the ones given, or (with
    ``needs_preprocessing``) no stored ``preprocessing`` to rebuild the evaluation transforms from.
    """
    path = Path(path)
    payload = read_checkpoint_file(path, map_location="cpu")
    if not all(key in payload for key in RESERVED_KEYS):
        raise CheckpointError(f"{path}: not a medimb checkpoint (needs 'model' and 'config', "
                              f"has {sorted(payload)})")
    config = payload["config"]
    try:
        model = create_model(**config)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the stored config cannot build a model ({exc}); config={config}") from exc
    _check_state_dict(model, payload["model"], path)
    for key, wanted in (("in_channels", in_channels), ("num_classes", num_classes)):
        if wanted is not None and int(config.get(key, -1)) != int(wanted):
            raise CheckpointError(f"{path}: the network has {key}={config.get(key)}, {wanted} expected")
    if needs_preprocessing and not payload.get("preprocessing"):
        raise CheckpointError(f"{path}: no 'preprocessing' entry (not written by medimb train or a medimb "
                              "bundle): its evaluation transforms cannot be rebuilt")
    model.load_state_dict(payload["model"])
    model.to(map_location)
    model.eval()
    meta = {key: value for key, value in payload.items() if key != "model"}
    return model, meta
