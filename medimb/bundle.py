"""What a MONAI bundle under ``bundles/`` needs besides the library: where the bundle is, its inputs
checked up front, and a user's mistake reported as one line.

Everything that does work (data, networks, losses, training engines and handlers, evaluation, explain) is
the library, composed in the bundles' JSON through ``_target_`` and ``$`` expressions; this module only

- finds the bundle root from the config file being run, so no path depends on the working directory;
- checks the dataset folder, datalist and checkpoints before any work, in one line each
  (:class:`BundleInputError`);
- :func:`report_user_errors`: a :class:`medimb.errors.UserError` raised anywhere in a bundle run (a
  checkpoint that does not fit, bad data inside a transform) ends the run with one line, not a chain of
  MONAI's "Failed to evaluate" errors.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path

from medimb.errors import user_error_in
from medimb.runtime import is_main_process

logger = logging.getLogger("medimb.bundle")
PREFIX = "medimb bundle: error: "


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


def report_user_errors() -> bool:
    """Install an exception hook that prints a :class:`~medimb.errors.UserError` found anywhere in an
    uncaught exception's chain as one line (``medimb bundle: error: ...``; exit status 1) and leaves every
    other error's traceback as it was. Returns ``True`` so it can sit first in a bundle's ``initialize``."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb) -> None:
        found = user_error_in(exc)
        if found is None:
            previous(exc_type, exc, tb)
        else:
            print(PREFIX + str(found).splitlines()[0], file=sys.stderr)

    sys.excepthook = hook
    return True


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


def report_checkpoint(path: str) -> str:
    """Log where the best checkpoint is (the bundle's ``finalize`` step); raise if training wrote none."""
    if is_main_process():
        if not Path(path).is_file():
            raise BundleInputError(f"no checkpoint was written to {path}: did validation run (val_interval)?")
        logger.info("best checkpoint: %s", path)
    return path


def check_checkpoint(path: str, what: str = "the") -> bool:
    """One clear line when a checkpoint the bundle needs is missing (e.g. stage 2 before stage 1)."""
    if not Path(path).is_file():
        raise BundleInputError(
            f"{what} checkpoint {path} does not exist; run the earlier bundle step first or pass --ckpt_dir / the "
            "checkpoint path override"
        )
    return True


def check_dataset_dir(dataset_dir: str, data: str) -> bool:
    """One clear line when the dataset folder or the input (datalist, folder, file) of inference is missing."""
    if not Path(dataset_dir).is_dir():
        raise BundleInputError(
            f"dataset_dir {str(dataset_dir)!r} does not exist or is not a folder; pass --dataset_dir /path/to/data"
        )
    if not Path(data).exists():
        raise BundleInputError(f"{data} does not exist; pass --datalist (a datalist JSON, a NIfTI folder or file)")
    return True


def flag(value, name: str = "flag") -> bool:
    """A yes/no override as the bundle command line gives it: ``--overwrite true`` arrives as the string
    ``"true"`` (``--overwrite True`` as a bool), and ``"false"`` must not count as true. Accepts bools, 0/1 and
    true/false/yes/no/1/0 in any case; anything else is a :class:`BundleInputError`."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0", "none", ""):
        return False
    raise BundleInputError(f"--{name} {value!r}: pass true or false")


def check_output_dir(path: str, overwrite: bool | str = False) -> bool:
    """Refuse, in one line, to write into a non-empty output folder unless ``overwrite`` (as ``medimb explain``
    does without ``--overwrite``): a second inference run must not silently replace the first one's overlays."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise BundleInputError(f"output_dir {path} exists and is not a folder; pass another --output_dir")
    if out.is_dir() and any(out.iterdir()) and not flag(overwrite, "overwrite"):
        raise BundleInputError(f"output_dir {path} is not empty; pass --overwrite true to replace it, or another "
                               "--output_dir")
    return True


def _plain(value):
    """``value`` with tuples as lists (a config compared with its JSON round trip)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_network_def(ckpt_path: str, network) -> bool:
    """One line when ``network_def`` cannot take the checkpoint's weights, instead of ``CheckpointLoader``'s long
    strict-loading error, or silently differs from the trained network (e.g. another CMSL scale).

    Compares the weight names and shapes, and, when ``network`` is a medimb model (``network.config``; a
    TorchScript module has none), its config with the checkpoint's ``config``. Returns ``True``.
    """
    from medimb.errors import CheckpointError
    from medimb.networks import read_checkpoint_file

    try:
        payload = read_checkpoint_file(ckpt_path)
    except CheckpointError as exc:
        raise BundleInputError(str(exc)) from None
    state, trained = payload.get("model"), payload.get("config")
    if not isinstance(state, dict):
        raise BundleInputError(f"{ckpt_path}: holds no 'model' weights (not a medimb checkpoint)")
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    differ = sorted(set(expected) ^ set(found)) + [k for k in expected if k in found and expected[k] != found[k]]
    config = getattr(network, "config", None)
    if not differ and (config is None or trained is None or _plain(config) == _plain(trained)):
        return True
    what = f"weights {differ[:3]}{' ...' if len(differ) > 3 else ''} differ" if differ else "configs differ"
    raise BundleInputError(f"network_def does not match {ckpt_path} ({what}); the checkpoint's network is "
                           f"{trained}: override network_def's ids to match it")
