"""Tests of random erasing in the multi-crop augmentation (``AugmentConfig.erase_p``): validation,
nothing changes (output and random stream) when it is off, each erased view differs from the
unerased one in exactly one rectangle filled with the mean, the rectangle's size and aspect
follow ``erase_scale`` / ``erase_ratio``, and the views cut at decode time are erased too."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from test_augment import _plain
from twist.augment import MultiCropAugment, _erase_boxes
from twist.config import ConfigError, TwistConfig


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 16, size: int = 28) -> torch.Tensor:
    return torch.randint(1, 256, (n, 1, size, size), generator=_gen(1), dtype=torch.uint8)


@pytest.mark.parametrize("field, value", [("erase_p", -0.1), ("erase_p", 1.5), ("erase_scale", (0.0, 0.3)),
                                          ("erase_scale", (0.5, 0.2)), ("erase_scale", (0.1, 1.2)),
                                          ("erase_ratio", (0.0, 2.0)), ("erase_ratio", (3.0, 1.0))])
def test_bad_values_are_rejected_naming_the_field(field, value):
    cfg = TwistConfig()
    setattr(cfg.augment, field, value)
    with pytest.raises(ConfigError, match=f"augment.{field}"):
        cfg.validate()


def test_off_changes_nothing_and_draws_nothing():
    old = _plain(global_size=20, local_size=12, num_local=2)
    new = dataclasses.replace(old, erase_p=0.0, erase_scale=(0.5, 0.6))
    g_old, g_new = _gen(3), _gen(3)
    a = MultiCropAugment(old, 1)(_images(), g_old)
    b = MultiCropAugment(new, 1)(_images(), g_new)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(g_old.get_state(), g_new.get_state())


def _box_of(diff: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the bounding box of a non-empty (S, S) boolean map."""
    rows, cols = torch.nonzero(diff.any(1)).flatten(), torch.nonzero(diff.any(0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_erased_views_differ_in_one_rectangle_filled_with_the_mean():
    """With one global view only (num_local=0, so the local stream is not shifted), p=1: every view
    differs from the unerased one inside one rectangle, where it is 0 (the mean after
    normalisation), and nowhere else. The images have no pixel equal to the mean, so the box is
    exactly where they differ."""
    mean, std = [0.3], [0.2]
    cfg = _plain(global_size=20, local_size=12, num_local=0)
    on = dataclasses.replace(cfg, erase_p=1.0, erase_scale=(0.05, 0.3))
    images = _images()
    plain = MultiCropAugment(cfg, 1, mean=mean, std=std)(images, _gen(5))
    erased = MultiCropAugment(on, 1, mean=mean, std=std)(images, _gen(5))
    for p_view, e_view in zip(plain, erased):
        for p_img, e_img in zip(p_view[:, 0], e_view[:, 0]):
            diff = p_img != e_img
            top, left, h, w = _box_of(diff)
            box = torch.zeros_like(diff)
            box[top:top + h, left:left + w] = True
            assert torch.equal(diff, box)  # one full rectangle, nothing else
            assert torch.all(e_img[box] == 0)
            assert 0.05 * 400 * 0.6 <= h * w <= 0.3 * 400 * 1.4  # the area range, up to rounding of the sides


def test_probability_is_respected():
    cfg = dataclasses.replace(_plain(global_size=20, local_size=12, num_local=0), erase_p=0.25)
    images = _images(n=400)
    plain = MultiCropAugment(dataclasses.replace(cfg, erase_p=0.0), 1)(images, _gen(2))
    erased = MultiCropAugment(cfg, 1)(images, _gen(2))
    frac = np.mean([bool((a != b).any()) for v, w in zip(plain, erased) for a, b in zip(v, w)])
    assert 0.19 < frac < 0.31  # 800 draws: 4.6 standard deviations either side of 0.25


def test_box_sizes_follow_scale_and_ratio():
    """The drawn boxes, before rounding, have the area fraction uniform in scale and the aspect
    log-uniform in ratio: checked on the means of many draws of a large view, and every box fits."""
    size = 200
    u = np.random.default_rng(0).random((20000, 5))
    top, left, h, w = _erase_boxes(u, size, 1.0, (0.1, 0.3), (0.5, 2.0))
    assert np.all(h >= 1) and np.all(w >= 1) and np.all(top + h <= size) and np.all(left + w <= size)
    assert np.all(top >= 0) and np.all(left >= 0)
    frac = h * w / size ** 2
    assert abs(frac.mean() - 0.2) < 0.005
    assert abs(np.log(h / w).mean()) < 0.02 and np.log(h / w).max() < math.log(2.0) + 0.02
    off = _erase_boxes(u, size, 0.0, (0.1, 0.3), (0.5, 2.0))
    assert not off[2].any() and not off[3].any()  # not erased: height and width 0


def test_views_cut_at_decode_time_are_erased_too():
    cfg = dataclasses.replace(_plain(global_size=12, local_size=8, num_local=1), erase_p=1.0)
    aug = MultiCropAugment(cfg, 1, mean=[0.5], std=[0.5])
    views = [torch.full((4, 1, 12, 12), 255, dtype=torch.uint8)] * 2 + [torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)]
    out = aug.photometric(views, _gen(0))
    for v in out:
        zeros = (v == 0).flatten(1).sum(1)
        assert torch.all(zeros > 0) and torch.all(zeros < v[0].numel())
