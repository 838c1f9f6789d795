"""Evaluation protocols of a trained model (METHOD.md section 8) on a train / test split.

``twist eval`` is a thin layer over :func:`run_protocols`. Four protocols, each returning (and
writing) one JSON-ready dict:

* ``cluster`` -- unsupervised classification on the test split: argmax of the model's class
  probabilities in eval mode; ACC (Hungarian one-to-one matching, unmatched clusters are
  errors), NMI, AMI, ARI, mapped top-5, clusters used; confusion matrix as CSV and PNG.
* ``knn`` -- weighted kNN on L2-normalised backbone features: the train split is the memory,
  the test split the queries; k = 20 and 200, T = 0.07 (DINO / InstDisc).
* ``linear`` -- linear classifier on frozen, pooled backbone features (backbone in eval mode),
  SGD + cosine schedule, top-1 / top-5 on the test split. By default the features are computed
  once (no augmentation) and cached; ``linear_aug=True`` recomputes them every epoch from
  random-resized-crop + flip views, as the paper's protocol does.
* ``semi`` -- fine-tune the backbone and a new linear layer on a class-balanced 1 % and 10 %
  subset of the training labels (:func:`balanced_subset`), top-1 / top-5 on the test split.

Backbone features of both splits are extracted once and shared by ``knn`` and ``linear`` (for
ViTs the release's token recipe, :data:`twist.vit.VIT_FEATURE_RECIPES`, ``vit_features``).
These are the ``fast`` recipe; ``recipe="paper"`` runs ``linear`` and ``semi`` as the authors'
release does (:mod:`twist.paper_eval`) and evaluates on its Resize + CenterCrop view. The
labelled subsets of ``semi`` can come from file lists (``semi_subsets``, :func:`select_subset`,
the ImageNet 1 % / 10 % lists). Every result names its recipe. See ``docs/evaluation.md`` for the
defaults and how they compare to the paper's protocol.

Example::

    >>> from twist.serving import load_trained
    >>> from twist.protocols import run_protocols, split_for_eval
    >>> trained = load_trained("runs/digits")                          # doctest: +SKIP
    >>> train_ds, test_ds, how = split_for_eval("digits", image_size=trained.image_size)  # doctest: +SKIP
    >>> res = run_protocols(trained, train_ds, test_ds, ["cluster", "knn"], out_dir="runs/digits/eval")  # doctest: +SKIP
    >>> res["cluster"]["acc"], res["knn"]["top1_k20"]                  # doctest: +SKIP
    (0.93, 0.97)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twist.config import ConfigError
from twist.data import DataError, ImageDataset, PathTable, load_dataset
from twist.evaluate import topk_correct
from twist.io import write_text_atomic

__all__ = [
    "PROTOCOLS",
    "DEFAULT_PROTOCOLS",
    "EvalOptions",
    "split_for_eval",
    "stratified_split",
    "subset_dataset",
    "balanced_subset",
    "read_subset_list",
    "select_subset",
    "parse_protocols",
    "run_protocols",
    "cluster_protocol",
    "knn_protocol",
    "linear_protocol",
    "semi_supervised",
    "default_eval_dir",
]

PROTOCOLS = ("cluster", "knn", "linear", "semi")
DEFAULT_PROTOCOLS = ("cluster", "knn")


@dataclasses.dataclass
class EvalOptions:
    """Settings of the protocols (the ``twist eval`` flags map onto these fields)."""

    batch_size: int = 512
    """Batch size of feature extraction (inference only)."""
    knn_k: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07
    linear_epochs: int = 100
    linear_lr: float | None = None
    """None: ``evaluate.DEFAULT_PROBE_LR * linear_batch_size / 256`` (0.1 at 256) on standardised features."""
    linear_batch_size: int = 256
    linear_weight_decay: float = 0.0
    linear_aug: bool = False
    """Random-resized-crop + flip views with features recomputed every epoch (slow) instead of cached features."""
    semi_fractions: tuple[float, ...] = (0.01, 0.1)
    semi_epochs: int = 20
    semi_min_steps: int = 100
    """Fine-tuning runs max(semi_epochs epochs, semi_min_steps steps): a 1 % subset is only a few batches."""
    semi_batch_size: int = 64
    semi_lr_backbone: float = 0.01
    semi_lr_head: float = 0.1
    semi_weight_decay: float = 0.0
    semi_precision: str = "auto"
    """'auto' = bf16 autocast where the device supports it (see ``train.resolve_precision``), else fp32."""
    seed: int = 0
    recipe: str = "fast"
    """fast (the settings above, for small data) or paper (the release's linear and semi protocols,
    :mod:`twist.paper_eval`; the linear_* / semi_* settings above are then not used)."""
    semi_subsets: tuple[str, ...] = ()
    """Files listing the training file names of each labelled subset (the ImageNet 1 % / 10 % lists);
    one fine-tuning run per file instead of the seeded ``semi_fractions`` subsets."""
    vit_features: str | None = None
    """ViT features for kNN and linear (twist.vit.VIT_FEATURE_RECIPES); None = the architecture's default."""
    paper_overrides: tuple[str, ...] = ()
    """``field=value`` changes of the paper recipe's settings (twist.paper_eval.PaperSettings), e.g. epochs=2."""


