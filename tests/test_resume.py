"""Crash safety: a run killed with SIGKILL at any moment resumes from its last checkpoint when
the same command is run again, and ends bit-identical to a run that was never interrupted
(model, optimiser, metrics). Checkpoints are never half-written.

The kill test runs ``twist train`` in subprocesses on a tiny npz dataset (8x8 grey images, a
4-channel convnet) so that the whole file stays well under a minute and a half on two cores.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from twist.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from twist.config import apply_overrides
from twist.presets import get_preset
from twist.stage import drop_unsaved_metrics
from twist.train import train

from cli_helpers import child_env, train_command

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py

EPOCHS, STEPS_PER_EPOCH = 2, 6
TINY = [
    "model.backbone=small_cnn", "model.small_cnn_width=4", "model.hidden_dim=32", "model.num_classes=4",
    "train.batch_size=32", "train.image_size=8", "augment.global_size=8", "augment.local_size=4",
    "train.checkpoint_every_steps=2", "train.eval_every=1",
]
TIMING = ("images_per_sec", "epoch_seconds")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory, write_random_npz) -> str:
    return write_random_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 32 * STEPS_PER_EPOCH)


def command(data: str, out: Path, precision: str = "fp32") -> list[str]:
    return train_command(data, out, TINY + [f"train.precision={precision}"], "--epochs", str(EPOCHS), "--no-progress")


def run_checkpoint_step(out: Path) -> int | None:
    path = out / CHECKPOINT_NAME
    if not path.exists():
        return None
    return load_checkpoint(path)["state"]["global_step"]  # atomic rename: always a whole file


def start_and_kill(cmd: list[str], out: Path, after_step: int, attempts: int = 3) -> int:
    """Start cmd, SIGKILL it as soon as its checkpoint is past ``after_step`` while it still runs;
    return the step of the checkpoint left behind (before the run's last step). The tiny run's
    steps take milliseconds, so on a busy machine the poller can miss every checkpoint but the
    last one; such an attempt is thrown away (its run folder removed) and made again."""
    for _ in range(attempts):
        step = _kill_once(cmd, out, after_step)
        if step is not None:
            return step
        shutil.rmtree(out)
    pytest.fail(f"no checkpoint between step {after_step} and the last step was seen in {attempts} attempts")


def _kill_once(cmd: list[str], out: Path, after_step: int) -> int | None:
    """One attempt of :func:`start_and_kill`; None when the kill came too late to be mid-run."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            step = run_checkpoint_step(out)
            if step is not None and step > after_step:
                break
            if proc.poll() is not None:
                assert proc.returncode == 0, proc.stderr.read().decode()
                return None  # finished before a checkpoint was seen
            time.sleep(0.02)
        else:
            pytest.fail("no new checkpoint appeared")
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            return None
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL again, or the one a failed wait needs
            proc.wait()
        proc.stderr.close()
    if proc.returncode == 0:
        return None  # it finished between the last look and the signal
    assert proc.returncode == -signal.SIGKILL
    step = run_checkpoint_step(out)
    assert step is not None and after_step < step
    return step if step < EPOCHS * STEPS_PER_EPOCH else None


def assert_same_run(ref_dir: Path, run_dir: Path, epochs: int = EPOCHS, heads_dropped: bool = False) -> None:
    ref, got = load_checkpoint(ref_dir / CHECKPOINT_NAME), load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert ref["state"] == got["state"] == {"epoch": epochs, "step_in_epoch": 0, "global_step": epochs * STEPS_PER_EPOCH,
                                            "heads_dropped": heads_dropped}
    assert ref["model"].keys() == got["model"].keys()
    for key, tensor in ref["model"].items():
        assert torch.equal(tensor, got["model"][key]), key
    for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert torch.equal(ref["rng_per_rank"]["0"]["augment"], got["rng_per_rank"]["0"]["augment"])
    ref_lines = (ref_dir / "metrics.jsonl").read_text().splitlines()
    got_lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in got_lines] == list(range(1, epochs + 1))  # no epoch twice
    for a, b in zip(map(json.loads, ref_lines), map(json.loads, got_lines)):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_sigkill_mid_run_then_same_command_resumes_bit_identical(tiny_npz, tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    # the uninterrupted reference runs alongside the first attempt (two cores)
    ref = subprocess.Popen(command(tiny_npz, ref_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    try:
        start_and_kill(command(tiny_npz, run_dir), run_dir, after_step=0)
    finally:
        _, ref_err = ref.communicate(timeout=240)
    assert ref.returncode == 0, ref_err.decode()
    done = subprocess.run(command(tiny_npz, run_dir), capture_output=True, text=True, env=child_env(), timeout=240)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and "Traceback" not in done.stderr
    assert_same_run(ref_dir, run_dir)


def tiny_config(precision: str, epochs: int = EPOCHS):
    cfg = get_preset("cifar10")
    return apply_overrides(cfg, TINY + [f"train.epochs={epochs}", f"train.precision={precision}"])


def test_resume_mid_epoch_in_process_is_bit_identical_in_bf16(tiny_npz, tmp_path):
    """The same guarantee without a kill (max_steps stops mid-epoch after a checkpoint), under
    CPU bf16 autocast: resume is deterministic in reduced precision too."""
    cfg = tiny_config("bf16", epochs=1)
    train(cfg, tiny_npz, tmp_path / "ref", progress=False)
    train(cfg, tiny_npz, tmp_path / "run", progress=False, max_steps=3)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["state"]["step_in_epoch"] == 3
    train(cfg, tiny_npz, tmp_path / "run", progress=False)
    assert_same_run(tmp_path / "ref", tmp_path / "run", epochs=1)


def test_resume_after_the_losing_heads_were_dropped_is_bit_identical(tiny_npz, tmp_path):
    """model.drop_heads_after=1: the checkpoints of epoch 2 hold the winner (and the
    over-clustering head) only and say so; a run stopped mid-epoch 2 rebuilds the same smaller
    model and optimiser groups on resume and ends where the uninterrupted run does."""
    cfg = apply_overrides(tiny_config("fp32"), ["model.drop_heads_after=1"])
    train(cfg, tiny_npz, tmp_path / "ref", progress=False)
    train(cfg, tiny_npz, tmp_path / "run", progress=False, max_steps=STEPS_PER_EPOCH + 3)
    mid = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert mid["state"]["step_in_epoch"] == 3 and mid["state"]["heads_dropped"] is True
    assert not any(k.startswith("extra_heads.") for k in mid["model"])
    assert any(k.startswith("aux_heads.") for k in mid["model"])
    train(cfg, tiny_npz, tmp_path / "run", progress=False)
    assert_same_run(tmp_path / "ref", tmp_path / "run", heads_dropped=True)
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs[0]["head_losses"]) == cfg.model.num_heads and epochs[0]["heads_dropped"] is True
    assert len(epochs[1]["head_losses"]) == 1 and "heads_dropped" not in epochs[1]
    from twist.serving import load_trained

    served = load_trained(tmp_path / "run", device="cpu").model  # evaluate / predict / export load it too
    assert len(served.heads) == 1 and torch.equal(served.head.last_linear.weight, final_head_weight(tmp_path / "run"))


def final_head_weight(run: Path) -> torch.Tensor:
    return load_checkpoint(run / CHECKPOINT_NAME)["model"]["head.last_linear.weight"]


def test_rerunning_a_finished_run_changes_nothing(tiny_npz, tmp_path):
    cfg = tiny_config("fp32")
    apply_overrides(cfg, ["train.epochs=1", "train.eval_every=0"])
    train(cfg, tiny_npz, tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    train(cfg, tiny_npz, tmp_path, progress=False)
    assert ((tmp_path / CHECKPOINT_NAME).read_bytes(), (tmp_path / "metrics.jsonl").read_text()) == before


def test_checkpoint_write_failure_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"state": {"epoch": 1}, "w": torch.arange(4)}, path)
    old = path.read_bytes()

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        save_checkpoint({"state": {"epoch": 2}}, path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp file left


def test_metrics_of_epochs_not_in_the_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": e, "loss": 1.0 / e}) for e in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + '{"epoch": 4, "lo')  # epoch 3 logged, not saved; 4 cut short
    drop_unsaved_metrics(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    drop_unsaved_metrics(path, 0)
    assert path.read_text() == ""


def test_progressive_resizing_trains_each_epoch_at_its_size_and_resumes_bit_identical(tiny_npz, tmp_path, monkeypatch):
    """augment.progressive_start: the views grow 8 -> 16 px over the first 3 of 4 epochs (the model
    sees 8, 8, 16, 16 px), evaluation stays at 16 px, and a run stopped in its third epoch, right
    where the size changes, resumes to the uninterrupted run's exact end."""
    import twist.train as train_module

    cfg = apply_overrides(tiny_config("fp32", epochs=4), ["train.image_size=16", "augment.global_size=16",
                                                          "augment.local_size=8", "augment.progressive_start=0.5"])
    assert [cfg.augment.view_sizes(e, 4) for e in range(4)] == [(8, 4), (8, 4), (16, 8), (16, 8)]
    sides = []
    real = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda model, crit, opt, views, **kw: sides.append(
        views[0].shape[-1]) or real(model, crit, opt, views, **kw))
    train(cfg, tiny_npz, tmp_path / "ref", progress=False)
    assert sides == [8] * 2 * STEPS_PER_EPOCH + [16] * 2 * STEPS_PER_EPOCH
    sides.clear()
    train(cfg, tiny_npz, tmp_path / "run", progress=False, max_steps=2 * STEPS_PER_EPOCH + 1)
    train(cfg, tiny_npz, tmp_path / "run", progress=False)
    assert sides == [8] * 2 * STEPS_PER_EPOCH + [16] * 2 * STEPS_PER_EPOCH
    assert_same_run(tmp_path / "ref", tmp_path / "run", epochs=4)
