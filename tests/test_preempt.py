"""Long unattended runs: pre-emption (SIGTERM / SIGUSR1), the run-folder lock, the status and
provenance files, exit codes, the log of a run whose stderr is not a terminal, and the
command-line conveniences that go with them (--version, YAML --config, key help and
suggestions). docs/robustness.md describes the behaviour tested here.

The signal tests run ``twist train`` in subprocesses on a tiny npz dataset (8x8 grey images, a
4-channel convnet, 40 steps per epoch), send the signal as soon as the run logs that it starts
training, and compare the resumed run with an uninterrupted one that runs alongside.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import twist
import twist.train
from twist.checkpoint import CHECKPOINT_NAME, load_checkpoint
from twist.cli import main
from twist.config import ConfigError, TwistConfig, apply_overrides, field_help, valid_keys
from twist.preempt import StopSignals
from twist.runlock import LOCK_NAME, RunLock
from twist.session import read_status

from cli_helpers import child_env, train_command

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py

STEPS_PER_EPOCH = 40
TINY = ["model.backbone=small_cnn", "model.small_cnn_width=4", "model.hidden_dim=32", "model.num_classes=4",
        "train.batch_size=32", "train.image_size=8", "augment.global_size=8", "augment.local_size=4",
        "train.eval_every=1", "train.precision=fp32", "train.device=cpu", "optim.warmup_epochs=0.5"]
TIMING = ("images_per_sec", "epoch_seconds")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory, write_random_npz) -> str:
    return write_random_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 32 * STEPS_PER_EPOCH)


def command(data: str, out: Path, *extra: str) -> list[str]:
    return train_command(data, out, TINY + list(extra))


def signal_when_logged(cmd: list[str], marker: str, sig: int) -> tuple[int, str]:
    """Run cmd, send ``sig`` as soon as a stderr line contains ``marker``; (exit status, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                proc.send_signal(sig)
                break
        lines += proc.stderr.readlines()
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    return proc.returncode, "".join(lines)


def assert_same_run(ref_dir: Path, run_dir: Path) -> None:
    ref, got = load_checkpoint(ref_dir / CHECKPOINT_NAME), load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert ref["state"] == got["state"] and ref.get("selflabel") == got.get("selflabel")
    for key, tensor in ref["model"].items():
        assert torch.equal(tensor, got["model"][key]), key
    ref_lines = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    got_lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in got_lines] == [r["epoch"] for r in ref_lines]  # no epoch lost or twice
    for a, b in zip(ref_lines, got_lines):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


