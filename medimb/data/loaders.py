"""The data loader every medimb pass uses (training, validation, prediction)."""

from __future__ import annotations

from monai.data import DataLoader


def make_loader(dataset, batch_size: int, sampler=None, num_workers: int = 0, device=None) -> DataLoader:
    """A MONAI ``DataLoader`` in dataset order (or ``sampler``'s), pinning memory when ``device`` is CUDA."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      pin_memory=device is not None and getattr(device, "type", str(device)) == "cuda")
