"""The training tests' data and configs: a tiny learnable MedMNIST-style archive and tiny configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medimb.training import TrainConfig, method_config

TINY_NETWORK = {"widths": [4, 8], "depths": [0, 1]}


def tiny_npz(path: Path, n_train: int = 48, n_eval: int = 16, size: int = 12, seed: int = 0) -> Path:
    """3D uint8 volumes; class 1 (minority, ~1/3) has a bright cube in the centre, class 0 a faint one."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        labels = (np.arange(n) % 3 == 0).astype(np.uint8)
        rng.shuffle(labels)
        imgs = rng.integers(0, 60, size=(n, size, size, size), dtype=np.uint8)
        c = size // 2
        for i, lab in enumerate(labels):
            imgs[i, c - 3 : c + 3, c - 3 : c + 3, c - 3 : c + 3] += np.uint8(180 if lab else 40)
        arrays[f"{split}_images"] = imgs
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(path, **arrays)
    return path


def tiny_config(data: Path, out: Path, method: str = "crt", epochs: int = 2, stage2_epochs: int = 2,
                seed: int = 0) -> TrainConfig:
    """A CPU config of ``method`` on the tiny network: batch 8, ``epochs`` (stage 1), ``stage2_epochs``."""
    m = method_config(method)
    m.stage1.epochs = epochs
    m.stage1.batch_size = 8
    if m.stage2 is not None:
        m.stage2.epochs = stage2_epochs
        m.stage2.batch_size = 8
    return TrainConfig(data=str(data), out=str(out), method=m, network_kwargs=dict(TINY_NETWORK), seed=seed,
                       device="cpu")
