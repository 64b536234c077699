"""Predictions of a model over a dataset: the one place where evaluation runs a network.

Used by ``medimb train`` (final metrics, stage-2 tau search), ``medimb evaluate`` and the benchmarks.
"""

from __future__ import annotations

import torch

from medimb.data.loaders import make_loader
from medimb.networks import predict_proba

#: batch size of every evaluation pass (no gradients: memory allows more than training)
EVAL_BATCH = 64


def flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a ``(B, C, *S)`` tensor, as tensor dims: ``[(), (2,), (3,), (2, 3), ...]``
    (``2**spatial_dims`` entries, the identity first)."""
    axes = range(2, 2 + spatial_dims)
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(2**spatial_dims)]


def uses_flip_tta(requested: bool, preprocessing) -> bool:
    """Flip TTA only for models whose training augmentation flipped every axis (``flip_prob > 0``)."""
    return bool(requested) and preprocessing.augmentation.flip_prob > 0


@torch.no_grad()
def predict(model, dataset, device: torch.device, batch_size: int = EVAL_BATCH, num_workers: int = 0,
            flip_tta: bool = False) -> dict:
    """Run ``model.forward_all`` over ``dataset``: ``labels`` (N,), ``logits`` (N, K), ``proba`` (N, K),
    ``features`` (N, F), ``embedding`` (N, E) as numpy arrays.

    ``flip_tta``: test-time augmentation by flips, for models trained with random flips of every spatial
    axis. ``proba`` is then the mean of the class probabilities over all ``2**spatial_dims`` flipped copies
    of each input (8 in 3D, 4 in 2D), ``logits`` their mean; ``features``/``embedding`` stay those of the
    unflipped input.
    """
    model.eval().to(device)
    out: dict[str, list] = {"labels": [], "logits": [], "features": [], "embedding": [], "proba": []}
    for batch in make_loader(dataset, batch_size, num_workers=num_workers, device=device):
        x = batch["image"]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device)
        res = model.forward_all(x)
        out["labels"].append(torch.as_tensor(batch["label"]).reshape(-1))
        for k in ("features", "embedding"):
            out[k].append(res[k].float().cpu())
        logits = [res["logits"].float().cpu()]
        if flip_tta:
            logits += [model(x.flip(dims)).float().cpu() for dims in flip_combinations(x.ndim - 2)[1:]]
        out["logits"].append(torch.stack(logits).mean(0))
        out["proba"].append(torch.stack([predict_proba(model, z) for z in logits]).mean(0))
    return {k: torch.cat(v).numpy() for k, v in out.items()}
