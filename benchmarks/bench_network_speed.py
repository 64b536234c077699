"""Training throughput of medimb networks on CPU: volumes/s for forward + backward + optimiser step.

Measures the default network (``cpunet``) with channels-last on and off, its full-resolution-stem
variant (``stem_width=8``), against the plain 4-stage
16-128-channel 3D CNN baseline (``plain_cnn``), interleaved in one run (round-robin, median over
rounds) so that load from other processes affects every network alike. The 1-minute load average
is recorded before and after, because the dev machine's CPU is shared.

    .venv/bin/python benchmarks/bench_network_speed.py --threads 2 --batch 64 --size 28
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from medimb.networks import create_model

CANDIDATES = [
    ("cpunet", {"channels_last": True}),
    ("cpunet", {"channels_last": False}),
    ("cpunet", {"stem_width": 8, "channels_last": True}),
    ("plain_cnn", {"channels_last": True}),
    ("plain_cnn", {"channels_last": False}),
]
BASELINE = 4  # index of the plain CNN as the issue describes it (default memory format)


def _load() -> float:
    return os.getloadavg()[0]


def measure(model: torch.nn.Module, batch: int, size: int, spatial_dims: int, steps: int) -> float:
    """Volumes/s over ``steps`` SGD steps (after two warm-up steps) on random ``(batch, 1, size^dims)`` input."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, *([size] * spatial_dims))
    y = torch.randint(0, 2, (batch,))
    model.train()
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return batch * steps / (time.perf_counter() - start)


def cost_per_volume(model: torch.nn.Module, size: int, spatial_dims: int) -> tuple[float, int]:
    """(GFLOP for forward + backward, conv output elements) per volume, from a batch of 4."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(4, 1, *([size] * spatial_dims))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    sizes: list[int] = []
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel())) for m in model.modules()
             if isinstance(m, convs)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return counter.get_total_flops() / 4 / 1e9, sum(sizes) // 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--spatial-dims", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds; the median is reported")
    parser.add_argument("--out", help="optional JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        f"{name} {kw}": create_model(name, in_channels=1, num_classes=2, spatial_dims=args.spatial_dims, **kw)
        for name, kw in CANDIDATES
    }
    load_before = _load()
    rates: dict[str, list[float]] = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            rates[key].append(measure(model, args.batch, args.size, args.spatial_dims, args.steps))
    load_after = _load()
    baseline = statistics.median(rates[list(models)[BASELINE]])
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}^{args.spatial_dims}, "
          f"{platform.processor() or platform.machine()}; load avg (1 min) before {load_before:.2f}, after {load_after:.2f}")
    print("| network | settings | channels-last | volumes/s (median) | range | epoch of 1188 volumes | vs plain CNN "
          "| GFLOP/volume (fwd+bwd) | conv activations/volume |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    results = []
    for (name, kw), key in zip(CANDIDATES, models):
        med = statistics.median(rates[key])
        settings = ", ".join(f"{k}={v}" for k, v in models[key].config.items() if k in ("widths", "depths", "stem_width"))
        gflop, activations = cost_per_volume(models[key], args.size, args.spatial_dims)
        print(f"| {name} | {settings or 'default'} | {'on' if kw['channels_last'] else 'off'} | {med:.0f} | {min(rates[key]):.0f}-{max(rates[key]):.0f} "
              f"| {1188 / med:.1f} s | {med / baseline:.2f}x | {gflop:.2f} | {activations / 1e3:.0f} k |")
        results.append({"network": name, **kw, "volumes_per_s": rates[key], "median": med})
    if args.out:
        with open(args.out + ".tmp", "w") as handle:
            json.dump({"args": vars(args), "load_before": load_before, "load_after": load_after, "results": results},
                      handle, indent=2)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