# ====================================================================== splits
def stratified_split(labels: Sequence[int] | np.ndarray, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of ``range(len(labels))`` into sorted (train, test) indices.

    Every class contributes ``round(test_fraction * n_c)`` of its ``n_c`` samples to the test
    split (at least one when ``n_c >= 2``, never all of them), chosen by a
    ``numpy.random.default_rng(seed)`` permutation taken class by class in increasing class id.

    Example::

        >>> tr, te = stratified_split([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], 0.2, seed=0)
        >>> len(tr), len(te), sorted(np.asarray([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])[te].tolist())
        (8, 2, [0, 1])
    """
    y = np.asarray(labels, dtype=np.int64)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = len(members)
        k = int(round(test_fraction * n))
        k = min(max(k, 1 if n >= 2 else 0), n - 1)
        test.append(members[rng.permutation(n)[:k]])
    te = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[te] = False
    return np.flatnonzero(mask), te


def subset_dataset(ds: ImageDataset, indices: Sequence[int] | np.ndarray, name: str | None = None) -> ImageDataset:
    """A new :class:`ImageDataset` holding images ``indices`` of ``ds`` (in memory or streamed).

    Example::

        >>> from twist.data import load_dataset
        >>> ds = load_dataset("digits", progress=False)
        >>> len(subset_dataset(ds, [0, 5, 7]))
        3
    """
    idx = np.asarray(indices, dtype=np.int64)
    images = ds.images.index_select(0, torch.from_numpy(idx)) if ds.images is not None else None
    paths = PathTable.of(ds.paths).take(idx) if ds.paths is not None else None
    labels = ds.labels[idx] if ds.labels is not None else None
    members = ds.members.take(idx) if ds.members is not None else None
    # every other field as it is: a streamed subset decodes its images exactly as the whole does
    # (resize_side: the release's evaluation crop; members: where a tar shard's images lie)
    return dataclasses.replace(ds, name=name or ds.name, images=images, labels=labels, paths=paths, members=members,
                               skipped=[], replaced=0, _failed=set())


def _is_npz_split_dir(path: str) -> bool:
    return os.path.isdir(path) and any(e.lower().endswith(".npz") for e in os.listdir(path))


def _image_split_dirs(path: str, split: str) -> tuple[str, str] | None:
    """(train, test) sub-folders of an image folder laid out as train/ + test/ (or val/)."""
    if not os.path.isdir(path) or _is_npz_split_dir(path):
        return None
    train = os.path.join(path, "train")
    for name in (split, "test", "val"):
        test = os.path.join(path, name)
        if name != "train" and os.path.isdir(train) and os.path.isdir(test):
            return train, test
    return None


def split_for_eval(data: str, *, train_data: str | None = None, image_size: int = 0, split: str = "test",
                   train_split: str = "train", test_fraction: float = 0.2, seed: int = 0, bad_files: str = "skip",
                   max_memory_gb: float = 4.0, progress: bool = False,
                   crop_size: int = 0) -> tuple[ImageDataset, ImageDataset, dict]:
    """The (train, test) datasets that the protocols use for ``data``, and how they were chosen.

    * ``train_data`` given: train = ``train_data`` (split ``train_split``), test = ``data``
      (split ``split``) -- e.g. two .npz files.
    * a folder of npz splits: its ``train_split`` split vs its ``split`` split (``train*.npz`` vs
      ``test.npz``).
    * an image folder with ``train/`` and ``test/`` (or ``val/``) sub-folders: those two folders.
    * anything else with a single split (``digits``, one .npz file, a plain image folder): a
      deterministic stratified split (:func:`stratified_split`, ``test_fraction`` = 20 % test,
      ``seed``); ``digits`` gives 1438 train / 359 test images.

    Returns ``(train_ds, test_ds, info)`` where ``info`` (JSON-ready) records the rule used.

    Example::

        >>> tr, te, info = split_for_eval("digits", image_size=16)
        >>> len(tr), len(te), info["mode"]
        (1438, 359, 'stratified')
    """
    kw = dict(image_size=image_size, bad_files=bad_files, max_memory_gb=max_memory_gb, progress=progress,
              crop_size=crop_size)
    if train_data:
        tr = load_dataset(train_data, train_split, **kw)
        te = load_dataset(data, split, **kw)
        return tr, te, {"mode": "explicit", "train": str(train_data), "test": str(data)}
    path = os.path.expanduser(str(data))
    if data != "digits" and _is_npz_split_dir(path):
        tr = load_dataset(data, train_split, **kw)
        te = load_dataset(data, split, **kw)
        return tr, te, {"mode": "npz-splits", "train": f"{data}:{train_split}", "test": f"{data}:{split}"}
    dirs = _image_split_dirs(path, split) if data != "digits" else None
    if dirs is not None:
        tr = load_dataset(dirs[0], "train", **kw)
        te = load_dataset(dirs[1], "test", **kw)
        return tr, te, {"mode": "folder-splits", "train": dirs[0], "test": dirs[1]}
    full = load_dataset(data, "train", **kw)
    if full.labels is None:
        raise DataError(f"{data} has no labels, so it cannot be split for evaluation; give labelled data "
                        f"(class sub-folders, or 'y' in the npz)")
    tr_idx, te_idx = stratified_split(full.labels, test_fraction, seed)
    if len(te_idx) == 0:
        raise DataError(f"{data}: too few images per class for a held-out test split")
    info = {"mode": "stratified", "source": str(data), "test_fraction": test_fraction, "seed": seed,
            "num_train": int(len(tr_idx)), "num_test": int(len(te_idx))}
    return (subset_dataset(full, tr_idx, f"{full.name}/train"), subset_dataset(full, te_idx, f"{full.name}/test"),
            info)


# ====================================================================== subsets
def balanced_subset(labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced ``fraction`` of ``labels`` (seeded, deterministic).

    Every class gets ``max(1, round(fraction * N / K))`` samples (``K`` = number of classes
    present), capped at its size, drawn with ``numpy.random.default_rng(seed)`` class by class in
    increasing class id; so the subset holds about ``fraction * N`` samples and every class is
    represented, like ImageNet's 1 % (~13 per class) and 10 % splits.

    Example::

        >>> idx = balanced_subset([0] * 50 + [1] * 50, 0.1, seed=0)
        >>> len(idx), np.bincount(np.asarray([0] * 50 + [1] * 50)[idx]).tolist()
        (10, [5, 5])
    """
    y = np.asarray(labels, dtype=np.int64)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    classes = np.unique(y)
    per_class = max(1, int(round(fraction * len(y) / len(classes))))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        members = np.flatnonzero(y == c)
        chosen.append(members[rng.permutation(len(members))[:per_class]])
    return np.sort(np.concatenate(chosen))


def read_subset_list(path: str | os.PathLike) -> list[str]:
    """The file names listed in ``path``, one per line (blank lines and surrounding spaces ignored),
    in the format of the ImageNet 1 % / 10 % lists (``n01440764_10026.JPEG``).

    Example::

        >>> import tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "s.txt"); _ = open(p, "w").write("a.png\\n\\n b.png \\n")
        >>> read_subset_list(p)
        ['a.png', 'b.png']
    """
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--semi-subset {path}: cannot read it ({exc})") from None
    names = [n for n in names if n]
    if not names:
        raise DataError(f"--semi-subset {path}: the file lists no names")
    return names


def select_subset(ds: ImageDataset, names: Sequence[str], source: str = "the subset list") -> np.ndarray:
    """Sorted indices of the images of ``ds`` (an image folder) whose file name is in ``names``.

    A name matches an image whose file name (the last path component) equals it; a name with a
    ``/`` matches an image whose path ends with it. Every name must match exactly one image:
    names that match none raise :class:`DataError` saying how many are missing and showing a few;
    a name matching several images (the same file name in two class folders) is ambiguous and an
    error too. Duplicated names in the list count once.
    """
    if ds.paths is None:
        raise DataError(f"{source} names files, but the training data ({ds.name}) is not an image folder")
    by_name: dict[str, list[int]] = {}
    for i, path in enumerate(ds.paths):
        norm = str(path).replace(os.sep, "/")
        by_name.setdefault(norm.rsplit("/", 1)[-1], []).append(i)
    wanted = list(dict.fromkeys(names))
    chosen, missing, ambiguous = [], [], []
    for name in wanted:
        key = name.replace("\\", "/")
        hits = by_name.get(key.rsplit("/", 1)[-1], [])
        if "/" in key:
            hits = [i for i in hits if str(ds.paths[i]).replace(os.sep, "/").endswith("/" + key.lstrip("/"))]
        if not hits:
            missing.append(name)
        elif len(hits) > 1:
            ambiguous.append(name)
        else:
            chosen.append(hits[0])
    if missing:
        raise DataError(f"{source}: {len(missing)} of {len(wanted)} listed file names are not in the training data "
                        f"{ds.name} ({len(ds)} images), e.g. {', '.join(missing[:5])}")
    if ambiguous:
        raise DataError(f"{source}: {len(ambiguous)} listed file names match several training images, e.g. "
                        f"{', '.join(ambiguous[:5])}; give them with their folder (class/name)")
    return np.sort(np.asarray(chosen, dtype=np.int64))


# ====================================================================== helpers
def parse_protocols(spec: str | Iterable[str]) -> list[str]:
    """``"cluster,knn"`` (or a list, or ``"all"``) -> validated, de-duplicated protocol names.

    Example::

        >>> parse_protocols("knn, cluster,knn")
        ['knn', 'cluster']
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for p in (s.strip().lower() for s in items):
        if not p:
            continue
        if p == "all":
            out.extend(x for x in PROTOCOLS if x not in out)
            continue
        if p not in PROTOCOLS:
            raise ConfigError(f"unknown protocol '{p}'; valid protocols: {', '.join(PROTOCOLS)} (or all)")
        if p not in out:
            out.append(p)
    if not out:
        raise ConfigError(f"no protocol given; valid protocols: {', '.join(PROTOCOLS)}")
    return out


def default_eval_dir(checkpoint_path: str | os.PathLike) -> Path:
    """``RUN/eval`` for a checkpoint ``RUN/checkpoint.pt`` or a run folder ``RUN``.

    Example::

        >>> default_eval_dir("runs/digits/checkpoint.pt").as_posix()
        'runs/digits/eval'
    """
    p = Path(checkpoint_path)
    return (p if p.is_dir() else p.parent) / "eval"


def _labels_of(ds: ImageDataset, role: str) -> np.ndarray:
    if ds.labels is None:
        raise DataError(f"the {role} data ({ds.name}) has no labels; this protocol needs labelled data")
    return np.asarray(ds.labels, dtype=np.int64)


def _write_json(path: Path, obj: dict) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def _feature_recipe(trained, opts: EvalOptions) -> str:
    from twist.paper_eval import feature_recipe

    return feature_recipe(trained.config.model.backbone, opts.vit_features)


def _eval_features_fn(trained, opts: EvalOptions):
    """x -> the features kNN and the linear probe use (pooled output, or the ViT token recipe)."""
    from twist.vit import vit_features

    recipe = _feature_recipe(trained, opts)
    if recipe == "pooled":
        return trained.model.features
    return lambda x: vit_features(trained.model.backbone, x, recipe)[1]


def _eval_transform(trained, opts: EvalOptions):
    """The run's own evaluation view (fast recipe) or the release's resize + centre crop (paper)."""
    if opts.recipe != "paper":
        return trained.eval_transform
    from twist.paper_eval import paper_eval_transform, paper_settings

    crop = int(trained.config.augment.global_size)
    return paper_eval_transform(trained, paper_settings("linear", trained.config.model.backbone, crop_size=crop,
                                                        vit_features=opts.vit_features))


def _features(trained, ds: ImageDataset, opts: EvalOptions, want_probs: bool, progress: bool):
    from twist.inference import extract
    from twist.vit import vit_features

    recipe = _feature_recipe(trained, opts)
    pair = None if recipe == "pooled" else (lambda x: vit_features(trained.model.backbone, x, recipe))
    return extract(trained.model, ds, _eval_transform(trained, opts), device=trained.device,
                   precision=trained.precision, batch_size=opts.batch_size, tau=float(trained.config.loss.tau),
                   want_probs=want_probs, progress=progress, features_fn=pair)


def _resolve_precision(name: str, device: torch.device) -> str:
    from twist.runtime import resolve_precision

    p = resolve_precision(name, device)
    return "bf16" if p == "fp16" else p  # no GradScaler here: fp16 -> bf16 (or use fp32 explicitly)


def _autocast(device: torch.device, precision: str):
    from twist.runtime import autocast_context

    return autocast_context(device, precision)


# ====================================================================== cluster
def cluster_protocol(trained, test_ds: ImageDataset, *, out_dir: str | os.PathLike | None = None,
                     options: EvalOptions | None = None, probs: torch.Tensor | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Unsupervised classification metrics on ``test_ds`` (cluster = argmax of the class probabilities).

    Returns ``acc``, ``nmi``, ``ami``, ``ari``, ``top5`` (mapped top-5), ``clusters_used``,
    ``num_clusters``, ``num_classes``, ``num_samples``, ``mapping`` (cluster -> class of the
    matched pairs) and, with ``out_dir``, the paths of ``confusion.csv`` / ``confusion.png``
    (columns in matched order, see :func:`twist.evaluate.confusion_matrix`).

    Example::

        >>> m = cluster_protocol(trained, test_ds, out_dir="runs/digits/eval")   # doctest: +SKIP
        >>> round(m["acc"], 3), m["clusters_used"]                            # doctest: +SKIP
        (0.912, 10)
    """
    from twist.evaluate import cluster_metrics, confusion_matrix, save_confusion

    opts = options or EvalOptions()
    y = _labels_of(test_ds, "test")
    if probs is None:
        probs = _features(trained, test_ds, opts, True, progress)["probs"]
    p = probs.numpy()
    pred = p.argmax(1)
    m = cluster_metrics(y, pred, num_clusters=p.shape[1], probs=p)
    out: dict[str, Any] = {k: m[k] for k in ("acc", "nmi", "ami", "ari", "top5", "clusters_used", "num_clusters",
                                              "num_classes", "num_samples")}
    out["mapping"] = {str(k): v for k, v in m["mapping"].items()}
    if out_dir is not None:
        num_classes = max(int(y.max()) + 1, len(test_ds.class_names or ()))
        cm, ids = confusion_matrix(y, pred, num_classes=num_classes, num_clusters=p.shape[1], return_clusters=True)
        names = test_ds.class_names if test_ds.class_names and len(test_ds.class_names) == num_classes else None
        out["confusion_files"] = save_confusion(Path(out_dir) / "confusion", cm, names, ids)
    return out


# ====================================================================== kNN
def knn_protocol(train_feats: torch.Tensor, train_labels: np.ndarray, test_feats: torch.Tensor,
                 test_labels: np.ndarray, *, k: Sequence[int] = (20, 200), temperature: float = 0.07) -> dict[str, Any]:
    """Weighted kNN top-1 on L2-normalised features for every ``k`` (train = memory, test = queries).

    Returns ``{'top1_k20': ..., 'top1_k200': ..., 'k': [...], 'temperature': T, 'memory_size': N,
    'num_queries': M}``; ``k`` larger than the memory is capped (recorded as given).

    Example::

        >>> f = torch.randn(40, 8); y = np.arange(40) % 2
        >>> r = knn_protocol(f, y, f, y, k=(1,))
        >>> r["top1_k1"]
        1.0
    """
    from twist.evaluate import knn_top1

    out: dict[str, Any] = {}
    for kk in k:
        out[f"top1_k{int(kk)}"] = knn_top1(train_feats, train_labels, test_feats, test_labels, k=int(kk),
                                            temperature=temperature)
    out.update({"k": [int(x) for x in k], "temperature": float(temperature), "memory_size": int(len(train_labels)),
                "num_queries": int(len(test_labels))})
    return out


# ====================================================================== linear probe
def _probe_augment(trained, scale: tuple[float, float] = (0.08, 1.0)):
    """Random-resized-crop + flip only (the linear-probe training augmentation)."""
    from twist.augment import MultiCropAugment

    cfg = dataclasses.replace(trained.config.augment, num_local=0, jitter_p=0.0, grayscale_p=0.0,
                              blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0), global_scale=tuple(scale))
    return MultiCropAugment(cfg, trained.channels, trained.eval_transform.mean, trained.eval_transform.std)


