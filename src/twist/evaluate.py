"""Evaluation protocols of METHOD.md section 8, as pure functions on arrays / tensors.

Nothing here touches a model's training state or global random state; inputs may be numpy
arrays or torch tensors (or anything ``numpy.asarray`` accepts) and are converted.

* Unsupervised classification -- :func:`cluster_metrics`: ACC after the best one-to-one
  matching of clusters to classes (:func:`hungarian_match`), NMI / AMI / ARI with the
  scikit-learn definitions, the number of clusters used, and (given the cluster
  probabilities) a "mapped top-5". :func:`confusion_matrix` and :func:`save_confusion` show
  the matching.
* kNN -- :func:`knn_predict` / :func:`knn_top1`: cosine similarity on L2-normalised features,
  the k nearest training samples vote with weight ``exp(sim / T)`` (DINO / InstDisc protocol;
  k = 20, T = 0.07 by default).
* Linear probe -- :func:`linear_probe`: a linear classifier on frozen, standardised features,
  SGD with momentum and a cosine schedule.

Feature extraction (running a network over a dataset) lives in :mod:`twist.inference`.

Labels are non-negative integers (class / cluster ids). Accuracies are fractions in [0, 1].

Example::

    >>> import numpy as np
    >>> from twist.evaluate import cluster_metrics
    >>> m = cluster_metrics(np.array([0, 0, 1, 1, 2]), np.array([2, 2, 0, 0, 1]))
    >>> m["acc"], m["mapping"]
    (1.0, {0: 1, 1: 2, 2: 0})
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)

from twist.io import atomic_open

__all__ = [
    "hungarian_match",
    "contingency",
    "cluster_metrics",
    "mapped_topk",
    "confusion_matrix",
    "save_confusion",
    "confusion_png",
    "knn_predict",
    "knn_top1",
    "linear_probe",
    "topk_correct",
    "DEFAULT_PROBE_LR",
]

# Base learning rate of the linear probe for batch size 256 on standardised features; scaled
# linearly with the batch size (lr = DEFAULT_PROBE_LR * batch_size / 256) when lr is None.
DEFAULT_PROBE_LR = 0.1


# ----------------------------------------------------------------------------- input checks
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(x: Any, name: str) -> np.ndarray:
    """A 1-D int64 array of non-negative integer labels, or a clear ValueError."""
    a = _to_numpy(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per sample), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if a.dtype == bool:
        a = a.astype(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{name} must hold integer labels, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must hold integer labels, got non-integral values")
    a = a.astype(np.int64, copy=False)
    if a.min() < 0:
        raise ValueError(f"{name} must hold non-negative labels, got {int(a.min())}")
    return a


def _label_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length: {len(t)} vs {len(p)}")
    return t, p


def _size(labels: np.ndarray, given: int | None, name: str, what: str) -> int:
    """The number of label values: ``given`` (checked to cover ``labels``) or max + 1."""
    top = int(labels.max()) + 1
    if given is None:
        return top
    given = int(given)
    if given < 1:
        raise ValueError(f"{name} must be >= 1, got {given}")
    if top > given:
        raise ValueError(f"{what} holds label {top - 1}, outside {name}={given}")
    return given


# ----------------------------------------------------------------------------- clustering
def contingency(y_true: Any, y_pred: Any, num_classes: int | None = None,
                num_clusters: int | None = None) -> np.ndarray:
    """Counts ``n[i, j]`` of samples of class i put in cluster j, shape (classes, clusters).

    Sizes default to ``max label + 1``; pass ``num_classes`` / ``num_clusters`` to include
    classes or clusters that no sample has.
    """
    t, p = _label_pair(y_true, y_pred)
    k = _size(t, num_classes, "num_classes", "y_true")
    c = _size(p, num_clusters, "num_clusters", "y_pred")
    return np.bincount(t * c + p, minlength=k * c).reshape(k, c)


def _assignment(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows / columns of the one-to-one matching with the largest total count."""
    rows, cols = linear_sum_assignment(table, maximize=True)
    return rows, cols


