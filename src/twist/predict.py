"""Cluster predictions (and embeddings) for a folder of images of any size.

``twist predict CHECKPOINT IMAGES --out predictions.csv [--embeddings emb.npy]`` is a thin layer
over :func:`predict`. Images are read in streamed mode (decoded batch by batch, never all at
once), the CSV is written row by row and the embeddings go straight into a memory-mapped
``.npy`` file, so memory stays flat however many images there are. Both files are written to a
temporary name and renamed when complete, so an interrupted run leaves no half file.

CSV columns (one row per image, in dataset order -- sorted paths for folders)::

    index, path, cluster, confidence, top1_cluster, top1_prob, top2_cluster, top2_prob,
    top3_cluster, top3_prob[, label, label_name]

``path`` is the file (non-UTF-8 bytes written as ``\\xNN``, control characters escaped, see
:func:`twist.data.display_path`) or, for arrays (npz, digits), the image index. ``cluster`` is
the argmax of the class probabilities ``softmax(logits / tau)`` (``tau`` of the run's loss) in
eval mode and ``confidence`` its probability. ``label`` / ``label_name`` appear when the data has
labels. Embeddings are the pooled backbone features (float32, ``(N, D)``), rows in CSV order.
"""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from twist.data import ImageDataset, batch_loader, display_path, load_dataset
from twist.io import atomic_open, atomic_path

__all__ = ["predict", "stream_outputs", "load_for_prediction", "read_predictions", "match_channels", "CSV_COLUMNS"]

CSV_COLUMNS = ["index", "path", "cluster", "confidence", "top1_cluster", "top1_prob", "top2_cluster", "top2_prob",
               "top3_cluster", "top3_prob"]

# Forces folders into streamed mode (decode per batch); arrays (npz, digits) are in memory anyway.
_STREAM_GB = 1e-9


def load_for_prediction(spec: str, trained, *, split: str = "train", bad_files: str = "skip",
                        stream: bool = True, progress: bool = False) -> ImageDataset:
    """Load ``spec`` at the model's image size; folders are streamed when ``stream`` (default).

    Example::

        >>> ds = load_for_prediction("my_photos/", trained)     # doctest: +SKIP
        >>> ds.in_memory                                        # doctest: +SKIP
        False
    """
    return load_dataset(spec, split, image_size=trained.image_size, bad_files=bad_files,
                        max_memory_gb=_STREAM_GB if stream else 4.0, progress=progress, crop_size=trained.crop_size)


