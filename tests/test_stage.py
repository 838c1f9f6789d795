"""The shared training engine (twist.stage) as the self-labeling stage sees it: the drifts the
stage had while it kept its own copy of the training loop stay fixed.

- a skipped (non-finite) self-labeling step leaves the BatchNorm running statistics unchanged;
- a full disk while self-labeling writes its checkpoint ends with the one-line error, the
  previous checkpoint intact;
- a self-labeling run killed with SIGKILL mid-stage resumes, with the same command, to the
  metrics and weights of an uninterrupted run;
- self-labeling honours train.compile and writes TensorBoard scalars as the TWIST stage does.

Tiny data (8x8 grey images) and a 4-channel convnet keep the file at well under a minute.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import twist.selflabel
import twist.stage
from twist.checkpoint import CHECKPOINT_NAME, load_checkpoint
from twist.cli import main
from twist.config import apply_overrides
from twist.presets import get_preset
from twist.train import train

from cli_helpers import child_env, train_command

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py

TINY = ["model.small_cnn_width=4", "model.hidden_dim=16", "model.num_classes=4", "train.batch_size=8",
        "train.epochs=1", "train.image_size=8", "augment.global_size=8", "augment.local_size=4",
        "augment.num_local=2", "train.precision=fp32", "train.device=cpu", "train.eval_every=1",
        "selflabel.epochs=2", "selflabel.warmup_epochs=1", "optim.lr=0.01", "selflabel.lr=0.01"]
TIMING = ("images_per_sec", "epoch_seconds")
N, STEPS_PER_EPOCH = 64, 8  # images, steps per epoch at batch 8


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (N, 8, 8, 1), dtype=np.uint8), y=np.arange(N) % 4)
    return str(path)


def tiny_cfg(*extra: str):
    return apply_overrides(get_preset("digits"), TINY + list(extra))


def buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def test_a_skipped_selflabel_step_leaves_the_batchnorm_buffers_unchanged(tiny_npz, tmp_path, monkeypatch):
    real_step = twist.selflabel.train_step
    seen = {"calls": 0}

    def step(model, criterion, optimizer, views, **kw):
        seen["calls"] += 1
        if seen["calls"] == 2:  # the second self-labeling step sees NaN images
            seen["before"] = buffers(model)
            terms, finite = real_step(model, criterion, optimizer, [torch.full_like(v, float("nan")) for v in views], **kw)
            seen["during"] = buffers(model)  # what the NaN forward left in the running statistics
            return terms, finite
        if seen["calls"] == 3:  # the next step starts from what the runner restored
            seen["after"] = buffers(model)
        return real_step(model, criterion, optimizer, views, **kw)

    monkeypatch.setattr(twist.selflabel, "train_step", step)
    last = train(tiny_cfg("train.nonfinite=skip"), tiny_npz, tmp_path / "run", progress=False)
    assert last["stage"] == "selflabel" and last["skipped_steps"] == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 0]
    changed = [k for k in seen["before"] if not torch.equal(seen["before"][k], seen["during"][k])]
    assert any("running_mean" in k for k in changed)  # the NaN forward did touch the statistics...
    for key, value in seen["before"].items():  # ...and the skip undid it
        assert torch.equal(seen["after"][key], value), key


def test_a_full_disk_while_selflabeling_gives_one_line_and_keeps_the_checkpoint(tiny_npz, tmp_path, capsys,
                                                                                 monkeypatch):
    real_save, saved = twist.stage.save_checkpoint, []

    def save_then_fill_disk(payload, path):
        if payload.get("stage") == "selflabel":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(payload, path)
        saved.append(Path(path).read_bytes())

    monkeypatch.setattr(twist.stage, "save_checkpoint", save_then_fill_disk)
    out = tmp_path / "run"
    args = ["train", tiny_npz, "--out", str(out), "--preset", "digits", "--no-progress"]
    for item in TINY:
        args += ["--set", item]
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc not in (0, None), err
    assert "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if line.startswith("twist: error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    for part in ("cannot write checkpoint", "No space left", "intact"):
        assert part in errors[0], errors[0]
    assert (out / CHECKPOINT_NAME).read_bytes() == saved[-1]  # the TWIST stage's, whole
    assert "stage" not in load_checkpoint(out / CHECKPOINT_NAME)


# ---------------------------------------------------------------------- kill -9 and resume
def command(data: str, out: Path) -> list[str]:
    return train_command(data, out, TINY + ["selflabel.epochs=3", "train.checkpoint_every_steps=1"],
                         "--preset", "digits", "--no-progress")


def selflabel_step(out: Path) -> int | None:
    """The self-labeling step of the run folder's checkpoint (None before the stage)."""
    path = out / CHECKPOINT_NAME
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)  # atomic rename: always a whole file
    return ckpt["selflabel"]["global_step"] if ckpt.get("stage") == "selflabel" else None


def test_selflabel_killed_mid_stage_resumes_to_the_uninterrupted_run(tiny_npz, tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref = subprocess.Popen(command(tiny_npz, ref_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    proc = subprocess.Popen(command(tiny_npz, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            step = selflabel_step(run_dir)
            if step is not None and step >= 1:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        else:
            pytest.fail("no self-labeling checkpoint appeared")
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
        _, ref_err = ref.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    assert ref.returncode == 0, ref_err.decode()
    killed_at = selflabel_step(run_dir)
    assert killed_at is not None and 1 <= killed_at < 3 * STEPS_PER_EPOCH  # inside the stage

    done = subprocess.run(command(tiny_npz, run_dir), capture_output=True, text=True, env=child_env(), timeout=240)
    assert done.returncode == 0, done.stderr
    assert "resuming self-labeling" in done.stderr and "Traceback" not in done.stderr
    ref_lines = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    got_lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in got_lines] == [1, 2, 3, 4]  # every epoch once
    for a, b in zip(ref_lines, got_lines):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    assert got_lines[-1]["loss"] == ref_lines[-1]["loss"]
    ref_ckpt, got_ckpt = load_checkpoint(ref_dir), load_checkpoint(run_dir)
    assert ref_ckpt["selflabel"] == got_ckpt["selflabel"] == {"epoch": 3, "step_in_epoch": 0,
                                                             "global_step": 3 * STEPS_PER_EPOCH}
    for key, tensor in ref_ckpt["model"].items():
        assert torch.equal(tensor, got_ckpt["model"][key]), key


# ---------------------------------------------------------------------- compile and TensorBoard
def test_selflabel_honours_compile_and_writes_tensorboard(tiny_npz, tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model, *a, **k):  # what torch.compile is given; the model runs uncompiled
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "run"
    train(tiny_cfg("train.compile=true", "train.tensorboard=true"), tiny_npz, out, progress=False)
    assert len(compiled) == 2  # the TWIST stage's model and the self-labeling stage's

    from tensorboard.backend.event_processing import event_accumulator as ea  # a test extra: the check always runs
    acc = ea.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss" in tags and "selflabel/loss" in tags and "selflabel/selected" in tags
    assert [e.step for e in acc.Scalars("selflabel/loss")] == [2, 3]  # epochs continue the TWIST count
    assert [e.step for e in acc.Scalars("loss")] == [1]
