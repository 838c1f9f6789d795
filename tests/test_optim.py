"""LARS against a hand computation, parameter groups, and the schedules."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from twist.config import OptimConfig
from twist.optim import LARS, build_optimizer, cosine_schedule, param_groups, set_step_values


def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))      # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.01)
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    opt.step()
    upd = torch.tensor([[0.0, 1.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # g + wd * w = (1.5, 3)
    ratio = 0.01 * 5.0 / math.sqrt(1.5 ** 2 + 3 ** 2)
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * ratio * upd)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))
    # second step uses momentum
    w_before = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    upd2 = 0.5 * w_before
    ratio2 = 0.01 * w_before.norm() / upd2.norm()
    mu = 0.9 * ratio * upd + ratio2 * upd2
    torch.testing.assert_close(w.detach(), w_before - 0.1 * mu)


def test_param_groups_exclude_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    groups = param_groups(model)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([8, 4]), torch.Size([2, 8])]
    assert len(groups[1]["params"]) == 4 and groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=0.1), lr=1.0)
    set_step_values(opt, 0.5, 0.2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW)])
def test_build_each_optimizer(name, cls):
    assert isinstance(build_optimizer(nn.Linear(3, 3), OptimConfig(name=name), 0.1), cls)


def test_cosine_schedule_shape():
    s = cosine_schedule(1.0, 0.01, total_steps=110, warmup_steps=10)
    assert len(s) == 110
    assert s[0] == 0.0 and s[9] < 1.0 and s[10] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.01)
    assert np.all(np.diff(s[10:]) <= 1e-12) and np.all(np.diff(s[:11]) > 0)
    const = cosine_schedule(0.3, 0.3, 5)
    assert np.allclose(const, 0.3)


def test_vit_tokens_are_not_decayed():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.proj = nn.Linear(4, 4)

    groups = param_groups(Tiny())
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 4])]
    assert len(groups[1]["params"]) == 3
