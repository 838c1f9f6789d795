"""The ``twist`` command line: a thin layer over the Python API.

    twist train [DATA] --out DIR [--preset NAME] [--epochs N] [--set key=value ...]
    twist eval CHECKPOINT DATA [--protocol cluster,knn,linear,semi] [--train-data TRAIN] [--json]
    twist predict CHECKPOINT IMAGES --out predictions.csv [--embeddings emb.npy]
    twist report RUN_DIR_OR_CHECKPOINT [DATA] --out report/
    twist import RELEASE_FILE --out RUN_DIR [--trust-pickle]
    twist export CHECKPOINT --format torchvision|timm|safetensors|detectron2 --out FILE

Exit status (docs/robustness.md): 0 done; 1 training failed (TrainingError: diverged, cannot
write); 2 a usage or data error (bad options, missing files, unusable data, a run folder in
use); 130 interrupted (Ctrl-C); 143 pre-empted (SIGTERM / SIGUSR1) after a clean checkpoint.
Errors print one line starting with ``twist: error:``; no traceback. Status messages go through
``logging`` (twist.logs), configured here once: ``-v`` for more, ``-q`` for warnings only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from twist.config import ConfigError, TwistConfig, apply_overrides
from twist.presets import PRESETS, get_preset

if TYPE_CHECKING:  # torch and the data package are imported by the commands that need them
    from twist.data import Listing

DATA_HELP = ("'digits' (built in, no download), an .npz file with x (N,H,W,C uint8) and optional y, a folder of "
             "npz splits (train*.npz, test.npz), or an image folder (labels from first-level sub-folders, if any)")


def _user_errors() -> tuple[type[BaseException], ...]:
    from twist.checkpoint import CheckpointError
    from twist.data import DataError
    from twist.runlock import RunFolderInUse

    return (ConfigError, DataError, CheckpointError, RunFolderInUse, FileNotFoundError, PermissionError)


class _VersionAction(argparse.Action):
    """``twist --version``: versions and the git commit are looked up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from twist.provenance import version_line

        print(version_line())
        parser.exit(0)


def _add_common_options(parser: argparse.ArgumentParser, commands: argparse._SubParsersAction) -> None:
    """--version on ``twist``; -v / -q (message verbosity) on every command."""
    parser.add_argument("--version", action=_VersionAction,
                        help="print twist's version (and git commit), torch's and CUDA's, then exit")
    for command in commands.choices.values():
        group = command.add_mutually_exclusive_group()
        group.add_argument("-v", "--verbose", action="store_true", help="more messages (debug)")
        group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only; no progress bars")


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal: in a log file their redraws would bury the messages
    (training then logs one line per epoch)."""
    return not (args.no_progress or args.quiet) and sys.stderr.isatty()


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error (sub-parsers inherit the class)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"twist: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``twist`` argument parser: one sub-command per job, each spelled out by its own function below."""
    parser = _Parser(
        prog="twist",
        description="TWIST self-supervised learning: train a network whose softmax over C classes is consistent "
                    "across augmentations, sharp per image and diverse across the batch; get an unsupervised "
                    "classifier and a pretrained backbone.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_command(sub)
    _add_eval_command(sub)
    _add_predict_command(sub)
    _add_report_command(sub)
    _add_import_command(sub)
    _add_export_command(sub)
    _add_common_options(parser, sub)
    return parser


def _add_train_command(sub) -> None:
    """The ``twist train`` command line."""
    p = sub.add_parser("train", help="train a TWIST model (resumes when --out holds a checkpoint)",
                       description="Train TWIST. Every configuration field can be set with --set group.field=value; "
                                   "`twist train --list-keys` shows them all.")
    p.add_argument("data", nargs="?", default="digits", help=f"training data: {DATA_HELP}. Default: digits")
    p.add_argument("--out", default=None, help="run folder for checkpoints, config.json and metrics.jsonl "
                                               "(default: runs/<preset>). Re-running with the same folder resumes.")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="starting configuration (default: chosen from the data and the device and printed: the "
                        "array presets for images up to 32 px, photo-cpu for photos on a CPU (epochs fitted to about 24 minutes at the "
                        "speed measured there, a narrower convnet where that is under 40 epochs), photo-gpu for photos on a GPU; twist.autopreset)")
    p.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.3 --set augment.num_local=4 (repeatable)")
    p.add_argument("--config", default=None, help="YAML or JSON file (e.g. a run's config.json) to start from; --set overrides it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (shown only when stderr is a terminal)")
    p.add_argument("--list-keys", action="store_true", help="print every settable key with its default and help, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved configuration (JSON, stdout) and the batch / schedule summary (stderr), "
                        "then exit without training")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes assumed by --dry-run (default: $WORLD_SIZE, else the release's GPU count for its "
                        "recipes, else 1)")
    p.set_defaults(func=cmd_train)


