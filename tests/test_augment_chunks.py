"""Tests of the CPU's chunked colour steps of the tensor path (``MultiCropAugment._colour`` with
``colour="tensor"``; the compiled path is tests/test_fused_colour.py): every step is per image,
so working through the batch a few rows at a time (to stay in the cache) must give what one pass
over the whole batch gives, for views cut in memory and at decode time alike; and the chunks
cover every row once, never across two views. "What one pass gives" is to float32 rounding: on
AVX-512 CPUs the outputs are bit for bit equal, on an AVX2-only CPU (AMD Zen 3) torch's
element-wise kernels split a one-row chunk between their vector loop and their scalar tail
differently from a whole view, and 1-2 ulp differences (at most 1.4e-6 here) appear; a chunk
given the wrong rows or the wrong image's parameters is off by 0.1 or more."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import twist.augment as augment
from test_augment import _plain
from twist.augment import MultiCropAugment


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _everything_on():
    """Every colour step on at probabilities that leave some images with and some without it."""
    return _plain(global_size=24, local_size=12, num_local=3, global_scale=(0.3, 1.0), local_scale=(0.1, 0.4),
                  ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                  hue=0.1, grayscale_p=0.3, blur_p=(1.0, 0.3, 0.5), blur_sigma=(2.0, 15.0),
                  solarize_p=(0.0, 0.5, 0.5), erase_p=0.5)


def _with_chunk(monkeypatch, floats: int, fn):
    monkeypatch.setattr(augment, "_CHUNK_FLOATS", floats)
    return fn()


@pytest.mark.parametrize("floats", [1, 24 * 24 * 3 * 5, augment._CHUNK_FLOATS])  # 1 row, 5 rows, the default
def test_chunks_give_the_one_pass_result(monkeypatch, floats):
    cfg = _everything_on()
    images = torch.randint(0, 256, (11, 3, 40, 36), generator=_gen(1), dtype=torch.uint8)

    def in_memory():
        return MultiCropAugment(cfg, 3, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], colour="tensor")(images, _gen(5))

    def at_decode_time():  # uint8 views as the photo loader cuts them
        views = [torch.randint(0, 256, (11, 3, s, s), generator=_gen(10 + i), dtype=torch.uint8)
                 for i, s in enumerate([24, 24, 12, 12, 12])]
        return MultiCropAugment(cfg, 3, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], colour="tensor").photometric(views, _gen(5))

    for make in (in_memory, at_decode_time):
        whole = _with_chunk(monkeypatch, 1 << 40, make)  # one chunk per view
        chunked = _with_chunk(monkeypatch, floats, make)
        assert len(whole) == len(chunked) == 5
        for a, b in zip(whole, chunked):
            assert a.is_contiguous() and b.is_contiguous()
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # float32 rounding (docstring)


def test_the_chunked_steps_change_every_view():
    """Guards the test above: the configuration really jitters, blurs, solarizes and erases."""
    cfg = _everything_on()
    off = dataclasses.replace(cfg, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                              solarize_p=(0.0, 0.0, 0.0), erase_p=0.0)
    images = torch.randint(0, 256, (11, 3, 40, 36), generator=_gen(1), dtype=torch.uint8)
    on_views = MultiCropAugment(cfg, 3, colour="tensor")(images, _gen(5))
    off_views = MultiCropAugment(off, 3, colour="tensor")(images, _gen(5))
    for a, b in zip(on_views, off_views):
        assert ((a - b).abs().flatten(1).amax(1) > 1e-3).float().mean() > 0.5


def test_chunks_cover_each_row_once_within_its_view():
    cpu = torch.device("cpu")
    for n, per_view, values in [(12, 4, 1), (12, 4, augment._CHUNK_FLOATS // 3), (10, 5, 1 << 40), (7, 7, 2)]:
        chunks = list(augment._chunks(n, per_view, values, cpu))
        assert [lo for lo, _ in chunks] == sorted(lo for lo, _ in chunks)
        covered = [r for lo, hi in chunks for r in range(lo, hi)]
        assert covered == list(range(n))
        assert all(lo // per_view == (hi - 1) // per_view for lo, hi in chunks)
        assert all(hi - lo <= max(1, augment._CHUNK_FLOATS // values) for lo, hi in chunks)
    assert list(augment._chunks(12, 4, 1, torch.device("meta"))) == [(0, 12)]  # not a CPU: one pass
