"""Run-time settings every command shares: the device, and library warnings that say nothing to users.

Imports no torch at module level: ``medimb.cli`` quiets warnings before every command, and commands that need
no torch (``medimb export-dicom``) should not pay for importing it.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

from medimb.errors import UserError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda[:N]"`` on a machine without CUDA is a
    :class:`~medimb.errors.UserError` (one line) instead of a failure at the first tensor moved there."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, auto): {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def is_main_process() -> bool:
    """True on rank 0 of an initialised process group, or when not distributed: the process that writes."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


#: (message regex, category, module regex) of warnings that are about the libraries, not the user's run
QUIET_WARNINGS = (
    (r".*codec.*", UserWarning, r"monai\..*"),  # MONAI probing optional image codecs at import
    (r".*pkg_resources is deprecated.*", UserWarning, r".*"),
    (r".*TensorFloat32.*|.*tf32.*", UserWarning, r"torch\..*"),
    (r".*", DeprecationWarning, r"(monai|ignite|torch)\..*"),
    (r".*", FutureWarning, r"(monai|ignite)\..*"),
)


#: (logger, message start) of library log records that are about the machine's optional codecs, not the run
QUIET_LOG_RECORDS = (
    ("monai.data.nvimgcodec_pydicom_plugin", "nvImageCodec is not available"),  # once per image reader
)


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_warnings() -> None:
    """Hide warnings and log records that the libraries print on every command and the user cannot act on;
    warnings about the user's data or run still show (``--verbose`` shows everything)."""
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in QUIET_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropRecords(prefix))