def hungarian_match(y_true: Any, y_pred: Any, num_classes: int | None = None,
                    num_clusters: int | None = None, *,
                    drop_empty: bool = True) -> tuple[dict[int, int], int]:
    """Best one-to-one matching of clusters to classes.

    Solves the assignment problem on the contingency table (classes x clusters) with
    ``scipy.optimize.linear_sum_assignment(..., maximize=True)``: ``min(classes, clusters)``
    pairs, each class and each cluster used at most once, maximising the number of samples
    whose cluster is matched to their class.

    Returns:
        ``(mapping, matched)``: ``mapping`` is ``{cluster: class}`` (plain ints) for the
        matched clusters; ``matched`` is the number of samples on matched pairs, so
        ``ACC = matched / N``. Samples in unmatched clusters (more clusters than classes) or
        of unmatched classes (fewer clusters than classes) are errors.

        With ``drop_empty`` (default) pairs that hold no sample are left out of ``mapping``:
        they add nothing to ``matched`` and which of them the solver picks is an arbitrary
        tie. ``drop_empty=False`` keeps the solver's full assignment.
    """
    table = contingency(y_true, y_pred, num_classes, num_clusters)
    rows, cols = _assignment(table)
    counts = table[rows, cols]
    keep = counts > 0 if drop_empty else np.ones(len(rows), dtype=bool)
    mapping = {int(j): int(i) for j, i in sorted(zip(cols[keep], rows[keep]))}
    return mapping, int(counts.sum())


