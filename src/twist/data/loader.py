"""Batches of one epoch for one rank: a permutation per ``(seed, epoch)``, ranks' strided
slices, padding marked by negative indices, resumable from a batch, streamed datasets decoded
in ``DataLoader`` workers."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from twist.data.crops import ViewPlan
from twist.data.dataset import ImageDataset
from twist.data.threads import num_threads


def padding_mask(indices: torch.Tensor) -> torch.Tensor:
    """True where a loader index marks a padded (duplicate) entry (see :func:`batch_loader`)."""
    return indices < 0


def real_indices(indices: torch.Tensor) -> torch.Tensor:
    """The image index of every loader entry, padded ones included (``-1 - i`` -> ``i``)."""
    return torch.where(indices < 0, -1 - indices, indices)


class _BatchSet(torch.utils.data.Dataset):
    """One item = one whole batch, decoded in a DataLoader worker (streamed datasets)."""

    def __init__(self, dataset: ImageDataset, batches: list[torch.Tensor], threads: int,
                 views: ViewPlan | None = None, epoch: int = 0, planned: bool = False) -> None:
        self.dataset = dataset
        self.batches = batches
        self.threads = threads
        self.views, self.epoch = views, epoch
        self.planned = planned
        """Only read headers and draw boxes (train.decode=gpu: the trainer decodes on its device)."""

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor, list[tuple[str, str]]]:
        idx = self.batches[i]
        real = real_indices(idx).numpy()
        if self.views is not None and self.planned:
            planned, failures = self.dataset.plan_view_batch(real, self.views, self.epoch, self.threads)
            return planned, idx, failures
        if self.views is not None:
            views, failures = self.dataset.decode_view_batch(real, self.views, self.epoch, self.threads)
            return views, idx, failures
        images, failures = self.dataset.decode_batch(real, self.threads)
        return images, idx, failures


class BatchLoader:
    """Batches of one epoch for one rank; ``len()`` is the number of batches of the whole
    epoch, also when ``start_batch`` skips the first ones (a resumed epoch). See
    :func:`batch_loader`."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 epoch: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool = False, start_batch: int = 0, views: ViewPlan | None = None,
                 decode_device: torch.device | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.start_batch = max(int(start_batch), 0)
        self.views = views if dataset.images is None else None  # arrays in memory keep the batched crops
        self.decode_device = torch.device(decode_device) if decode_device is not None and self.views else None
        n = len(dataset)
        if drop_last:
            self.per_rank = n // world_size
            self._num_batches = self.per_rank // batch_size
        else:
            self.per_rank = -(-n // world_size)
            self._num_batches = -(-self.per_rank // batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def indices(self) -> torch.Tensor:
        """This rank's entries for the epoch, in order (padded ones as ``-1 - i``)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        total = self.per_rank * self.world_size
        if total <= n:
            full = perm[:total]
        else:
            reps = -(-(total - n) // n)
            pad = perm.repeat(reps)[: total - n]
            full = torch.cat([perm, -1 - pad])
        mine = full[self.rank::self.world_size]
        if self.drop_last:
            mine = mine[: self._num_batches * self.batch_size]
        return mine

    def _batches(self) -> list[torch.Tensor]:
        # a resumed epoch starts after the batches it already trained on (not decoded again)
        return list(torch.split(self.indices(), self.batch_size))[self.start_batch:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]]:
        ds = self.dataset
        batches = self._batches()
        if ds.images is not None:
            images = ds.images
            for idx in batches:
                out = images.index_select(0, real_indices(idx))
                yield (out.pin_memory() if self.pin_memory else out), idx
            return
        threads = 1 if self.num_workers > 0 else num_threads()
        planned = self.decode_device is not None
        loader = torch.utils.data.DataLoader(
            _BatchSet(ds, batches, threads, self.views, self.epoch, planned), batch_size=None, shuffle=False,
            num_workers=self.num_workers, pin_memory=self.pin_memory and not planned,
            prefetch_factor=4 if self.num_workers > 0 else None)
        for images, idx, failures in loader:
            if planned:  # train.decode=gpu: the JPEGs are decoded and cut on the training device
                images, more = ds.finish_view_batch(images, self.views, self.decode_device)
                failures = list(failures) + more
            if failures:
                ds.record_failures((str(p), str(r)) for p, r in failures)
            yield images, idx


def batch_loader(dataset: ImageDataset, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool = False, start_batch: int = 0, views: ViewPlan | None = None,
                 decode_device: torch.device | str | None = None) -> BatchLoader:
    """Batches ``(uint8 images (b, C, H, W), int64 indices)`` of one epoch for one rank.

    Deterministic in ``(seed, epoch)``; ranks take disjoint strided slices of one permutation;
    without ``drop_last`` padded entries carry index ``-1 - i`` (see the module docstring).
    In-memory datasets are indexed with one tensor operation per batch; streamed ones are
    decoded by a ``DataLoader`` with ``num_workers`` worker processes (threads when 0).
    ``views``: for streamed datasets, each batch is instead a list of uint8 view batches
    ``[(b, C, S, S) per view]`` cut at decode time from the original files (see
    :mod:`twist.data.views`); in-memory datasets ignore it and yield whole images.
    ``decode_device`` (with ``views``, streamed datasets; ``train.decode=gpu``): workers only
    read the files and draw the boxes; JPEGs are decoded and cut on this device and the view
    batches come already there (:mod:`twist.data.device_decode`); the same boxes as without it.
    """
    return BatchLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, epoch=epoch,
                       rank=rank, world_size=world_size, num_workers=num_workers, pin_memory=pin_memory,
                       start_batch=start_batch, views=views, decode_device=decode_device)
