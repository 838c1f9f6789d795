"""Self-labeling (METHOD.md section 6): weak anchor, threshold, masked cross-entropy by hand;
the stage after TWIST in one run: metrics, stage marker in checkpoints, exact resume."""

import json
import math

import numpy as np
import pytest
import torch

from twist.checkpoint import load_checkpoint
from twist.config import apply_overrides
from twist.presets import get_preset
from twist.selflabel import SelfLabelLoss, selection_threshold, selflabel_loss

EPS = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small, busy CPU these many small ops run faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Per-sample probabilities of each view (rows sum to 1); logits = log(p) give softmax = p.
G1 = [[0.70, 0.20, 0.10], [0.40, 0.30, 0.30], [0.10, 0.10, 0.80], [0.34, 0.33, 0.33]]
G2 = [[0.50, 0.40, 0.10], [0.10, 0.80, 0.10], [0.20, 0.60, 0.20], [0.30, 0.30, 0.40]]
L1 = [[0.30, 0.30, 0.40], [0.25, 0.50, 0.25], [0.10, 0.20, 0.70], [0.60, 0.20, 0.20]]


def _logits(p):
    return torch.tensor(p, dtype=torch.float64).log().requires_grad_(True)


def _entropy(p):
    p = np.asarray(p)
    return float(-(p * np.log(p + EPS)).sum(-1).mean())


def test_anchor_threshold_and_cross_entropy_by_hand():
    g1, g2, l1 = _logits(G1), _logits(G2), _logits(L1)
    loss, stats = selflabel_loss([g1, g2, l1], quantile=0.5)
    # Max-probabilities: g1 (.70 .40 .80 .34), g2 (.50 .80 .60 .40)
    # -> weak anchors g1, g2, g1, g2 with confidences (.70 .80 .80 .40), targets (0, 1, 2, 2).
    assert stats["targets"].tolist() == [0, 1, 2, 2]
    assert stats["anchor_first"].item() == pytest.approx(0.5)
    # q = 0.5, B = 4: sorted confidences (.8 .8 .7 .4), position floor(0.5 * 4) = 2 -> threshold .7;
    # strictly above: samples 1 and 2.
    assert stats["threshold"].item() == pytest.approx(0.70)
    assert stats["mask"].tolist() == [False, True, True, False]
    assert stats["selected"].item() == pytest.approx(0.5)
    # Strong views: the other global (sample 1: g1, target 1 -> p .30; sample 2: g2, target 2 -> p .20)
    # and the local crop (sample 1: .50; sample 2: .70). CE per view over the 2 selected samples,
    # then the mean over the 2 strong views.
    ce_global = (-math.log(0.30) - math.log(0.20)) / 2
    ce_local = (-math.log(0.50) - math.log(0.70)) / 2
    assert loss.item() == pytest.approx((ce_global + ce_local) / 2, rel=1e-9)
    # Logged only: TWIST entropies of the two global views.
    assert stats["sharpness"].item() == pytest.approx(0.5 * (_entropy(G1) + _entropy(G2)), rel=1e-9)
    div = 0.5 * sum(-(np.mean(p, 0) * np.log(np.mean(p, 0) + EPS)).sum() for p in (G1, G2))
    assert stats["diversity"].item() == pytest.approx(div, rel=1e-9)

    loss.backward()
    # No gradient into weak anchors or unselected samples: g1 is strong only for sample 1, g2
    # only for sample 2, the local crop for samples 1 and 2.
    nonzero = lambda g: [bool(r.abs().sum() > 0) for r in g.grad]  # noqa: E731
    assert nonzero(g1) == [False, True, False, False]
    assert nonzero(g2) == [False, False, True, False]
    assert nonzero(l1) == [False, True, True, False]
    # d CE / d z = (softmax - onehot) / (n_selected * n_strong_views)
    expected = (torch.tensor(G1[1], dtype=torch.float64) - torch.tensor([0.0, 1.0, 0.0])) / (2 * 2)
    torch.testing.assert_close(g1.grad[1], expected)


def test_quantile_is_the_fraction_that_trains():
    conf = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.05])
    for q, n in [(0.0, 0), (0.5, 5), (0.6, 6), (0.55, 5), (1.0, 9)]:
        thr = selection_threshold(conf, q)
        assert int((conf > thr).sum()) == n, q
    with pytest.raises(ValueError):
        selection_threshold(conf, 1.5)


def test_nothing_selected_gives_zero_loss_with_a_graph():
    g1 = _logits([[0.5, 0.5], [0.5, 0.5]])
    g2 = _logits([[0.5, 0.5], [0.5, 0.5]])
    loss, stats = selflabel_loss([g1, g2], quantile=0.6)  # all tied: nothing strictly above
    assert stats["selected"].item() == 0
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.all(g1.grad == 0)


def test_teacher_logits_choose_anchor_and_targets():
    g1, g2, l1 = _logits(G1), _logits(G2), _logits(L1)
    # The teacher is confident on global view 2 for every sample, with target 0.
    t = torch.tensor([[0.4, 0.3, 0.3], [0.9, 0.05, 0.05]], dtype=torch.float64).log()
    t1, t2 = t[0].expand(4, 3), t[1].expand(4, 3)
    crit = SelfLabelLoss(quantile=1.0)
    terms = crit([g1, g2, l1], teacher=[t1, t2])
    _, stats = selflabel_loss([g1, g2, l1], 1.0, anchor_logits=[t1, t2])
    assert stats["targets"].tolist() == [0, 0, 0, 0]
    assert stats["anchor_first"].item() == 0
    # All confidences tie at 0.9: nothing is strictly above the threshold.
    assert terms.selected.item() == 0


