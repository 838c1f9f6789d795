"""The ``twist`` command line: a thin layer over the Python API.

    twist train [DATA] --out DIR [--preset NAME] [--epochs N] [--set key=value ...]
    twist eval CHECKPOINT DATA [--json]

User errors (bad options, missing files, unusable data) print one line starting with
``twist: error:`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from twist.config import PRESETS, ConfigError, TwistConfig, apply_overrides, get_preset

DATA_HELP = ("'digits' (built in, no download), an .npz file with x (N,H,W,C uint8) and optional y, a folder of "
             "npz splits (train*.npz, test.npz), or an image folder (labels from first-level sub-folders, if any)")


def _user_errors() -> tuple[type[BaseException], ...]:
    from twist.checkpoint import CheckpointError
    from twist.data import DataError
    from twist.train import TrainingError

    return (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twist",
        description="TWIST self-supervised learning: train a network whose softmax over C classes is consistent "
                    "across augmentations, sharp per image and diverse across the batch; get an unsupervised "
                    "classifier and a pretrained backbone.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a TWIST model (resumes when --out holds a checkpoint)",
                       description="Train TWIST. Every configuration field can be set with --set group.field=value; "
                                   "`twist train --list-keys` shows them all.")
    p.add_argument("data", nargs="?", default="digits", help=f"training data: {DATA_HELP}. Default: digits")
    p.add_argument("--out", default=None, help="run folder for checkpoints, config.json and metrics.jsonl "
                                               "(default: runs/<preset>). Re-running with the same folder resumes.")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="starting configuration (default: digits for the built-in data, cifar10 otherwise)")
    p.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.3 --set augment.num_local=4 (repeatable)")
    p.add_argument("--config", default=None, help="a config.json (from an earlier run) to start from instead of a preset")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--list-keys", action="store_true", help="print every settable key with its default and exit")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and schedule, then exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="cluster metrics and kNN of a trained model on labelled data",
                       description="Evaluate a checkpoint: unsupervised cluster ACC/NMI/AMI/ARI (argmax of the softmax) "
                                   "and kNN top-1 (cosine, k=20, T=0.07) on backbone features.")
    p.add_argument("checkpoint", help="a checkpoint file or a run folder (its latest checkpoint)")
    p.add_argument("data", help=f"labelled evaluation data: {DATA_HELP}")
    p.add_argument("--split", default="test", help="split to read from a folder of npz splits (default: test)")
    p.add_argument("--memory", default=None, help="labelled data used as the kNN memory bank "
                                                 "(default: leave-one-out on DATA itself)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (can execute code; trusted files only)")
    p.set_defaults(func=cmd_eval)
    return parser


# ---------------------------------------------------------------------- train
def resolve_train_config(args: argparse.Namespace) -> TwistConfig:
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config file not found: {path}")
        try:
            cfg = TwistConfig.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {path} is not valid JSON: {exc}") from None
    else:
        preset = args.preset or ("digits" if args.data == "digits" else "cifar10")
        cfg = get_preset(preset)
    apply_overrides(cfg, args.overrides)
    if args.epochs is not None:
        apply_overrides(cfg, [f"train.epochs={args.epochs}"])
    return cfg.validate()


def cmd_train(args: argparse.Namespace) -> int:
    if args.list_keys:
        cfg = get_preset(args.preset) if args.preset else TwistConfig()
        for group, values in cfg.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    print(f"{group}.{key}={value}")
        return 0
    cfg = resolve_train_config(args)
    out = Path(args.out) if args.out else Path("runs") / cfg.preset
    if args.dry_run:
        print(cfg.to_json())
        return 0
    from twist.train import train

    record = train(cfg, args.data, out, progress=not args.no_progress)
    print(f"run folder: {out}")
    _print_metrics(record)
    return 0


def _print_metrics(record: dict[str, Any]) -> None:
    keys = [("acc", "cluster ACC"), ("nmi", "NMI"), ("ami", "AMI"), ("ari", "ARI"), ("knn_top1", "kNN top-1"),
            ("clusters_used", "clusters used")]
    for key, label in keys:
        if key in record:
            value = record[key]
            print(f"{label:>14}: {value:.4f}" if isinstance(value, float) else f"{label:>14}: {value}")


# ---------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from twist.data import DataError, load_dataset
    from twist.inference import evaluate_model
    from twist.serving import load_trained

    trained = load_trained(args.checkpoint, device=args.device, trust_pickle=args.trust_pickle)
    data = load_dataset(args.data, args.split, image_size=trained.image_size, progress=False)
    if data.labels is None:
        raise DataError(f"{args.data} has no labels; evaluation needs labelled data")
    memory = load_dataset(args.memory, "train", image_size=trained.image_size, progress=False) if args.memory else None
    if memory is not None and memory.labels is None:
        raise DataError(f"--memory {args.memory} has no labels")
    record = evaluate_model(trained.model, data, trained.eval_transform, device=trained.device,
                            precision=trained.precision, batch_size=args.batch_size, memory=memory)
    record = {"checkpoint": str(args.checkpoint), "data": args.data, "num_samples": len(data), **record}
    if args.json:
        print(json.dumps(record))
    else:
        _print_metrics(record)
    return 0


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"twist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("twist: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