def linear_protocol(trained, train_ds: ImageDataset, test_ds: ImageDataset, *, options: EvalOptions | None = None,
                    train_feats: torch.Tensor | None = None, test_feats: torch.Tensor | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Linear probe on the frozen backbone's pooled features; top-1 / top-5 on ``test_ds``.

    Without augmentation (default) the features of both splits are extracted once (eval mode,
    no gradients) and :func:`twist.evaluate.linear_probe` trains on the cached tensors: every
    epoch sees the same centre view of each image. With ``options.linear_aug`` every epoch
    draws a random-resized-crop (scale 0.08-1) + flip (with the run's flip probability) of each
    training image and runs the frozen backbone on it; test features are the clean ones. In
    both cases features are standardised with the clean training features' mean and std.

    Example::

        >>> r = linear_protocol(trained, train_ds, test_ds, options=EvalOptions(linear_epochs=10))  # doctest: +SKIP
        >>> r["top1"], r["top5"]                                                                       # doctest: +SKIP
        (0.95, 0.99)
    """
    from twist.evaluate import DEFAULT_PROBE_LR, linear_probe

    opts = options or EvalOptions()
    y_tr, y_te = _labels_of(train_ds, "train"), _labels_of(test_ds, "test")
    if train_feats is None:
        train_feats = _features(trained, train_ds, opts, False, progress)["features"]
    if test_feats is None:
        test_feats = _features(trained, test_ds, opts, False, progress)["features"]
    t0 = time.perf_counter()
    if not opts.linear_aug:
        r = linear_probe(train_feats, y_tr, test_feats, y_te, epochs=opts.linear_epochs, lr=opts.linear_lr,
                         batch_size=opts.linear_batch_size, weight_decay=opts.linear_weight_decay, seed=opts.seed)
        r["augmentation"] = "none (cached features)"
    else:
        r = _linear_probe_aug(trained, train_ds, y_tr, train_feats, test_feats, y_te, opts, progress)
        r["augmentation"] = "random-resized-crop 0.08-1 + flip, features recomputed per epoch"
    r.update({"batch_size": opts.linear_batch_size, "weight_decay": opts.linear_weight_decay,
              "num_train": int(len(y_tr)), "num_test": int(len(y_te)), "feature_dim": int(train_feats.shape[1]),
              "seconds": time.perf_counter() - t0})
    if r.get("lr") is None:
        r["lr"] = DEFAULT_PROBE_LR * opts.linear_batch_size / 256
    return r


def _linear_probe_aug(trained, train_ds, y_tr, train_feats, test_feats, y_te, opts: EvalOptions,
                      progress: bool) -> dict[str, Any]:
    from twist.data import batch_loader
    from twist.evaluate import DEFAULT_PROBE_LR

    device = trained.device
    trained.model.eval()
    features = _eval_features_fn(trained, opts)
    augment = _probe_augment(trained)
    gen = torch.Generator().manual_seed(opts.seed)
    mean = train_feats.mean(0, keepdim=True).to(device)
    std = train_feats.std(0, unbiased=False, keepdim=True).clamp_min(1e-6).to(device)
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    dim = train_feats.shape[1]
    head = nn.Linear(dim, num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, dim, generator=gen).mul_(0.01))
        head.bias.zero_()
    bs = min(opts.linear_batch_size, len(train_ds))
    lr = DEFAULT_PROBE_LR * bs / 256 if opts.linear_lr is None else float(opts.linear_lr)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=opts.linear_weight_decay)
    labels = torch.as_tensor(y_tr)
    steps_per_epoch = math.ceil(len(train_ds) / bs)
    total = opts.linear_epochs * steps_per_epoch
    step, last_loss = 0, float("nan")
    epochs = range(opts.linear_epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="linear probe (augmented)", leave=False, dynamic_ncols=True)
    for epoch in epochs:
        loss_sum, n = 0.0, 0
        for images, idx in batch_loader(train_ds, bs, shuffle=True, drop_last=False, seed=opts.seed, epoch=epoch):
            with torch.no_grad():
                x = augment(images.to(device), gen)[0]
                with _autocast(device, trained.precision):
                    f = features(x)
                f = (f.float() - mean) / std
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            y = labels[idx].to(device)
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            n += len(idx)
            step += 1
        last_loss = loss_sum / max(n, 1)
    with torch.no_grad():
        logits = head((test_feats.to(device) - mean) / std)
        c1, c5 = topk_correct(logits, torch.as_tensor(y_te).to(device), 5)
    m = len(y_te)
    return {"top1": c1 / m, "top5": c5 / m, "epochs": opts.linear_epochs, "lr": lr, "train_loss": last_loss}


# ====================================================================== semi-supervised
class _FineTuneNet(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def _finetune_augment(trained):
    """The run's global-crop pipeline without locals, blur or solarize (fine-tuning views)."""
    from twist.augment import MultiCropAugment

    cfg = dataclasses.replace(trained.config.augment, num_local=0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))
    return MultiCropAugment(cfg, trained.channels, trained.eval_transform.mean, trained.eval_transform.std)


def semi_supervised(trained, train_ds: ImageDataset, test_ds: ImageDataset, fraction: float, *,
                    options: EvalOptions | None = None, indices: Sequence[int] | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Fine-tune a copy of the backbone + a new linear layer on a labelled ``fraction`` of ``train_ds``.

    The subset is :func:`balanced_subset` (``options.seed``) unless ``indices`` are given. The
    network trains in train mode (BatchNorm statistics update) with cross-entropy on one
    augmented global crop per image (the run's crop / flip / colour recipe, no blur or
    solarize; :class:`twist.augment.MultiCropAugment`), SGD (momentum 0.9, Nesterov) with
    learning rate ``semi_lr_backbone`` for the backbone and ``semi_lr_head`` for the new layer,
    both on a per-step cosine schedule, for ``max(semi_epochs epochs, semi_min_steps steps)``,
    under bf16 autocast where supported (``semi_precision='auto'``). Batches have
    ``min(semi_batch_size, subset size)`` images (incomplete last batch dropped). The trained
    model (``trained.model``) is not modified. Evaluation: eval mode, clean views of ``test_ds``.

    Returns ``{'fraction', 'num_labels', 'per_class', 'top1', 'top5', 'epochs', 'steps',
    'batch_size', 'lr_backbone', 'lr_head', 'precision', 'train_loss', 'subset_indices'}``.

    Example::

        >>> r = semi_supervised(trained, train_ds, test_ds, 0.1, options=EvalOptions(semi_epochs=5))  # doctest: +SKIP
        >>> r["num_labels"], r["top1"]                                                             # doctest: +SKIP
        (140, 0.9)
    """
    opts = options or EvalOptions()
    y_tr, y_te = _labels_of(train_ds, "train"), _labels_of(test_ds, "test")
    idx = np.asarray(balanced_subset(y_tr, fraction, opts.seed) if indices is None else indices, dtype=np.int64)
    device = trained.device
    precision = _resolve_precision(opts.semi_precision, device)
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    torch_gen = torch.Generator().manual_seed(opts.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        net = _FineTuneNet(copy.deepcopy(trained.model.backbone), trained.model.feature_dim, num_classes).to(device)
    augment = _finetune_augment(trained)
    n = len(idx)
    bs = max(1, min(opts.semi_batch_size, n))
    steps_per_epoch = max(1, n // bs)
    total = max(opts.semi_epochs * steps_per_epoch, opts.semi_min_steps)
    opt = torch.optim.SGD([{"params": net.backbone.parameters(), "base_lr": opts.semi_lr_backbone},
                           {"params": net.fc.parameters(), "base_lr": opts.semi_lr_head}],
                          lr=opts.semi_lr_head, momentum=0.9, nesterov=True, weight_decay=opts.semi_weight_decay)
    sub_images = subset_dataset(train_ds, idx)
    labels = torch.as_tensor(y_tr[idx])
    net.train()
    steps = range(total)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"semi-supervised {fraction:g}", leave=False, dynamic_ncols=True)
    perm, pos, loss_sum, loss_n = torch.randperm(n, generator=torch_gen), 0, 0.0, 0
    for step in steps:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=torch_gen), 0
        b = perm[pos:pos + bs]
        pos += bs
        images = sub_images.get_batch(b).to(device)
        x = augment(images, torch_gen)[0]
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * 0.5 * (1.0 + math.cos(math.pi * step / total))
        with _autocast(device, precision):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), labels[b].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= total - steps_per_epoch:
            loss_sum += loss.item()
            loss_n += 1
    net.eval()
    c1 = c5 = 0
    y_t = torch.as_tensor(y_te)
    with torch.no_grad():
        for s in range(0, len(test_ds), opts.batch_size):
            b = torch.arange(s, min(s + opts.batch_size, len(test_ds)))
            x = trained.eval_transform(test_ds.get_batch(b).to(device))
            with _autocast(device, precision):
                logits = net(x)
            a1, a5 = topk_correct(logits.float(), y_t[b].to(device), 5)
            c1, c5 = c1 + a1, c5 + a5
    m = len(y_te)
    return {"fraction": float(fraction), "num_labels": int(n),
            "per_class": {str(int(c)): int(v) for c, v in zip(*np.unique(y_tr[idx], return_counts=True))},
            "top1": c1 / m, "top5": c5 / m, "epochs": round(total / steps_per_epoch, 2), "steps": int(total),
            "batch_size": int(bs), "lr_backbone": opts.semi_lr_backbone, "lr_head": opts.semi_lr_head,
            "weight_decay": opts.semi_weight_decay, "precision": precision, "train_loss": loss_sum / max(loss_n, 1),
            "subset_indices": idx.tolist()}


def _fraction_tag(fraction: float) -> str:
    pct = fraction * 100
    return f"{pct:g}pct".replace(".", "_")


def _linear(trained, train_ds, test_ds, opts: EvalOptions, cache: dict, progress: bool) -> dict[str, Any]:
    if opts.recipe != "paper":
        return linear_protocol(trained, train_ds, test_ds, options=opts, train_feats=cache["train_features"],
                               test_feats=cache["test_features"], progress=progress)
    from twist.paper_eval import paper_linear, paper_settings

    settings = paper_settings("linear", trained.config.model.backbone, crop_size=trained.config.augment.global_size,
                              vit_features=opts.vit_features, overrides=opts.paper_overrides)
    return paper_linear(trained, train_ds, test_ds, settings, seed=opts.seed, batch_size=opts.batch_size,
                        progress=progress)


def _semi_subsets(train_ds: ImageDataset, opts: EvalOptions) -> list[tuple[str, np.ndarray, str]]:
    """(tag, training indices, where they came from) of every labelled subset to fine-tune on."""
    if opts.semi_subsets:
        out = []
        for path in opts.semi_subsets:
            idx = select_subset(train_ds, read_subset_list(path), f"--semi-subset {path}")
            out.append((Path(path).stem.replace(".", "_"), idx, f"list {path}"))
        return out
    y = _labels_of(train_ds, "train")
    return [(_fraction_tag(f), balanced_subset(y, f, opts.seed), f"balanced {f:g}, seed {opts.seed}")
            for f in opts.semi_fractions]


def _semi_runs(trained, train_ds, test_ds, opts: EvalOptions, out: Path | None, progress: bool) -> dict[str, Any]:
    """One fine-tuning run per labelled subset, with the fast or the paper recipe."""
    runs = {}
    for tag, idx, origin in _semi_subsets(train_ds, opts):
        fraction = len(idx) / len(train_ds)
        if opts.recipe == "paper":
            from twist.paper_eval import paper_semi, paper_settings

            settings = paper_settings("semi", trained.config.model.backbone,
                                      crop_size=trained.config.augment.global_size, label_fraction=fraction,
                                      overrides=opts.paper_overrides)
            s = paper_semi(trained, subset_dataset(train_ds, idx), test_ds, settings, seed=opts.seed,
                           batch_size=opts.batch_size, progress=progress)
            s.update({"fraction": fraction, "num_labels": int(len(idx)), "subset_indices": idx.tolist()})
        else:
            s = semi_supervised(trained, train_ds, test_ds, fraction, options=opts, indices=idx, progress=progress)
            s["recipe"] = "fast"
        s["subset_source"] = origin
        if out is not None:
            subset_file = out / f"semi_subset_{tag}.txt"
            subset_file.write_text("".join(f"{i}\n" for i in s["subset_indices"]))
            s["subset_file"] = str(subset_file)
            if len(s["subset_indices"]) > 2000:  # large subsets: the file holds them
                del s["subset_indices"]
        runs[tag] = s
    return {"recipe": opts.recipe, "fractions": runs, **{f"top1_{tag}": s["top1"] for tag, s in runs.items()}}


# ====================================================================== all together
def run_protocols(trained, train_ds: ImageDataset, test_ds: ImageDataset,
                  protocols: str | Iterable[str] = DEFAULT_PROTOCOLS, *, out_dir: str | os.PathLike | None = None,
                  options: EvalOptions | None = None, progress: bool = False, extra: dict | None = None,
                  **overrides: Any) -> dict[str, dict[str, Any]]:
    """Run ``protocols`` (names from :data:`PROTOCOLS`) and return ``{protocol: result dict}``.

    ``options`` (an :class:`EvalOptions`) and keyword ``overrides`` of its fields set the
    protocols' parameters. Backbone features of both splits are extracted once (eval mode) and
    shared by ``knn`` and ``linear``; the test split's class probabilities come from the same
    pass. With ``out_dir`` every protocol's dict is also written to ``<out_dir>/<protocol>.json``,
    ``cluster`` adds ``confusion.csv`` / ``confusion.png``, and ``semi`` writes the labelled subset
    of each fraction to ``semi_subset_<pct>.txt`` (one training index per line; listed in the JSON
    as ``subset_file``). ``extra`` (e.g. the checkpoint and data names) is merged into every dict.

    Example::

        >>> res = run_protocols(trained, train_ds, test_ds, "cluster,knn,linear,semi",
        ...                     out_dir="runs/digits/eval", linear_epochs=20, semi_epochs=5)  # doctest: +SKIP
        >>> sorted(res)                                                                       # doctest: +SKIP
        ['cluster', 'knn', 'linear', 'semi']
    """
    names = parse_protocols(protocols)
    opts = dataclasses.replace(options or EvalOptions(), **overrides)
    if opts.recipe not in ("fast", "paper"):
        raise ConfigError(f"unknown recipe '{opts.recipe}'; valid: fast, paper")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for role, ds in (("test", test_ds), ("train", train_ds)):
        if ds.channels != trained.channels:
            raise DataError(f"the {role} data ({ds.name}) has {ds.channels} channel(s) but the model was trained on "
                            f"{trained.channels}-channel images")
    y_te = _labels_of(test_ds, "test")
    needs_train = any(p in names for p in ("knn", "linear", "semi"))
    y_tr = _labels_of(train_ds, "train") if needs_train else None
    common = {"train_data": train_ds.name, "test_data": test_ds.name, "num_train": len(train_ds),
              "num_test": len(test_ds), "eval_view": repr(_eval_transform(trained, opts)),
              "features": _feature_recipe(trained, opts), **(extra or {})}

    cache: dict[str, torch.Tensor] = {}
    cached_linear = "linear" in names and opts.recipe != "paper"  # the paper probe draws new views every epoch
    if "cluster" in names or "knn" in names or cached_linear:
        res = _features(trained, test_ds, opts, "cluster" in names, progress)
        cache.update({"test_features": res["features"]})
        if "probs" in res:
            cache["test_probs"] = res["probs"]
    if "knn" in names or cached_linear:
        cache["train_features"] = _features(trained, train_ds, opts, False, progress)["features"]

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "cluster":
            r = cluster_protocol(trained, test_ds, out_dir=out, options=opts, probs=cache["test_probs"])
        elif name == "knn":
            r = knn_protocol(cache["train_features"], y_tr, cache["test_features"], y_te, k=opts.knn_k,
                             temperature=opts.knn_temperature)
        elif name == "linear":
            r = _linear(trained, train_ds, test_ds, opts, cache, progress)
        else:
            r = _semi_runs(trained, train_ds, test_ds, opts, out, progress)
        r.setdefault("recipe", opts.recipe)
        r = {"protocol": name, **r, **common, "seconds": round(time.perf_counter() - t0, 3)}
        results[name] = r
        if out is not None:
            _write_json(out / f"{name}.json", r)
    return results
