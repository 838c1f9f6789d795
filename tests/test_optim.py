"""LARS against a hand computation, parameter groups, and the schedules."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from twist.config import OptimConfig
from twist.optim import LARS, build_optimizer, cosine_schedule, param_groups, set_step_values


def test_lars_step_by_hand():
    """Two steps of the release's formula (bytedance/TWIST lars.py) computed by hand, with the
    learning rate changed between them: local = eta ||w|| / (||g|| + wd ||w||), the update
    lr * local * (g + wd w) enters the momentum buffer, w -= buf."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))      # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.01)
    w.grad = torch.tensor([[0.0, 2.0]])               # ||g|| = 2
    b.grad = torch.tensor([2.0])
    opt.step()
    local1 = 0.01 * 5.0 / (2.0 + 0.5 * 5.0)           # = 0.05 / 4.5, not eta ||w|| / ||g + wd w||
    buf1 = 0.1 * local1 * torch.tensor([[1.5, 4.0]])  # g + wd * w = (0 + 1.5, 2 + 2)
    w1 = torch.tensor([[3.0, 4.0]]) - buf1
    torch.testing.assert_close(w.detach(), w1)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))
    # second step at a new learning rate: the buffer keeps the first step's rate inside it
    for g in opt.param_groups:
        g["lr"] = 0.3
    w.grad = torch.tensor([[1.0, 0.0]])               # ||g|| = 1
    b.grad = torch.tensor([1.0])
    opt.step()
    wn = math.hypot(*w1[0].tolist())
    local2 = 0.01 * wn / (1.0 + 0.5 * wn)
    buf2 = 0.9 * buf1 + 0.3 * local2 * (torch.tensor([[1.0, 0.0]]) + 0.5 * w1)
    torch.testing.assert_close(w.detach(), w1 - buf2)
    torch.testing.assert_close(b.detach(), torch.tensor([0.8 - (0.9 * 0.2 + 0.3 * 1.0)]))
    # the old variant (trust ratio on ||g + wd w||, lr applied after the momentum) differs here
    old_ratio1 = 0.01 * 5.0 / math.hypot(1.5, 4.0)
    assert abs(old_ratio1 - local1) > 1e-4


def test_lars_zero_gradient_without_decay_does_not_move():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = LARS([{"params": [w]}], lr=0.1, weight_decay=0.0, momentum=0.9, eta=0.01)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.isfinite(w).all() and torch.equal(w.detach(), torch.tensor([[3.0, 4.0]]))


def test_lars_converts_a_state_saved_with_the_old_key():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = LARS([{"params": [w]}], lr=0.2, weight_decay=0.0, momentum=0.9, eta=0.01)
    opt.state[w]["mu"] = torch.tensor([[1.0, 1.0]])
    w.grad = torch.tensor([[0.0, 1.0]])
    opt.step()
    local = 0.01 * 5.0 / 1.0
    buf = 0.9 * 0.2 * torch.tensor([[1.0, 1.0]]) + 0.2 * local * torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - buf)
    assert "mu" not in opt.state[w]


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