def _add_eval_command(sub) -> None:
    """The ``twist eval`` command line."""
    p = sub.add_parser("eval", help="evaluation protocols: cluster metrics, kNN, linear probe, semi-supervised",
                       description="Evaluate a checkpoint on a train / test split (docs/evaluation.md). Protocols: "
                                   "cluster (ACC/NMI/AMI/ARI, mapped top-5, confusion matrix), knn (cosine, k=20 and "
                                   "200, T=0.07), linear (frozen backbone, SGD + cosine), semi (fine-tuning on 1% and "
                                   "10% of the labels). Splits: --train-data TRAIN with DATA as test; a folder of npz "
                                   "splits (train vs test); an image folder with train/ and test/; otherwise (digits, "
                                   "one npz, a plain folder) a seeded stratified 80/20 split. Each protocol writes "
                                   "<out-dir>/<protocol>.json.")
    p.add_argument("checkpoint", help="a checkpoint file or a run folder (its latest checkpoint)")
    p.add_argument("data", help=f"labelled evaluation data: {DATA_HELP}")
    p.add_argument("--protocol", default="cluster,knn",
                   help="comma-separated protocols among cluster, knn, linear, semi, or 'all' (default: cluster,knn)")
    p.add_argument("--train-data", "--memory", dest="train_data", default=None,
                   help="labelled training data (kNN memory, probe / fine-tuning set); DATA is then the test set")
    p.add_argument("--split", default="test", help="test split of a folder of npz splits (default: test)")
    p.add_argument("--train-split", default="train", help="train split of a folder of npz splits (default: train)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="held-out fraction when DATA has a single split (default: 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of that stratified split (default: 0)")
    p.add_argument("--out-dir", default=None, help="folder for the JSON files and the confusion matrix "
                                                   "(default: RUN/eval next to the checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object (keyed by protocol) on stdout")
    p.add_argument("--batch-size", type=int, default=512, help="feature-extraction batch size")
    p.add_argument("--knn-k", default="20,200", help="comma-separated k values (default: 20,200)")
    p.add_argument("--knn-temperature", type=float, default=0.07)
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--linear-lr", type=float, default=None, help="default: 0.1 x batch / 256 (standardised features)")
    p.add_argument("--linear-batch-size", type=int, default=256)
    p.add_argument("--linear-weight-decay", type=float, default=0.0)
    p.add_argument("--linear-aug", action="store_true",
                   help="random-resized-crop + flip with features recomputed every epoch (slow) instead of "
                        "features computed once and cached")
    p.add_argument("--semi-fractions", default="0.01,0.1", help="label fractions (default: 0.01,0.1)")
    p.add_argument("--semi-epochs", type=int, default=20)
    p.add_argument("--semi-min-steps", type=int, default=100, help="at least this many fine-tuning steps")
    p.add_argument("--semi-batch-size", type=int, default=64)
    p.add_argument("--semi-lr-backbone", type=float, default=0.01)
    p.add_argument("--semi-lr-head", type=float, default=0.1)
    p.add_argument("--semi-precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=0, help="seed of the probe, the label subsets and fine-tuning")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (can execute code; trusted files only)")
    _finish_eval_parser(p)


def _add_predict_command(sub) -> None:
    """The ``twist predict`` command line."""
    p = sub.add_parser("predict", help="cluster id, confidence and top-3 per image (CSV), optional embeddings",
                       description="Predict clusters for every image of IMAGES (streamed in batches, any size): one "
                                   "CSV row per image (index, path, cluster, confidence, top-3 clusters with "
                                   "probabilities, label when known); --embeddings writes the backbone features "
                                   "(float32 .npy, same order).")
    p.add_argument("checkpoint", help="a checkpoint file or a run folder (its latest checkpoint)")
    p.add_argument("images", help=f"images: {DATA_HELP}")
    p.add_argument("--out", required=True, metavar="CSV", help="predictions CSV to write")
    p.add_argument("--embeddings", default=None, metavar="NPY", help="also write the (N, D) float32 features here")
    p.add_argument("--split", default="train", help="split of a folder of npz splits (default: train)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0, help="decoding worker processes (0: threads)")
    p.add_argument("--bad-files", default="skip", choices=["skip", "stop"])
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (can execute code; trusted files only)")
    p.set_defaults(func=cmd_predict)


def _add_report_command(sub) -> None:
    """The ``twist report`` command line."""
    p = sub.add_parser("report", help="self-contained HTML report: curves, cluster gallery, sizes, confusion",
                       description="Write OUT/index.html: training curves from RUN/metrics.jsonl, cluster sizes, the "
                                   "confusion matrix (labelled data) and a gallery of each cluster's most confident "
                                   "images. No network needed to view it.")
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("data", nargs="?", default=None,
                   help="images for the gallery (default: the run's training data, stored in the checkpoint)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/report)")
    p.add_argument("--per-cluster", type=int, default=12, help="thumbnails per cluster (default: 12)")
    p.add_argument("--max-clusters", type=int, default=100, help="gallery sections, largest clusters first")
    p.add_argument("--thumbs-as-files", action="store_true",
                   help="write thumbnails to OUT/thumbs/ instead of embedding them in the page")
    p.add_argument("--split", default="train", help="split of a folder of npz splits (default: train)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (can execute code; trusted files only)")
    p.set_defaults(func=cmd_report)


def _add_import_command(sub) -> None:
    """The ``twist import`` command line."""
    p = sub.add_parser("import", help="import a checkpoint of the authors' release as a twist run folder",
                       description="Convert a release checkpoint (full training file or backbone-only state dict; "
                                   "ResNet-50, ResNet-50w2, ViT-S/B) into a twist checkpoint that eval, predict, "
                                   "report and export use and that `twist train DATA --out RUN_DIR` trains further. "
                                   "Files are read without executing code unless --trust-pickle is given.")
    p.add_argument("release_file", metavar="RELEASE_FILE", help="the release's .pth file (or a .safetensors backbone)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create (checkpoint.pt + config.json)")
    p.add_argument("--arch", default=None, choices=["resnet50", "resnet50w2", "vit_small", "vit_base"],
                   help="expected architecture; an error if the weights say otherwise (default: read from the shapes)")
    p.add_argument("--num-classes", type=int, default=None, metavar="C",
                   help="C of the fresh head for backbone-only files (default: the file's args, else 1000); "
                        "full files keep their head, whose C must then match")
    p.add_argument("--use-teacher", action="store_true", help="import the EMA teacher's weights (EMA runs)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in RUN_DIR")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with full unpickling (can execute code from the file; trusted files only)")
    p.set_defaults(func=cmd_import)


def _add_export_command(sub) -> None:
    """The ``twist export`` command line."""
    p = sub.add_parser("export", help="export the backbone (and head) for torchvision, timm, safetensors or detectron2",
                       description="Write a checkpoint's backbone in another library's format: torchvision / timm "
                                   "(strict load into the library's model without classifier), safetensors (+ metadata), "
                                   "detectron2 (.pkl of numpy arrays, ResNets). See docs/interop.md.")
    p.add_argument("checkpoint", help="a checkpoint file or a run folder (its latest checkpoint)")
    p.add_argument("--format", required=True, choices=["torchvision", "timm", "safetensors", "detectron2"])
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    p.add_argument("--head-out", default=None, metavar="FILE",
                   help="also write the projection head + NBS (.safetensors by suffix, else a torch file)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (can execute code; trusted files only)")
    p.set_defaults(func=cmd_export)


# ---------------------------------------------------------------------- train
def resolve_train_config(args: argparse.Namespace) -> tuple[TwistConfig, Listing | None]:
    """The run's configuration (--config, --preset, the run folder's own when resuming, else the
    auto preset) with --set and --epochs applied, and the listing of an image folder when the
    auto preset made one (for ``train(listing=...)``: the folder is then walked once)."""
    listing = None
    if not args.config and not args.preset and args.out and (Path(args.out) / "config.json").is_file():
        # a run folder being resumed (or holding an imported release model) keeps its own configuration
        args.config = str(Path(args.out) / "config.json")
    chosen = None  # the auto preset's recipe, before --set
    if args.config:
        cfg = TwistConfig.from_dict(read_config_file(Path(args.config)))
    elif args.preset:
        cfg = get_preset(args.preset)
    else:
        cfg, listing = auto_config(args)
        chosen = cfg.to_dict()
    apply_overrides(cfg, args.overrides)
    if args.epochs is not None:
        apply_overrides(cfg, [f"train.epochs={args.epochs}"])
    if chosen is not None:
        log_changes(chosen, cfg.to_dict())
    return cfg.validate(), listing


def log_changes(chosen: dict[str, Any], final: dict[str, Any]) -> None:
    """Log what --set and --epochs changed in the auto preset's recipe: its printed reasons
    describe the recipe as chosen (``C=10 + 100 over-clustering``), so a user who set
    ``model.overcluster_classes=0`` sees that the run trains without it."""
    import logging

    changes = [f"{group}.{key} {values[key]} -> {final[group][key]}"
               for group, values in chosen.items() if isinstance(values, dict)
               for key in values if final[group][key] != values[key]]
    if changes:
        logging.getLogger("twist.autopreset").info("your settings change the recipe: %s", ", ".join(changes))


def auto_config(args: argparse.Namespace) -> tuple[TwistConfig, Listing | None]:
    """No --preset: the recipe twist.autopreset chooses from a cheap look at the data and the
    device (``train.device`` from --set, else auto), its reasons logged (and kept for --dry-run),
    and the look's folder listing (None for other data). The CPU photo recipe's epochs come from
    the speed of the overridden recipe measured here unless --epochs (or ``--set train.epochs=``)
    fixes them."""
    import logging

    from twist.autopreset import auto_preset, summarize_data

    epochs = [] if args.epochs is None else [f"train.epochs={args.epochs}"]
    data = summarize_data(args.data)
    cfg, reasons = auto_preset(args.data, [*args.overrides, *epochs], data)
    for line in reasons:
        logging.getLogger("twist.autopreset").info("%s", line)
    return cfg, data.listing


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config file as a dict of groups: YAML (.yaml / .yml) or JSON (anything else),
    e.g. ``train: {epochs: 50}`` or an earlier run's config.json."""
    if not path.is_file():
        raise ConfigError(f"--config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of groups (e.g. train: {{epochs: 50}}), "
                          f"got {type(data).__name__}")
    return data


def cmd_train(args: argparse.Namespace) -> int:
    if args.list_keys:
        from twist.config import field_help

        cfg = get_preset(args.preset) if args.preset else TwistConfig()
        docs = field_help()
        for group, values in cfg.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    text = docs.get(f"{group}.{key}")
                    print(f"{group}.{key}={value}" + (f"  # {text}" if text else ""))
        return 0
    cfg, listing = resolve_train_config(args)
    out = Path(args.out) if args.out else Path("runs") / cfg.preset
    if args.dry_run:
        print(cfg.to_json())
        images = len(listing.paths) if listing is not None else None  # the auto preset has counted them
        print("\n".join(dry_run_summary(cfg, args.data, args.world_size, images)), file=sys.stderr)
        return 0
    from twist.train import train

    record = train(cfg, args.data, out, progress=_progress(args), listing=listing)
    from twist.distributed import is_main_process

    if is_main_process():  # under torchrun every process returns here; one summary is enough
        print(f"run folder: {out}")
        _print_metrics(record)
    return 0


def dataset_size(data: str) -> int | None:
    """Number of training images of ``data`` without decoding any image (the count of
    :func:`twist.autopreset.summarize_data`: array headers, or a folder's listing). None when it
    cannot be told (shards, unreadable data: loading names the problem)."""
    import zipfile

    from twist.autopreset import summarize_data

    try:
        return summarize_data(data).count
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def dry_run_summary(cfg: TwistConfig, data: str, world_size: int | None = None,
                    images: int | None = None) -> list[str]:
    """What ``twist train --dry-run`` prints after the configuration: batch sizes, steps per
    epoch, learning-rate / weight-decay / EMA schedules and the self-labeling stage. ``images``:
    the number of training images when the caller already knows it (the auto preset's listing),
    so that the data is not looked at twice; else :func:`dataset_size` counts them."""
    import os

    from twist.presets import IMAGENET_TRAIN_IMAGES, RECIPE_WORLD_SIZE

    recipe = cfg.preset in RECIPE_WORLD_SIZE
    if world_size is not None:
        world, why = world_size, "--world-size"
    elif os.environ.get("WORLD_SIZE"):
        world, why = int(os.environ["WORLD_SIZE"]), "$WORLD_SIZE"
    elif recipe:
        world, why = RECIPE_WORLD_SIZE[cfg.preset], f"the release ran {cfg.preset} on this many GPUs; --world-size to change"
    else:
        world, why = 1, "one process; --world-size to change"
    if world < 1:
        raise ConfigError(f"--world-size must be at least 1, got {world}")
    if recipe and data == "digits":
        n, source = IMAGENET_TRAIN_IMAGES, f"ImageNet-1k train, assumed for the {cfg.preset} recipe"
    else:
        n, source = (dataset_size(data) if images is None else images), data
    t, o, sl, a = cfg.train, cfg.optim, cfg.selflabel, cfg.augment
    global_batch = t.batch_size * world
    lines = ["twist: dry run, nothing is trained"]
    lines.append(f"  data: {f'{n:,} images' if n is not None else 'size unknown'} ({source})")
    lines.append(f"  processes: {world} ({why})")
    lines.append(f"  batch: {t.batch_size} per process x {world} = {global_batch} global")
    steps = None
    if n is not None:
        steps = (n // world) // t.batch_size
        if steps < 1:
            lines.append(f"  steps/epoch: 0 -- the global batch {global_batch} is larger than the data ({n} images); "
                         f"training would stop with an error")
            steps = None
        else:
            lines.append(f"  steps/epoch: {steps:,} (last partial batch dropped)")

    def count(epochs: float) -> str:
        return f" = {round(epochs * steps):,} steps" if steps else ""

    peak = o.lr * global_batch / 256
    first = a.view_sizes(0, t.epochs)[0]
    lines.append(f"  views: 2 x {a.global_size} px (scale {tuple(a.global_scale)})"
                 + (f" + {a.num_local} x {a.local_size} px (scale {tuple(a.local_scale)})" if a.num_local else "")
                 + (f"; growing from {first} px over the first {a.progressive_fraction:.0%} of the epochs "
                    f"(progressive resizing)" if first != a.global_size else ""))
    lines.append(f"  TWIST stage: {t.epochs} epochs{count(t.epochs)}; {o.name}; loss alpha {cfg.loss.alpha:g}, "
                 f"beta {cfg.loss.beta:g}, tau {cfg.loss.tau:g}")
    lines.append(f"    lr: {o.lr:g} x {global_batch}/256 = {peak:.6g} peak; linear warm-up from 0 over "
                 f"{o.warmup_epochs:g} epochs{count(o.warmup_epochs)}; cosine to {peak * o.min_lr_ratio:.6g} "
                 f"(x{o.min_lr_ratio:g})")
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    lines.append(f"    weight decay: {o.weight_decay:g}" + (f" -> {wd_end:g} cosine" if wd_end != o.weight_decay else " constant")
                 + "; gradient clipping " + (f"{o.clip_grad:g}" if o.clip_grad > 0 else "off"))
    lines.append("    EMA teacher: " + (f"momentum {cfg.ema.momentum:g} -> {cfg.ema.momentum_end:g} cosine"
                                       if cfg.ema.enabled else "off"))
    if sl.epochs > 0:
        sl_peak = sl.lr * global_batch / 256
        lines.append(f"  self-labeling stage: {sl.epochs} epochs{count(sl.epochs)} after TWIST "
                     f"({t.epochs + sl.epochs} epochs in all); crops global {tuple(sl.global_scale)}, "
                     f"local {tuple(sl.local_scale)}; quantile {sl.quantile_start:g} -> {sl.quantile_end:g} cosine")
        lines.append(f"    lr: {sl.lr:g} x {global_batch}/256 = {sl_peak:.6g} peak; linear warm-up from 0 over "
                     f"{sl.warmup_epochs:g} epochs{count(sl.warmup_epochs)}; cosine to {sl_peak * o.min_lr_ratio:.6g}; "
                     f"weight decay {wd_end:g} constant")
    else:
        lines.append("  self-labeling stage: none")
    return lines


def _print_metrics(record: dict[str, Any]) -> None:
    keys = [("acc", "cluster ACC"), ("nmi", "NMI"), ("ami", "AMI"), ("ari", "ARI"), ("knn_top1", "kNN top-1"),
            ("clusters_used", "clusters used")]
    for key, label in keys:
        if key in record:
            value = record[key]
            print(f"{label:>14}: {value:.4f}" if isinstance(value, float) else f"{label:>14}: {value}")


# ---------------------------------------------------------------------- eval
def _finish_eval_parser(p: argparse.ArgumentParser) -> None:
    """The evaluation-recipe options of ``twist eval`` (docs/evaluation.md), and its command."""
    p.add_argument("--recipe", choices=["fast", "paper"], default="fast",
                   help="fast: the --linear-*/--semi-* settings (cached features, short fine-tuning; small data); paper: the "
                        "release's linear and semi protocols exactly (docs/evaluation.md); --paper-set changes them")
    p.add_argument("--paper-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one paper-recipe setting (twist.paper_eval.PaperSettings), e.g. epochs=2; repeatable")
    p.add_argument("--semi-subset", action="append", default=[], metavar="FILE",
                   help="a list of training file names (one per line, as the ImageNet 1%%/10%% lists) to fine-tune "
                        "on, instead of --semi-fractions; repeatable (one run per file)")
    p.add_argument("--vit-features", choices=["cls", "last4", "cls+avgpool"], default=None,
                   help="ViT features for knn and linear (default: last4 for vit_small, cls+avgpool for vit_base)")
    p.set_defaults(func=cmd_eval)


def _float_list(text: str, flag: str, cast=float) -> tuple:
    try:
        return tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated numbers, got {text!r}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from twist.paper_eval import check_recipe_flags, eval_image_size
    from twist.protocols import EvalOptions, default_eval_dir, parse_protocols, run_protocols, split_for_eval
    from twist.serving import load_trained

    protocols = parse_protocols(args.protocol)
    options = EvalOptions(
        batch_size=args.batch_size, knn_k=_float_list(args.knn_k, "--knn-k", int),
        knn_temperature=args.knn_temperature, linear_epochs=args.linear_epochs, linear_lr=args.linear_lr,
        linear_batch_size=args.linear_batch_size, linear_weight_decay=args.linear_weight_decay,
        linear_aug=args.linear_aug, semi_fractions=_float_list(args.semi_fractions, "--semi-fractions"),
        semi_epochs=args.semi_epochs, semi_min_steps=args.semi_min_steps, semi_batch_size=args.semi_batch_size,
        semi_lr_backbone=args.semi_lr_backbone, semi_lr_head=args.semi_lr_head, semi_precision=args.semi_precision,
        seed=args.seed, recipe=args.recipe, semi_subsets=tuple(args.semi_subset), vit_features=args.vit_features,
        paper_overrides=tuple(args.paper_set))
    check_recipe_flags(args, build_parser().parse_args(["eval", args.checkpoint, args.data]))
    trained = load_trained(args.checkpoint, device=args.device, trust_pickle=args.trust_pickle)
    train_ds, test_ds, split_info = split_for_eval(
        args.data, train_data=args.train_data, image_size=eval_image_size(trained, args.recipe),
        crop_size=trained.crop_size, split=args.split,
        train_split=args.train_split, test_fraction=args.test_fraction, seed=args.split_seed,
        progress=_progress(args))
    out_dir = Path(args.out_dir) if args.out_dir else default_eval_dir(trained.path)
    results = run_protocols(trained, train_ds, test_ds, protocols, out_dir=out_dir, options=options,
                            progress=_progress(args),
                            extra={"checkpoint": str(args.checkpoint), "split": split_info})
    if args.json:
        print(json.dumps(results))
        return 0
    lines = {"cluster": lambda r: f"ACC {r['acc']:.4f}  NMI {r['nmi']:.4f}  AMI {r['ami']:.4f}  ARI {r['ari']:.4f}  "
                                  f"top-5 {r['top5']:.4f}  clusters used {r['clusters_used']}/{r['num_clusters']}",
             "knn": lambda r: "  ".join(f"k={k} top-1 {r[f'top1_k{k}']:.4f}" for k in r["k"]),
             "linear": lambda r: f"top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  ({r['epochs']} epochs, {r['recipe']})",
             "semi": lambda r: "  ".join(f"{tag} ({s['num_labels']} labels) top-1 {s['top1']:.4f}"
                                         for tag, s in r["fractions"].items())}
    print(f"train: {train_ds.name} ({len(train_ds)} images)  test: {test_ds.name} ({len(test_ds)} images)")
    for name, r in results.items():
        print(f"{name:>8}: {lines[name](r)}")
    print(f"results: {out_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from twist.predict import predict
    from twist.serving import load_trained

    trained = load_trained(args.checkpoint, device=args.device, trust_pickle=args.trust_pickle)
    res = predict(trained, args.images, args.out, embeddings=args.embeddings, batch_size=args.batch_size,
                  split=args.split, num_workers=args.num_workers, bad_files=args.bad_files,
                  progress=_progress(args))
    print(f"{res['num_images']} predictions -> {res['csv']}" + (f", embeddings -> {res['embeddings']}"
                                                               if res["embeddings"] else ""))
    print(f"clusters used: {res['clusters_used']} of {len(res['cluster_counts'])}"
          + (f"; {res['skipped']} file(s) skipped" if res["skipped"] else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from twist.checkpoint import resolve_checkpoint
    from twist.report import report

    out = Path(args.out) if args.out else resolve_checkpoint(args.run).parent / "report"
    res = report(args.run, args.data, out, per_cluster=args.per_cluster, max_clusters=args.max_clusters,
                 embed_images=not args.thumbs_as_files, batch_size=args.batch_size, device=args.device,
                 split=args.split, trust_pickle=args.trust_pickle, progress=_progress(args))
    print(f"report -> {res['html']} ({res['num_images']} images, {res['clusters_shown']} cluster sections)")
    return 0


# ---------------------------------------------------------------------- import / export
def cmd_import(args: argparse.Namespace) -> int:
    from twist.release import import_release, summary

    result = import_release(args.release_file, args.out, arch=args.arch, num_classes=args.num_classes,
                            trust_pickle=args.trust_pickle, use_teacher=args.use_teacher, force=args.force)
    print(summary(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from twist.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.format, args.out, head_out=args.head_out,
                               trust_pickle=args.trust_pickle)
    print(f"exported {result.arch} backbone ({result.feature_dim}-d features, {result.num_tensors} tensors) "
          f"as {result.format} -> {result.path}")
    if result.head_path is not None:
        print(f"head -> {result.head_path}")
    print(f"load it with: {result.usage}")
    return 0


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    from twist.logs import configure_logging
    from twist.preempt import PREEMPTED_EXIT_CODE, Preempted

    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors exit here, before torch is imported
    from twist.stage import TrainingError
    configure_logging(int(args.verbose) - int(args.quiet))
    try:
        return int(args.func(args) or 0)
    except Preempted as exc:
        print(f"twist: {' '.join(str(exc).split())}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except TrainingError as exc:
        print("twist: error: " + " ".join(str(exc).split("\n")), file=sys.stderr)  # always one line
        return 1
    except _user_errors() as exc:
        print("twist: error: " + " ".join(str(exc).split("\n")), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("twist: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
