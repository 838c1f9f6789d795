"""Running a trained model over a dataset: features, class probabilities, and the per-epoch
evaluation (cluster metrics + kNN) the trainer logs.

Everything streams in batches under ``torch.no_grad`` with the model in eval mode, so the
BatchNorms (and the NBS) use their running statistics, as METHOD.md section 8 prescribes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch

from twist import distributed as tdist
from twist.evaluate import cluster_metrics, knn_top1


def _autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def extract(model, dataset, transform: Callable[[torch.Tensor], torch.Tensor], *, device: torch.device | str = "cpu",
            precision: str = "fp32", batch_size: int = 512, tau: float = 1.0, want_features: bool = True,
            want_probs: bool = True, progress: bool = False, indices: np.ndarray | None = None,
            channels_last: bool = False,
            features_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
            ) -> dict[str, torch.Tensor]:
    """Backbone features (N, D) and softmax(logits / tau) (N, C) of every image, in order.

    Features and probabilities are returned as float32 CPU tensors. ``indices`` restricts the
    pass to those images (used by distributed evaluation to take one shard per process).
    ``features_fn(x) -> (head input, features)`` replaces ``model.features`` when the features
    to return are not the head's input (a ViT's last-4 class tokens, :func:`twist.vit.vit_features`),
    so both come from one backbone pass.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    order = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    feats, probs = [], []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="inference", leave=False, dynamic_ncols=True)
    try:
        for s in starts:
            idx = torch.as_tensor(order[s:s + batch_size])
            x = transform(dataset.get_batch(idx).to(device, non_blocking=True))
            x = x.contiguous(memory_format=memory_format)
            with _autocast(device, precision):
                if features_fn is None:
                    h = f = model.features(x)
                else:
                    h, f = features_fn(x)
                if want_probs:
                    z = model.head(h)
            if want_features:
                feats.append(f.float().cpu())
            if want_probs:
                probs.append(torch.softmax(z.float() / tau, dim=1).cpu())
    finally:
        model.train(was_training)
    out: dict[str, torch.Tensor] = {}
    if want_features:
        out["features"] = torch.cat(feats) if feats else torch.empty(0)
    if want_probs:
        out["probs"] = torch.cat(probs) if probs else torch.empty(0)
    return out


def evaluate_model(model, val, transform, *, device, precision: str = "fp32", batch_size: int = 512,
                   memory=None, k: int = 20, temperature: float = 0.07, channels_last: bool = False) -> dict[str, Any]:
    """Cluster ACC/NMI/AMI/ARI, clusters used, and kNN top-1 on labelled data ``val``.

    kNN uses ``memory`` (a labelled training set) as the bank when given; otherwise ``val``
    itself with leave-one-out (each query's own feature excluded from its neighbours).
    """
    if tdist.is_distributed():
        return _evaluate_distributed(model, val, transform, device=device, precision=precision, batch_size=batch_size,
                                     memory=memory, k=k, temperature=temperature, channels_last=channels_last)
    res = extract(model, val, transform, device=device, precision=precision, batch_size=batch_size,
                  channels_last=channels_last)
    return _metrics(res, val, memory, k, temperature,
                    lambda: extract(model, memory, transform, device=device, precision=precision,
                                    batch_size=batch_size, want_probs=False, channels_last=channels_last)["features"])


def _metrics(res: dict[str, torch.Tensor], val, memory, k: int, temperature: float,
             bank_features: Callable[[], torch.Tensor]) -> dict[str, Any]:
    labels = np.asarray(val.labels)
    pred = res["probs"].argmax(1).numpy()
    metrics = cluster_metrics(labels, pred, num_clusters=res["probs"].shape[1])
    out = {key: metrics[key] for key in ("acc", "nmi", "ami", "ari", "clusters_used")}
    if memory is not None and memory.labels is not None:
        bank = bank_features()
        out["knn_top1"] = knn_top1(bank, memory.labels, res["features"], labels, k=k, temperature=temperature)
    else:
        out["knn_top1"] = knn_top1(res["features"], labels, res["features"], labels, k=k, temperature=temperature,
                                   exclude_self=True)
    return out


def _evaluate_distributed(model, val, transform, *, device, precision: str, batch_size: int, memory, k: int,
                          temperature: float, channels_last: bool) -> dict[str, Any]:
    """:func:`evaluate_model` with several processes: same result as one process.

    Every rank first takes rank 0's parameters and buffers (with NBS bunches smaller than the
    world, ranks' running statistics differ after training; rank 0's are the ones saved in the
    checkpoint), then extracts one disjoint contiguous shard of the images; rank 0 gathers the
    shards in dataset order (no padding, so no duplicates), computes the metrics, and sends
    them to every rank, so every rank returns the same dict.
    """
    tdist.broadcast_module_state(model)
    device = torch.device(device)
    comm = device if device.type == "cuda" else None

    def sharded(dataset, want_probs: bool) -> dict[str, torch.Tensor | None]:
        start, stop = tdist.shard(len(dataset))
        part = extract(model, dataset, transform, device=device, precision=precision, batch_size=batch_size,
                       want_probs=want_probs, indices=np.arange(start, stop), channels_last=channels_last)
        return {key: tdist.gather_rows(value, len(dataset), device=comm) for key, value in part.items()}

    res = sharded(val, want_probs=True)
    bank = sharded(memory, want_probs=False)["features"] if memory is not None and memory.labels is not None else None
    out = _metrics(res, val, memory, k, temperature, lambda: bank) if tdist.rank() == 0 else None
    return tdist.broadcast_object(out)