@pytest.mark.parametrize("stage,sig", [("twist", signal.SIGTERM), ("selflabel", signal.SIGUSR1)])
def test_stop_signal_mid_epoch_checkpoints_exits_143_and_resumes_exactly(stage, sig, tiny_npz, tmp_path):
    extra = ["train.epochs=2"] if stage == "twist" else ["train.epochs=1", "selflabel.epochs=1"]
    marker = " epochs x 40 steps" if stage == "twist" else "self-labeling for 1 epochs"
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "stopped"
    # the uninterrupted reference runs alongside (two cores); its stderr is a pipe, not a terminal
    ref = subprocess.Popen(command(tiny_npz, ref_dir, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env=child_env())
    try:
        rc, err = signal_when_logged(command(tiny_npz, run_dir, *extra), marker, sig)
    finally:
        _, ref_err = ref.communicate(timeout=240)
    assert ref.returncode == 0, ref_err
    assert rc == 143, err
    assert "Traceback" not in err and f"pre-empted: {signal.Signals(sig).name} received" in err.strip().splitlines()[-1]
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    position = ckpt["state"] if stage == "twist" else ckpt["selflabel"]
    assert ckpt.get("stage", "twist") == stage and 0 < position["step_in_epoch"] < STEPS_PER_EPOCH, position  # mid-epoch
    assert read_status(run_dir)["state"] == "preempted" and not (run_dir / LOCK_NAME).exists()

    done = subprocess.run(command(tiny_npz, run_dir, *extra), capture_output=True, text=True, env=child_env(), timeout=240)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert_same_run(ref_dir, run_dir)
    assert read_status(run_dir)["state"] == "done"
    sessions = json.loads((run_dir / "provenance.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0]["pid"] != sessions[1]["pid"]
    final = load_checkpoint(run_dir / CHECKPOINT_NAME)["provenance"]
    assert final == sessions[1] and final["twist"] == twist.__version__ and final["torch"] == str(torch.__version__)
    assert final["command"][1:4] == ["train", tiny_npz, "--out"]

    if stage == "twist":  # the reference's log, written to a pipe: one line per epoch, no progress bar
        assert "\r" not in ref_err and "it/s" not in ref_err
        assert len([x for x in ref_err.splitlines() if x.startswith("twist: epoch=")]) == 2
        # the test's --set overrides of the auto recipe are listed once, on a line of their own
        changed = [x for x in ref_err.splitlines() if "your settings change the recipe" in x]
        assert len(changed) == 1, ref_err
        assert len(ref_err.splitlines()) - len(changed) <= 6, ref_err
        assert not (ref_dir / "tensorboard").exists()  # TensorBoard only when asked for


def _agree_child(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stop = StopSignals()
        first = stop.requested()
        if rank == 1:
            stop.received = signal.SIGTERM  # as if the signal reached rank 1 only
        results[rank] = (first, stop.requested())
    finally:
        dist.destroy_process_group()


def test_a_stop_signal_on_one_rank_stops_every_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_agree_child, args=(port, results), nprocs=2, join=True)
    assert dict(results) == {0: (False, True), 1: (False, True)}


def test_stop_signals_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() and stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------- the run-folder lock
def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_a_second_process_on_a_locked_folder_fails_and_changes_nothing(tiny_npz, tmp_path):
    out = tmp_path / "run"
    cfg = apply_overrides(twist.get_preset("cifar10"), TINY + ["train.epochs=1", "train.eval_every=0"])
    twist.train.train(cfg, tiny_npz, out, progress=False)
    assert not (out / LOCK_NAME).exists()  # released (and removed) at the end
    lock = RunLock(out)
    lock.acquire()  # this test process holds the folder, as a running `twist train` would
    try:
        before = snapshot(out)
        second = subprocess.run(command(tiny_npz, out, "train.epochs=2"), capture_output=True, text=True, env=child_env(),
                                timeout=240)
        after = snapshot(out)
    finally:
        lock.release()
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip().splitlines()
    assert err[-1].startswith("twist: error: run folder") and f"pid {os.getpid()} on {socket.gethostname()}" in err[-1]
    assert "Traceback" not in second.stderr
    assert after == before  # no metrics, config, checkpoint, status or provenance written


def test_a_lock_file_left_by_a_dead_process_does_not_block(tiny_npz, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999 gone-host\n")  # no process holds it: flock died with its owner
    cfg = apply_overrides(twist.get_preset("cifar10"), TINY + ["train.epochs=1", "train.eval_every=0"])
    twist.train.train(cfg, tiny_npz, out, progress=False)
    assert read_status(out)["state"] == "done" and not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------- exit codes and status
def test_interrupt_exits_130_and_records_it(tiny_npz, tmp_path, monkeypatch, capsys):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(twist.train, "load_dataset", interrupted)
    out = tmp_path / "run"
    assert main(["train", tiny_npz, "--out", str(out), *sum((["--set", x] for x in TINY), [])]) == 130
    assert "re-run the same command" in capsys.readouterr().err
    assert read_status(out)["state"] == "interrupted" and not (out / LOCK_NAME).exists()


def test_training_error_exits_1_and_records_failed(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", tiny_npz, "--out", str(out), "--epochs", "1", *sum((["--set", x] for x in TINY), []),
               "--set", "optim.lr=1e30"])  # diverges at once: non-finite loss, stop policy
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.strip().splitlines()[-1].startswith("twist: error: non-finite")
    status = read_status(out)
    assert status["state"] == "failed" and "non-finite" in status["message"]


def test_bad_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--learning-rate", "3"])
    assert exc.value.code == 2 and "twist: error:" in capsys.readouterr().err


def test_version_prints_twist_and_torch(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.startswith(f"twist {twist.__version__}") and f"torch {torch.__version__}" in out


# ---------------------------------------------------------------------- configuration
def test_yaml_config_with_set_overriding_it(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone: small_cnn\noptim:\n  lr: 0.125\ntrain:\n  epochs: 3\n  batch_size: 16\n")
    assert main(["train", "--config", str(path), "--set", "train.epochs=5", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["model"]["backbone"], cfg["optim"]["lr"], cfg["train"]["batch_size"], cfg["train"]["epochs"]) == \
        ("small_cnn", 0.125, 16, 5)
    path.write_text("train:\n  epochs: [3\n")
    assert main(["train", "--config", str(path), "--dry-run"]) == 2
    assert f"--config {path} is not valid YAML" in capsys.readouterr().err
    path.write_text("train:\n  epoch: 3\n")
    assert main(["train", "--config", str(path), "--dry-run"]) == 2
    assert "did you mean 'train.epochs'?" in capsys.readouterr().err


@pytest.mark.parametrize("key,nearest", [("optim.lrr", "'optim.lr'"), ("train.epoch", "'train.epochs'"),
                                         ("optim.batch_size", "'train.batch_size'"),
                                         ("optim.epochs", "'selflabel.epochs' or 'train.epochs'"),
                                         ("augment.num_locals", "'augment.num_local'")])
def test_unknown_key_suggests_the_nearest(key, nearest):
    with pytest.raises(ConfigError, match=f"did you mean {nearest}[?]"):
        apply_overrides(TwistConfig(), [f"{key}=1"])


def test_list_keys_prints_every_key_with_its_help(capsys):
    assert main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split("=", 1)[0] for x in lines] == valid_keys()
    help_text = field_help()
    assert all(help_text[k] for k in valid_keys())  # every field has its docstring
    assert "optim.lr=0.5  # Base learning rate for a batch of 256" in lines[valid_keys().index("optim.lr")]


def test_logging_rank_0_informs_other_ranks_warn_only(capsys):
    import logging

    from twist.logs import configure_logging

    log = logging.getLogger("twist.train")
    try:
        for rank, verbosity in ((0, 0), (0, -1), (3, 0), (0, 1)):
            configure_logging(verbosity, rank=rank)
            log.debug("d")
            log.info("i")
            log.warning("w")
            err = capsys.readouterr().err.splitlines()
            prefix = "twist: " if rank == 0 else f"twist (rank {rank}): "
            expected = {(0, 0): ["i", "warning: w"], (0, -1): ["warning: w"], (3, 0): ["warning: w"],
                        (0, 1): ["d", "i", "warning: w"]}[(rank, verbosity)]
            assert err == [prefix + x for x in expected]
    finally:
        configure_logging(0, rank=0)
