"""``medimb train --data PATH --method METHOD --out DIR``: train one method end to end."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medimb.commands.options import add_runtime_options, check_workers
from medimb.errors import UserError
from medimb.training.config import METHODS, Stage1Config, Stage2Config, TrainConfig, method_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    methods = "\n".join(f"  {name:<18} {m.description}" for name, m in METHODS.items())
    p = subparsers.add_parser(
        "train",
        help="train a classifier on a MedMNIST .npz or a datalist JSON",
        description="Train one method; writes metrics.json, checkpoints, plots and the resolved config to --out.",
        epilog=f"methods:\n{methods}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="MedMNIST .npz file or datalist JSON (from medimb-prep datalist)")
    p.add_argument("--method", default="two-stage", choices=list(METHODS), metavar="METHOD",
                   help="training method (default: two-stage, the recommended recipe; see below)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--network", default=TrainConfig.network,
                   help=f"network name (medimb.networks.list_models(); default {TrainConfig.network})")
    p.add_argument("--network-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='backbone options for create_model, e.g. \'{"stem_width": 16, "widths": [32], "depths": [2]}\' '
                        "(a finer last feature map for attention maps of small lesions; docs/training.md)")
    p.add_argument("--epochs", type=int, help=f"stage-1 epochs (default per method: {Stage1Config.epochs})")
    p.add_argument("--stage2-epochs", type=int,
                   help=f"stage-2 epochs for two-stage methods (default {Stage2Config.epochs})")
    p.add_argument("--batch-size", type=int, help=f"batch size of both stages (default {Stage1Config.batch_size})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--spatial-size", type=int, nargs="+", metavar="N",
                   help="datalists: network input size after crop/pad (1 value or 3; default: the network's registered size)")
    p.add_argument("--slices", type=int, metavar="K",
                   help="datalists: 2.5D input, a slab of K adjacent slices (use with --network slice_pool/slice_channels)")
    p.add_argument("--cache", default="memory", choices=("memory", "disk", "none"),
                   help="datalists: cache preprocessed volumes in memory (default), on disk under --out, or not")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--no-tta", action="store_true",
                   help="report metrics without flip test-time augmentation (default: mean over all axis flips)")
    p.add_argument("--sensitivity", type=float, default=None, metavar="S",
                   help="binary models: decision threshold = the highest whose validation sensitivity is >= S, "
                   "e.g. 0.9 (default: the threshold of maximum validation balanced accuracy, i.e. Youden's J); "
                   "stored in final.pt as its operating point")
    p.add_argument("--operating-point", default="balanced_accuracy", choices=("balanced_accuracy", "prior"),
                   help="binary models: how the decision threshold is chosen: the maximum validation balanced "
                   "accuracy (default), or 'prior', the class prior the head was fitted under (0.5 after a "
                   "class-balanced stage 2, the training positive fraction for plain CE), which reads no "
                   "validation label; better with a small validation split (docs/training.md)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved epoch")
    add_runtime_options(p)
    p.set_defaults(func=run)
    return p


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"widths\": [32]}}', got {text}")
    return value


def _check_network_kwargs(name: str, kwargs: dict) -> None:
    """Build ``name`` with ``kwargs`` once (3D, else 2D) so a wrong option fails now, in one line."""
    from medimb.networks import create_model

    errors = []
    for dims in (3, 2):
        try:
            create_model(name, in_channels=1, num_classes=2, spatial_dims=dims, **kwargs)
            return
        except (TypeError, ValueError) as exc:
            errors.append(exc)
    raise UserError(f"--network-kwargs {json.dumps(kwargs)} do not fit --network {name}: {errors[0]}")


def build_config(args: argparse.Namespace) -> TrainConfig:
    """CLI arguments -> :class:`TrainConfig` (the method's own defaults fill everything not given)."""
    method = method_config(args.method)
    if args.epochs is not None:
        if args.epochs < 1:
            raise UserError("--epochs must be >= 1")
        method.stage1.epochs = args.epochs
    if args.stage2_epochs is not None and method.stage2 is not None:
        method.stage2.epochs = args.stage2_epochs
    if args.batch_size is not None:
        method.stage1.batch_size = args.batch_size
        if method.stage2 is not None:
            method.stage2.batch_size = args.batch_size
    size = None
    if args.spatial_size:
        size = tuple(args.spatial_size) * 3 if len(args.spatial_size) == 1 else tuple(args.spatial_size)
        if len(size) != 3 or min(size) < 1:
            raise UserError("--spatial-size takes 1 or 3 positive integers")
    return TrainConfig(
        data=str(Path(args.data).resolve()), out=str(Path(args.out).resolve()), method=method,
        network=args.network, network_kwargs=dict(args.network_kwargs), seed=args.seed, device=args.device,
        amp=not args.no_amp, flip_tta=not args.no_tta,
        cache=args.cache, num_workers=args.workers, spatial_size=size, slices=args.slices,
    )


def _check_inputs(args: argparse.Namespace) -> None:
    from medimb.networks import list_models

    if not Path(args.data).exists():
        raise UserError(f"--data does not exist: {args.data}")
    if args.network not in list_models():
        raise UserError(f"unknown --network {args.network!r}; choose from {', '.join(list_models())}")
    if args.network_kwargs:
        _check_network_kwargs(args.network, args.network_kwargs)
    check_workers(args.workers)
    if args.sensitivity is not None and not 0.0 < args.sensitivity <= 1.0:
        raise UserError(f"--sensitivity must be in (0, 1], got {args.sensitivity}")
    if args.sensitivity is not None and args.operating_point != "balanced_accuracy":
        raise UserError("--sensitivity and --operating-point prior choose the threshold differently: give one")
    if args.operating_point == "prior":
        from medimb.training.config import method_config, require_head_prior

        require_head_prior(method_config(args.method))
    from medimb.runtime import resolve_device

    resolve_device(args.device)  # a one-line error now for a device this machine does not have
    out = Path(args.out)
    if args.resume and not (out / "config.json").exists():
        raise UserError(f"--resume: no previous run in {out} (config.json missing)")


def run(args: argparse.Namespace) -> int:
    _check_inputs(args)
    config = build_config(args)
    out = Path(config.out)
    if args.resume:
        previous = json.loads((out / "config.json").read_text())
        if previous != json.loads(json.dumps(config.to_dict())):
            raise UserError(f"--resume: the arguments differ from the run in {out}; use the same ones")
    from medimb.data.errors import surface_data_errors
    from medimb.evaluation.operating_point import sensitivity_rule
    from medimb.evaluation.report import interval_lines, summary_line
    from medimb.training.workflow import run_training

    rule = args.operating_point if args.sensitivity is None else sensitivity_rule(args.sensitivity)
    with surface_data_errors():  # as medimb.training.train: input-data errors in one line
        result = run_training(config, resume=args.resume, progress=not args.no_progress, operating_rule=rule)
    print(f"{config.method.name}: {summary_line(result, ('validation', 'test'))} -> {out / 'metrics.json'}",
          file=sys.stdout)
    for line in interval_lines(result, ("test",)):
        print(f"  {line}", file=sys.stdout)
    return 0