def test_temperature_and_shapes_are_checked():
    with pytest.raises(ValueError, match="two global"):
        selflabel_loss([torch.zeros(2, 3)], 0.5)
    with pytest.raises(ValueError, match="same shape"):
        selflabel_loss([torch.zeros(2, 3), torch.zeros(2, 4)], 0.5)
    with pytest.raises(ValueError, match="tau"):
        selflabel_loss([torch.zeros(2, 3), torch.zeros(2, 3)], 0.5, tau=0)


# ---------------------------------------------------------------------- the stage in a run
@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, size=(16, 16, 16, 1), dtype=np.uint8), y=np.arange(16) % 4)
    return str(path)


def _cfg(**extra):
    cfg = get_preset("digits")
    apply_overrides(cfg, [
        "model.small_cnn_width=4", "model.hidden_dim=16", "model.num_classes=8", "train.batch_size=8",
        "train.epochs=1", "train.image_size=16", "augment.global_size=16", "augment.local_size=8",
        "augment.num_local=2", "train.precision=fp32", "train.device=cpu", "train.eval_every=1",
        "selflabel.epochs=2", "selflabel.warmup_epochs=1", "optim.lr=0.01", "selflabel.lr=0.01",
        *[f"{k}={v}" for k, v in extra.items()],
    ])
    return cfg


def test_stage_runs_after_twist_and_resumes_exactly(tiny_npz, tmp_path):
    from twist.train import train

    full = tmp_path / "full"
    last = train(_cfg(), tiny_npz, full, progress=False)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("stage", "twist") for r in records] == ["twist", "selflabel", "selflabel"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["selflabel_epoch"] for r in records[1:]] == [1, 2]
    assert last["stage"] == "selflabel" and "acc" in last and "nmi" in last
    assert records[-1]["quantile"] == pytest.approx(0.6)  # cosine 0.5 -> 0.6 over the stage
    assert 0 < records[1]["selected"] <= 0.75
    ckpt = load_checkpoint(full)
    assert ckpt["stage"] == "selflabel"
    assert ckpt["selflabel"] == {"epoch": 2, "step_in_epoch": 0, "global_step": 4}
    assert ckpt["state"]["epoch"] == 1  # the TWIST stage is complete

    # Interrupted inside the self-labeling stage (TWIST 2 steps + 1), then resumed.
    part = tmp_path / "part"
    train(_cfg(), tiny_npz, part, progress=False, max_steps=3)
    mid = load_checkpoint(part)
    assert mid["stage"] == "selflabel" and mid["selflabel"]["step_in_epoch"] == 1
    train(_cfg(), tiny_npz, part, progress=False)
    end = load_checkpoint(part)
    assert end["selflabel"] == ckpt["selflabel"]
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(end["model"][k], v, msg=k)
    # A finished run does nothing more.
    again = train(_cfg(), tiny_npz, part, progress=False)
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed) == 3 and again == {}


@pytest.mark.parametrize("crash", ["before", "after"])
def test_a_crash_at_the_stage_checkpoint_neither_loses_nor_doubles_a_metrics_line(tiny_npz, tmp_path, monkeypatch,
                                                                                   crash):
    """The process dies while (before) or right after (after) writing the first self-labeling
    epoch's checkpoint; the resumed run's metrics.jsonl has every epoch exactly once."""
    import twist.stage
    from twist.train import train

    real_save = twist.stage.save_checkpoint

    def dying_save(payload, path):
        if payload.get("stage") == "selflabel" and payload["selflabel"]["epoch"] == 1:
            if crash == "after":
                real_save(payload, path)
            raise KeyboardInterrupt("killed")
        return real_save(payload, path)

    run = tmp_path / "run"
    monkeypatch.setattr(twist.stage, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), tiny_npz, run, progress=False)
    monkeypatch.setattr(twist.stage, "save_checkpoint", real_save)
    train(_cfg(), tiny_npz, run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_a_diverged_stage_stops_at_the_skip_cap_and_keeps_the_twist_checkpoint(tiny_npz, tmp_path, monkeypatch):
    """Under train.nonfinite=skip the self-labeling stage stops after train.max_skipped_in_a_row
    non-finite steps in a row, as the TWIST stage does, and leaves the TWIST stage's checkpoint
    and metrics line as they were."""
    import twist.selflabel
    import twist.train
    from twist.train import TrainingError, train

    run = tmp_path / "run"
    real_step = twist.train.train_step
    calls = {"n": 0, "saved": None}

    def step(model, criterion, optimizer, views, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the first self-labeling step (the TWIST stage has 2)
            calls["saved"] = (run / "checkpoint.pt").read_bytes()
        if calls["n"] >= 3:
            views = [torch.full_like(v, float("nan")) for v in views]
        return real_step(model, criterion, optimizer, views, **kw)

    monkeypatch.setattr(twist.train, "train_step", step)  # the TWIST stage's steps
    monkeypatch.setattr(twist.selflabel, "train_step", step)  # the self-labeling stage's
    cfg = _cfg(**{"train.nonfinite": "skip", "train.max_skipped_in_a_row": 2})
    with pytest.raises(TrainingError, match=r"self-labeling epoch 1.*2 steps in a row.*max_skipped_in_a_row=2"):
        train(cfg, tiny_npz, run, progress=False)
    assert calls["n"] == 4
    assert (run / "checkpoint.pt").read_bytes() == calls["saved"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("stage", "twist") for r in records] == ["twist"]