def _probs_matrix(probs: Any, n: int) -> np.ndarray:
    a = _to_numpy(probs)
    if a.ndim != 2:
        raise ValueError(f"probs must be 2-D (samples, clusters), got shape {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"probs has {a.shape[0]} rows but there are {n} samples")
    if a.shape[1] < 1:
        raise ValueError("probs has no columns")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("probs holds NaN or infinite values")
    return a


def mapped_topk(y_true: Any, probs: Any, mapping: dict[int, int], k: int = 5,
                chunk_elems: int = 1 << 22) -> float:
    """Fraction of samples whose true class's matched cluster ranks among the top ``k``.

    Precisely: let ``m(c)`` be the cluster matched to class ``c`` (the inverse of
    ``mapping``, which is ``{cluster: class}``). Sample i with class ``y_i`` is a hit iff
    ``m(y_i)`` exists and its rank in row i of ``probs`` is below ``min(k, clusters)``, where
    the rank of cluster j is the number of clusters with a larger value plus the number of
    clusters with an equal value and a smaller index (a stable descending sort). Samples
    whose class has no matched cluster are misses. ``probs`` may be probabilities or logits
    (only the order within a row matters). With ``k = 1`` and ``y_pred = argmax(probs)``
    this equals ACC.
    """
    t = _labels(y_true, "y_true")
    p = _probs_matrix(probs, len(t))
    n, c = p.shape
    k = min(int(k), c)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_classes = max(int(t.max()) + 1, max(mapping.values(), default=-1) + 1)
    class_to_cluster = np.full(num_classes, -1, dtype=np.int64)
    for cluster, cls in mapping.items():
        if not 0 <= cluster < c:
            raise ValueError(f"mapping names cluster {cluster}, but probs has {c} columns")
        class_to_cluster[cls] = cluster
    target = class_to_cluster[t]
    hits = 0
    step = max(1, chunk_elems // c)
    cols = np.arange(c)
    for s in range(0, n, step):
        tg = target[s:s + step]
        valid = tg >= 0
        if not valid.any():
            continue
        rows = p[s:s + step][valid]
        tg = tg[valid]
        v = rows[np.arange(len(tg)), tg][:, None]
        rank = (rows > v).sum(1) + ((rows == v) & (cols[None, :] < tg[:, None])).sum(1)
        hits += int((rank < k).sum())
    return hits / n


def cluster_metrics(y_true: Any, y_pred: Any, num_clusters: int | None = None,
                    probs: Any = None) -> dict:
    """Unsupervised-classification metrics of METHOD.md section 8.

    Args:
        y_true: (N,) class ids.
        y_pred: (N,) cluster ids (usually ``argmax`` of the model's class probabilities).
        num_clusters: number of clusters C the model has (default: the number of columns of
            ``probs`` when given, else ``max(y_pred) + 1``). Only the contingency table's size
            depends on it; empty clusters never change ACC.
        probs: optional (N, C) cluster probabilities (or logits) for ``top5``.

    Returns a dict:
        ``acc``: ``matched / N`` after :func:`hungarian_match` (one-to-one; unmatched
        clusters and unmatched classes count as errors); ``nmi``
        (``normalized_mutual_info_score``, arithmetic mean), ``ami``
        (``adjusted_mutual_info_score``), ``ari`` (``adjusted_rand_score``) -- scikit-learn
        definitions on (y_true, y_pred); ``clusters_used``: distinct values in ``y_pred``;
        ``num_samples``; ``num_classes`` (max class id + 1); ``num_clusters``;
        ``mapping``: ``{cluster: class}`` of the matched pairs holding at least one sample;
        and with ``probs``: ``top5`` = :func:`mapped_topk` with k = 5 -- the fraction of
        samples whose true class's matched cluster is among the 5 clusters of highest
        probability (ties broken towards the lower cluster index; classes without a matched
        cluster are misses).
    """
    t, p = _label_pair(y_true, y_pred)
    pr = None
    if probs is not None:
        pr = _probs_matrix(probs, len(t))
        if num_clusters is None:
            num_clusters = pr.shape[1]
        elif pr.shape[1] != int(num_clusters):
            raise ValueError(f"probs has {pr.shape[1]} columns but num_clusters={num_clusters}")
    c = _size(p, num_clusters, "num_clusters", "y_pred")
    mapping, matched = hungarian_match(t, p, num_clusters=c)
    n = len(t)
    out = {
        "acc": matched / n,
        "nmi": float(normalized_mutual_info_score(t, p, average_method="arithmetic")),
        "ami": float(adjusted_mutual_info_score(t, p)),
        "ari": float(adjusted_rand_score(t, p)),
        "clusters_used": int(len(np.unique(p))),
        "num_samples": int(n),
        "num_classes": int(t.max()) + 1,
        "num_clusters": int(c),
        "mapping": mapping,
    }
    if pr is not None:
        out["top5"] = mapped_topk(t, pr, mapping, k=5)
    return out


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None,
                     num_clusters: int | None = None, *,
                     return_clusters: bool = False):
    """Contingency table with the clusters reordered by the Hungarian matching.

    Rows are classes ``0 .. num_classes - 1`` in their own order. Columns are clusters: first
    the cluster matched to class 0, then the one matched to class 1, ... (classes without a
    match are skipped), then the unmatched clusters in increasing id. When there are at least
    as many clusters as classes every class is matched, so ``cm[i, i]`` is the matched pair
    of class i and ``np.trace(cm) / N`` is ACC; with fewer clusters than classes the matched
    pairs form a staircase (increasing row and column). Here the solver's full assignment is
    used (``drop_empty=False``), so zero-count pairs still sit on the diagonal.

    Returns ``cm`` (int64, ``(num_classes, num_clusters)``), or ``(cm, cluster_ids)`` with
    ``return_clusters=True``, ``cluster_ids[j]`` being the cluster shown in column j.
    """
    table = contingency(y_true, y_pred, num_classes, num_clusters)
    rows, cols = _assignment(table)
    order = np.argsort(rows, kind="stable")
    matched = cols[order]
    rest = np.setdiff1d(np.arange(table.shape[1]), matched)
    cluster_ids = np.concatenate([matched, rest]).astype(np.int64)
    cm = table[:, cluster_ids]
    return (cm, cluster_ids) if return_clusters else cm


def save_confusion(path_prefix: str | os.PathLike, cm: Any, class_names: list[str] | None = None,
                   cluster_ids: Any = None) -> list[str]:
    """Write a confusion matrix to ``<path_prefix>.csv`` and ``<path_prefix>.png``.

    The CSV has a header ``class, cluster_<id>, ...`` and one row per class (its name, or its
    index, then the counts). ``cluster_ids`` (from ``confusion_matrix(...,
    return_clusters=True)``) labels the columns; default ``0 .. C-1``. The PNG is
    :func:`confusion_png`'s. Parent folders are created; both files are written atomically.
    Returns the written paths.
    """
    m = _to_numpy(cm)
    if m.ndim != 2:
        raise ValueError(f"cm must be 2-D (classes, clusters), got shape {m.shape}")
    k, c = m.shape
    names = [str(i) for i in range(k)] if class_names is None else [str(s) for s in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} entries but cm has {k} rows")
    ids = list(range(c)) if cluster_ids is None else [int(x) for x in _to_numpy(cluster_ids)]
    if len(ids) != c:
        raise ValueError(f"cluster_ids has {len(ids)} entries but cm has {c} columns")
    prefix = os.fspath(path_prefix)
    csv_path = prefix + ".csv"
    with atomic_open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class"] + [f"cluster_{j}" for j in ids])
        for name, row in zip(names, m.tolist()):
            w.writerow([name] + row)
    png_path = confusion_png(prefix + ".png", m, names, [str(j) for j in ids])
    return [csv_path, str(png_path)]


_VIRIDIS_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def confusion_png(path: str | os.PathLike, cm: Any, row_labels: list[str] | None = None,
                  col_labels: list[str] | None = None, cell: int = 0) -> Path:
    """The one drawing of a confusion matrix: a PNG heat map, colour = fraction of the row (the
    class), viridis-like from dark blue (0) to yellow (1), with the row and column labels when
    the cells are large enough to carry them. Drawn with Pillow, so every caller (``twist eval``,
    ``twist report``, :func:`save_confusion`) gets the same picture without an optional plotting
    dependency. Written atomically; parent folders are created.

    Example::

        >>> import tempfile, os
        >>> confusion_png(os.path.join(tempfile.mkdtemp(), "cm.png"), np.eye(3, dtype=int) * 5).suffix
        '.png'
    """
    from PIL import Image, ImageDraw, ImageFont

    m = np.asarray(_to_numpy(cm), dtype=np.float64)
    k, c = m.shape
    frac = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    cell = cell or max(2, min(24, 800 // max(k, c, 1)))
    pos = frac * (len(_VIRIDIS_STOPS) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(_VIRIDIS_STOPS) - 2)
    t = (pos - lo)[..., None]
    rgb = (_VIRIDIS_STOPS[lo] * (1 - t) + _VIRIDIS_STOPS[lo + 1] * t).round().astype(np.uint8)
    grid = Image.fromarray(rgb, "RGB").resize((c * cell, k * cell), Image.Resampling.NEAREST)
    labelled = cell >= 12 and (row_labels is not None or col_labels is not None)
    if labelled:
        rows = [str(x)[:14] for x in (row_labels or range(k))]
        cols = [str(x)[:3] for x in (col_labels or range(c))]
        left, top = 6 * max(len(r) for r in rows) + 6, 14
        img = Image.new("RGB", (left + grid.width + 2, top + grid.height + 2), "white")
        img.paste(grid, (left, top))
        draw, font = ImageDraw.Draw(img), ImageFont.load_default()
        for i, label in enumerate(rows):
            draw.text((2, top + i * cell + cell // 2 - 5), label, fill=(40, 40, 40), font=font)
        for j, label in enumerate(cols):
            draw.text((left + j * cell + 1, 1), label, fill=(40, 40, 40), font=font)
        grid = img
    with atomic_open(path, "wb") as f:
        grid.save(f, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------- kNN
def _float_tensor(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _label_tensor(x: Any, name: str, n: int, device: torch.device) -> torch.Tensor:
    a = _labels(x, name)
    if len(a) != n:
        raise ValueError(f"{name} has {len(a)} entries but there are {n} feature rows")
    return torch.from_numpy(a).to(device)


@torch.no_grad()
def knn_predict(train_feats: Any, train_labels: Any, test_feats: Any, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None,
                batch_size: int = 1024, exclude_self: bool = False) -> torch.Tensor:
    """Weighted kNN classification (DINO / InstDisc protocol).

    Features are L2-normalised; for each query the ``k`` training samples of largest cosine
    similarity ``s`` vote for their label with weight ``exp(s / temperature)``; the class with
    the largest summed weight wins (ties: the lower class id). ``exclude_self=True`` is
    leave-one-out for ``test_feats`` being ``train_feats`` (same rows, same order): query i
    never counts training sample i among its neighbours. ``k`` is capped at the number of
    candidate neighbours.

    Runs in torch on ``train_feats``' device (CPU or CUDA; numpy input -> CPU), over query
    batches of ``batch_size``: memory ~ ``batch_size * len(train) * 4`` bytes for the
    similarities. float64 inputs stay float64, everything else is computed in float32.

    Returns (N_test,) int64 predicted labels on that device.
    """
    train = _float_tensor(train_feats, "train_feats")
    device = train.device
    test = _float_tensor(test_feats, "test_feats", device)
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"feature dims differ: train {train.shape[1]} vs test {test.shape[1]}")
    if test.dtype != train.dtype:
        test = test.to(train.dtype)
    labels = _label_tensor(train_labels, "train_labels", train.shape[0], device)
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_train = train.shape[0]
    if exclude_self and test.shape[0] != n_train:
        raise ValueError(f"exclude_self needs test_feats to be train_feats, got {test.shape[0]} "
                         f"test rows and {n_train} train rows")
    kk = min(int(k), n_train - (1 if exclude_self else 0))
    if kk < 1:
        raise ValueError("exclude_self with a single training sample leaves no neighbour")
    nc = _size(labels.cpu().numpy(), num_classes, "num_classes", "train_labels")

    train = F.normalize(train, dim=1)
    test = F.normalize(test, dim=1)
    preds = []
    for s in range(0, test.shape[0], int(batch_size)):
        q = test[s:s + int(batch_size)]
        sim = q @ train.T
        if exclude_self:
            r = torch.arange(q.shape[0], device=device)
            sim[r, r + s] = -math.inf
        top_sim, top_idx = sim.topk(kk, dim=1)
        # exp(s / T), divided by the largest weight in the row (no overflow for small T;
        # a per-row constant factor leaves the vote unchanged)
        w = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(q.shape[0], nc, dtype=w.dtype, device=device)
        votes.scatter_add_(1, labels[top_idx], w)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(train_feats: Any, train_labels: Any, test_feats: Any, test_labels: Any,
             k: int = 20, temperature: float = 0.07, exclude_self: bool = False) -> float:
    """Top-1 accuracy (fraction) of :func:`knn_predict` on ``test_labels``."""
    t = _labels(test_labels, "test_labels")
    n_test = test_feats.shape[0] if hasattr(test_feats, "shape") else len(test_feats)
    if len(t) != n_test:
        raise ValueError(f"test_labels has {len(t)} entries but test_feats has {n_test} rows")
    tl = _labels(train_labels, "train_labels")
    nc = max(int(t.max()), int(tl.max())) + 1
    pred = knn_predict(train_feats, tl, test_feats, k=k, temperature=temperature,
                       num_classes=nc, exclude_self=exclude_self)
    return float((pred.cpu().numpy() == t).mean())


# ----------------------------------------------------------------------------- linear probe
def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """(top-1 correct, top-``min(k, classes)`` correct) counts of ``logits`` (N, classes) for labels ``y``.

    Example::

        >>> topk_correct(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]]), torch.tensor([1, 2]), k=2)
        (1, 2)
    """
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top[:, 0] == y).sum()), int((top == y[:, None]).any(dim=1).sum())


def linear_probe(train_feats: Any, train_labels: Any, test_feats: Any, test_labels: Any, *,
                 epochs: int = 100, lr: float | None = None, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0, device: str | torch.device = "cpu",
                 normalize: bool = True) -> dict:
    """Linear classifier on frozen features.

    Features are standardised per dimension with the training mean and standard deviation
    (``normalize=True``); an ``nn.Linear`` (weights ~ N(0, 0.01^2), bias 0) is trained with
    cross-entropy, SGD (momentum 0.9, ``weight_decay`` on all parameters) over shuffled
    mini-batches of tensors already in memory, and a per-step cosine schedule from ``lr`` to
    0 over ``epochs``. The last mini-batch of an epoch may be smaller.

    ``lr=None`` means ``DEFAULT_PROBE_LR * batch_size / 256`` = 0.1 at batch 256, which suits
    standardised features; unstandardised features (``normalize=False``) may need another.

    Deterministic for a given ``seed`` on a given device (a private ``torch.Generator``
    drives the initialisation and shuffling; the global RNG is untouched).

    Returns ``{'top1', 'top5', 'epochs', 'lr', 'train_loss'}``: test top-1 and top-5
    (top-``min(5, classes)``) accuracy as fractions, the epochs run, the base learning rate
    used, and the mean training loss of the last epoch. Classes are ``0 .. max label``
    over train and test labels.
    """
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    x_tr = _float_tensor(train_feats, "train_feats", dev).float()
    x_te = _float_tensor(test_feats, "test_feats", dev).float()
    if x_te.shape[1] != x_tr.shape[1]:
        raise ValueError(f"feature dims differ: train {x_tr.shape[1]} vs test {x_te.shape[1]}")
    y_tr = _label_tensor(train_labels, "train_labels", x_tr.shape[0], dev)
    y_te = _label_tensor(test_labels, "test_labels", x_te.shape[0], dev)
    num_classes = int(max(y_tr.max().item(), y_te.max().item())) + 1
    base_lr = DEFAULT_PROBE_LR * int(batch_size) / 256 if lr is None else float(lr)
    if not base_lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")

    if normalize:
        mean = x_tr.mean(dim=0, keepdim=True)
        std = x_tr.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-6)
        x_tr = (x_tr - mean) / std
        x_te = (x_te - mean) / std

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n, dim = x_tr.shape
    head = torch.nn.utils.skip_init(torch.nn.Linear, dim, num_classes, device=dev)  # no global RNG
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, dim, generator=gen).mul_(0.01))
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=0.9,
                          weight_decay=float(weight_decay))
    bs = int(batch_size)
    steps_per_epoch = math.ceil(n / bs)
    total = int(epochs) * steps_per_epoch
    step = 0
    last_loss = float("nan")
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen).to(dev)
        loss_sum = torch.zeros((), device=dev)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            for g in opt.param_groups:
                g["lr"] = base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            step += 1
        last_loss = loss_sum.item() / n

    k5 = min(5, num_classes)
    correct1 = correct5 = 0
    with torch.no_grad():
        for s in range(0, x_te.shape[0], 8192):
            logits = head(x_te[s:s + 8192])
            y = y_te[s:s + 8192]
            top = logits.topk(k5, dim=1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(dim=1).sum())
    m = x_te.shape[0]
    return {"top1": correct1 / m, "top5": correct5 / m, "epochs": int(epochs), "lr": base_lr,
            "train_loss": last_loss}
