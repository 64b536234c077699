"""A bundle's checkpoint without training: ``network_def`` and ``preprocessing`` of its train.json (with the
given overrides) saved the way ``BestCheckpointWriter`` saves them, so inference/evaluation tests skip the
training step (the training tests cover it)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers.paths import BUNDLES


def bundle_checkpoint(bundle: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Write ``path`` (a medimb checkpoint) for ``bundle``'s stage-1 network; returns ``path``.

    ``overrides``: config ids of train.json, e.g. ``dataset_dir``, ``spatial_size``, ``num_classes``. The
    weights are random (``seed``) but the BatchNorm statistics are non-trivial, as after training.
    """
    from monai.bundle import ConfigParser

    from medimb.networks import save_checkpoint

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    parser.update({"device": "cpu", **overrides})
    torch.manual_seed(seed)
    model = parser.get_parsed_content("network_def")
    preprocessing = parser.get_parsed_content("preprocessing")
    shape = [4, int(parser.get_parsed_content("num_channels")), *preprocessing.spatial_size]
    if preprocessing.slices:
        shape[-1] = preprocessing.slices
    model.train()
    with torch.no_grad():
        model(torch.randn(*shape))
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, model, preprocessing=preprocessing.to_dict(),
                           class_names=parser.get_parsed_content("class_names"), method="test", epoch=0)