@torch.no_grad()
def stream_outputs(trained, ds: ImageDataset, *, batch_size: int = 256, num_workers: int = 0,
                   want_features: bool = True, progress: bool = False,
                   desc: str = "predict") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yield ``(indices, probs, features)`` per batch, in dataset order, model in eval mode.

    Images whose channel count differs from the model's are converted (:func:`match_channels`).
    ``probs`` is ``softmax(logits / tau)`` as float32 numpy ``(b, C)``; ``features`` the pooled
    backbone features ``(b, D)`` float32 (None unless ``want_features``). Only one batch of
    images is held at a time (plus the loader's prefetch).

    Example::

        >>> for idx, probs, feats in stream_outputs(trained, ds, batch_size=128):   # doctest: +SKIP
        ...     print(idx[:3], probs.argmax(1)[:3])
    """
    model = trained.model
    was_training = model.training
    model.eval()
    device = trained.device
    tau = float(trained.config.loss.tau)
    loader = batch_loader(ds, batch_size, shuffle=False, drop_last=False, seed=0, epoch=0, num_workers=num_workers)
    it: Any = loader
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ds), desc=desc, unit="img", leave=False, dynamic_ncols=True)
    try:
        for images, idx in it:
            x = trained.eval_transform(match_channels(images.to(device, non_blocking=True), trained.channels))
            with _autocast(device, trained.precision):
                f = model.features(x)
                z = model.head(f)
            probs = torch.softmax(z.float() / tau, dim=1).cpu().numpy()
            feats = f.float().cpu().numpy() if want_features else None
            if bar is not None:
                bar.update(len(idx))
            yield idx.numpy(), probs, feats
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (B, C, H, W) with C in {1, 3} -> ``channels`` channels: grey is replicated, RGB
    becomes grey with the ITU-R 601 weights (0.299, 0.587, 0.114), rounded.

    Example::

        >>> match_channels(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), 3).shape
        torch.Size([2, 3, 4, 4])
    """
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def _autocast(device: torch.device, precision: str):
    from twist.runtime import autocast_context

    return autocast_context(device, precision)


def predict(trained, data: str | ImageDataset, out_csv: str | os.PathLike, embeddings: str | os.PathLike | None = None,
            *, batch_size: int = 256, split: str = "train", num_workers: int = 0, bad_files: str = "skip",
            progress: bool = True) -> dict[str, Any]:
    """Write one CSV row per image (cluster, confidence, top-3) and optionally the embeddings.

    Args:
        trained: a :class:`twist.serving.TrainedModel` (``load_trained(checkpoint)``).
        data: an :class:`ImageDataset` or a spec for :func:`twist.data.load_dataset` (folders are
            streamed: decoded batch by batch).
        out_csv: the CSV to write (columns in :data:`CSV_COLUMNS`, see the module docstring).
        embeddings: optional ``.npy`` path for the ``(N, D)`` float32 backbone features, written
            through ``numpy.lib.format.open_memmap`` batch by batch.
        batch_size, num_workers: inference batch size; decoding worker processes (0: threads).
        split: split of a folder of npz splits.
        bad_files: 'skip' (default) or 'stop' for unreadable files (folders).

    Returns a summary: ``num_images``, ``csv``, ``embeddings``, ``cluster_counts`` (list, one
    count per cluster), ``clusters_used``, ``skipped`` (files left out).

    Example::

        >>> from twist.serving import load_trained
        >>> from twist.predict import predict
        >>> trained = load_trained("runs/digits")                                   # doctest: +SKIP
        >>> predict(trained, "digits", "pred.csv", embeddings="emb.npy")["num_images"]   # doctest: +SKIP
        1797
    """
    ds = data if isinstance(data, ImageDataset) else load_for_prediction(str(data), trained, split=split,
                                                                         bad_files=bad_files, progress=progress)
    n = len(ds)
    num_clusters = trained.model.num_classes
    out_csv = Path(out_csv)
    emb_path = Path(embeddings) if embeddings is not None else None
    labels = ds.labels
    names = ds.class_names
    counts = np.zeros(num_clusters, dtype=np.int64)
    written = 0
    # both files appear only once complete (embeddings first), an interrupted run leaves neither
    with atomic_open(out_csv, "w", encoding="utf-8", errors="backslashreplace", newline="") as fh, \
            (atomic_path(emb_path) if emb_path is not None else contextlib.nullcontext()) as tmp_emb:
        emb = None
        if tmp_emb is not None:
            emb = np.lib.format.open_memmap(tmp_emb, mode="w+", dtype=np.float32, shape=(n, trained.model.feature_dim))
        w = csv.writer(fh)
        header = list(CSV_COLUMNS)
        if labels is not None:
            header += ["label", "label_name"]
        w.writerow(header)
        for idx, probs, feats in stream_outputs(trained, ds, batch_size=batch_size, num_workers=num_workers,
                                                want_features=emb is not None, progress=progress):
            k = min(3, probs.shape[1])
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            top_p = np.take_along_axis(probs, top, axis=1)
            counts += np.bincount(top[:, 0], minlength=num_clusters)
            for r, i in enumerate(idx.tolist()):
                path = display_path(ds.paths[i]) if ds.paths is not None else str(i)
                row: list[Any] = [i, path, int(top[r, 0]), f"{top_p[r, 0]:.6f}"]
                for j in range(3):
                    row += [int(top[r, j]), f"{top_p[r, j]:.6f}"] if j < k else ["", ""]
                if labels is not None:
                    lab = int(labels[i])
                    row += [lab, names[lab] if names is not None and 0 <= lab < len(names) else ""]
                w.writerow(row)
            if emb is not None:
                emb[idx] = feats
            written += len(idx)
        if emb is not None:
            emb.flush()
            del emb
    return {"num_images": written, "csv": str(out_csv), "embeddings": str(emb_path) if emb_path else None,
            "cluster_counts": counts.tolist(), "clusters_used": int((counts > 0).sum()),
            "skipped": len(ds.skipped), "replaced": ds.replaced}


def read_predictions(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a predictions CSV back into arrays (``index``, ``cluster``, ``confidence``, ``top*``,
    ``label`` when present; ``path`` as a list of strings).

    Example::

        >>> p = read_predictions("pred.csv")      # doctest: +SKIP
        >>> p["cluster"][:5]                      # doctest: +SKIP
        array([3, 3, 7, 1, 0])
    """
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, Any] = {"path": [r["path"] for r in rows]}
    for col in ("index", "cluster", "top1_cluster", "top2_cluster", "top3_cluster", "label"):
        if rows and col in rows[0] and rows[0][col] != "":
            out[col] = np.array([int(r[col]) for r in rows], dtype=np.int64)
    for col in ("confidence", "top1_prob", "top2_prob", "top3_prob"):
        if rows and col in rows[0] and rows[0][col] != "":
            out[col] = np.array([float(r[col]) for r in rows], dtype=np.float64)
    return out
