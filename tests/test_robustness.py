"""Robustness of ``twist train`` end to end: bad image files, bad configuration and environment,
non-finite steps, crafted checkpoints. See docs/robustness.md for the policies tested here.

The bad-image runs are real ``twist train`` subprocesses on a folder this file builds; what they
must skip is computed here from what was created, never read back from twist's own output.
Everything else calls ``twist.cli.main`` in-process (faster) and checks the exit status and the
one ``twist: error:`` line on stderr.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import twist.stage
import twist.train
from twist.checkpoint import CHECKPOINT_NAME, load_checkpoint
from twist.cli import main
from twist.config import apply_overrides
from twist.presets import get_preset
from twist.model import build_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py

TINY = ["model.backbone=small_cnn", "model.small_cnn_width=4", "model.hidden_dim=32", "model.num_classes=4",
        "train.batch_size=8", "train.image_size=8", "augment.global_size=8", "augment.local_size=4",
        "train.precision=fp32", "train.eval_every=0"]


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def shown(name: str) -> str:
    """How a file name appears in twist's lists: undecodable bytes as \\xNN (computed here)."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


# ====================================================================== bad image files
def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that only claims width x height (IHDR, empty IDAT, IEND): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


GOOD_TOTAL = 31  # usable images; the one truncated JPEG that passes the header scan makes 32 = 4 batches of 8


def build_bad_folder(root: Path) -> tuple[set[str], int]:
    """Every kind of bad entry beside odd-but-usable images; returns (bad names, usable count)."""
    root.mkdir()

    def write(name: str | bytes, data: bytes) -> None:
        path = os.path.join(os.fsencode(root), name) if isinstance(name, bytes) else root / name
        with open(path, "wb") as f:
            f.write(data)

    bad: set[str] = set()
    # --- odd but usable: converted, never skipped
    write("cmyk.jpg", encode(noise(20, 20, 1).convert("CMYK"), "JPEG"))
    write("palette.png", encode(noise(16, 16, 2).quantize(16), "PNG"))
    pal = noise(16, 16, 3).quantize(8)
    write("palette_transparent.png", encode(pal, "PNG", transparency=0))
    write("gray16.png", encode(Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 257), "PNG"))
    rgba = noise(16, 16, 4).convert("RGBA")
    rgba.putalpha(128)
    write("rgba.png", encode(rgba, "PNG"))
    write("gray_alpha.png", encode(noise(16, 16, 5).convert("LA"), "PNG"))
    write("gray.jpg", encode(noise(16, 16, 6).convert("L"), "JPEG"))
    write("one_pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    write("large.png", encode(Image.new("RGB", (3000, 2000), (10, 200, 10)), "PNG"))  # 6 Mpx: fine
    write("wide.bmp", encode(noise(40, 10, 7), "BMP"))
    write(b"caf\xe9.png", encode(noise(16, 16, 8), "PNG"))  # non-UTF-8 name, valid image
    write("locked.png", encode(noise(16, 16, 9), "PNG"))
    os.chmod(root / "locked.png", 0)
    try:
        with open(root / "locked.png", "rb"):
            usable = 12  # running as root: permissions do not stop reading, so it is a good image
    except PermissionError:
        usable = 11
        bad.add("locked.png")
    for i in range(GOOD_TOTAL - usable):
        write(f"good_{i:02d}.{'png' if i % 2 else 'jpg'}", encode(noise(24, 24, 100 + i), "PNG" if i % 2 else "JPEG"))
    # --- bad: each one is skipped and listed (or stops the run under bad_files=stop)
    png = encode(noise(32, 32, 10), "PNG")
    jpg = encode(noise(32, 32, 11), "JPEG", quality=90)
    corrupt = bytearray(png)
    start = corrupt.index(b"IDAT") + 8
    corrupt[start:start + 40] = bytes(b ^ 0xFF for b in corrupt[start:start + 40])
    for name, data in {
        "zero.png": b"",
        "text.jpg": b"just some text, not a JPEG\n",
        "corrupt.png": bytes(corrupt),
        "trunc.png": png[: len(png) // 2],
        "trunc.jpg": jpg[: len(jpg) // 2],
        "bomb.png": huge_png_header(100_000, 100_000),
    }.items():
        write(name, data)
        bad.add(name)
    write(b"bad\xff.png", bytes(range(256)))
    bad.add(os.fsdecode(b"bad\xff.png"))
    os.symlink("missing.png", root / "dangling.png")
    os.symlink("selfloop.jpg", root / "selfloop.jpg")
    os.symlink(".", root / "loop")  # a folder link to its own parent
    bad |= {"dangling.png", "selfloop.jpg", "loop"}
    return bad, GOOD_TOTAL


def twist_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "twist", "train", str(data), "--out", str(out), "--epochs", "1", "--no-progress",
            *sets(TINY), *extra]


def read_skipped(out: Path) -> dict[str, str]:
    lines = (out / "skipped_files.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path\treason"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 2 for r in rows), rows
    return {os.path.basename(p): reason for p, reason in rows}


def test_bad_image_files_end_to_end(tmp_path):
    data = tmp_path / "images"
    try:
        bad, usable = build_bad_folder(data)
    except (OSError, UnicodeError) as exc:  # pragma: no cover - a file system refusing such names
        pytest.skip(f"file system refuses a test file: {exc}")
    expected = {shown(n) for n in bad}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "memory": subprocess.Popen(twist_cmd(data, tmp_path / "memory"), env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "streamed": subprocess.Popen(twist_cmd(data, tmp_path / "streamed", "--set", "train.max_memory_gb=1e-9"),
                                     env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "stop": subprocess.Popen(twist_cmd(data, tmp_path / "stop", "--set", "train.bad_files=stop"), env=env,
                                 text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    }
    outputs = {k: p.communicate(timeout=150) for k, p in runs.items()}
    done = {k: (runs[k].returncode, *outputs[k]) for k in runs}
    try:
        # skip (the default): exit 0, every bad file listed by name in the run folder, the odd ones used
        for mode in ("memory", "streamed"):
            rc, _, err = done[mode]
            assert rc == 0 and "Traceback" not in err, err
            skipped = read_skipped(tmp_path / mode)
            assert set(skipped) == expected, (mode, sorted(skipped))
            assert (tmp_path / mode / CHECKPOINT_NAME).is_file()
        # in memory every file is decoded before training: exactly the usable ones are trained on
        assert f"twist: {usable} images, 3x8x8" in done["memory"][2]
        assert "truncated" in read_skipped(tmp_path / "memory")["trunc.jpg"]
        # streamed, the truncated JPEG passes the header scan and fails in its batch: replaced, listed
        assert "during training" in read_skipped(tmp_path / "streamed")["trunc.jpg"]
        # stop: one line naming the first bad file (sorted path order), no traceback, no checkpoint
        rc, _, err = done["stop"]
        assert rc == 2, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("twist: error:")]
        assert len(errors) == 1 and errors == [err.strip().splitlines()[-1]], err
        first = min(bad)
        assert shown(first) in errors[0] and "bad_files" in errors[0], (first, errors[0])
        assert f"{len(bad) - 1} other bad file" in errors[0]
        assert not [p for p in (tmp_path / "stop").iterdir() if p.name.startswith(CHECKPOINT_NAME) or
                    CHECKPOINT_NAME in p.name]
    finally:
        os.chmod(data / "locked.png", 0o644)


# ====================================================================== configuration and environment
@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8))
    return path


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    return rc, capsys.readouterr().err


def assert_user_error(rc: int, err: str, *names: str, status: int = 2) -> str:
    """One 'twist: error:' line naming ``names``, no traceback, exit ``status`` (2: usage or data
    error; 1: training failed, a TrainingError)."""
    assert rc == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("twist: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


CONFIG_ERRORS = {
    "unknown key": (["--set", "train.no_such_key=1"], "train.no_such_key"),
    "unknown group": (["--set", "nogroup.lr=1"], "nogroup.lr"),
    "no equals sign": (["--set", "train.epochs"], "--set"),
    "wrong type int": (["--set", "train.batch_size=many"], "train.batch_size"),
    "wrong type float": (["--set", "optim.lr=fast"], "optim.lr"),
    "wrong type bool": (["--set", "train.channels_last=maybe"], "train.channels_last"),
    "non-finite float": (["--set", "optim.lr=nan"], "optim.lr"),
    "batch too small for batch norm": (["--set", "train.batch_size=1"], "train.batch_size"),
    "C < 2": (["--set", "model.num_classes=1"], "model.num_classes"),
    "crops larger than images": (["--set", "train.image_size=8", "--set", "augment.global_size=16"], "train.image_size"),
    "local crops larger than images": (["--set", "augment.num_local=2", "--set", "augment.local_size=32"],
                                       "augment.local_size"),
    "bad policy": (["--set", "train.nonfinite=ignore"], "train.nonfinite"),
    "no skipped step allowed": (["--set", "train.max_skipped_in_a_row=0"], "train.max_skipped_in_a_row"),
    "negative checkpoint interval": (["--set", "train.checkpoint_every_steps=-1"], "train.checkpoint_every_steps"),
    "zero epochs": (["--epochs", "0"], "train.epochs"),
    "epochs not a number": (["--epochs", "ten"], "--epochs"),
    "unknown preset": (["--preset", "imagenet-tiny"], "--preset"),
    "unknown option": (["--learning-rate", "3"], "--learning-rate"),
    "missing --config": (["--config", "no/such/config.json"], "no/such/config.json"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_configuration_is_one_line_exit_2(case, tiny_npz, tmp_path, capsys):
    extra, name = CONFIG_ERRORS[case]
    out = tmp_path / "run"
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), "--no-progress", *sets(TINY), *extra])
    assert_user_error(rc, err, name)
    assert not (out / CHECKPOINT_NAME).exists()


def test_config_json_that_is_not_json(tiny_npz, tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{"train": {"epochs": 3')  # cut short
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--config", str(bad), "--out", str(tmp_path / "r")])
    assert_user_error(rc, err, str(bad))
    bad.write_text(json.dumps({"train": {"epochs": 3, "warp_speed": 9}}))
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--config", str(bad), "--out", str(tmp_path / "r")])
    assert_user_error(rc, err, "train.warp_speed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("item,name", [("train.device=cuda", "train.device"), ("train.precision=fp16", "fp16")])
def test_gpu_settings_without_a_gpu(item, name, tiny_npz, tmp_path, capsys):
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(tmp_path / "r"), *sets(TINY), "--set", item])
    assert_user_error(rc, err, name)


def test_missing_dataset_and_batch_larger_than_dataset(tiny_npz, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dataset"
    rc, err = run_cli(capsys, ["train", str(missing), "--out", str(tmp_path / "r1"), *sets(TINY)])
    assert_user_error(rc, err, str(missing))
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(tmp_path / "r2"), *sets(TINY),
                               "--set", "train.batch_size=64"])
    assert_user_error(rc, err, "train.batch_size", "32 images")


def test_unwritable_output_folder(tiny_npz, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "run"):  # the output is a file, or below one
        rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), *sets(TINY)])
        assert_user_error(rc, err, str(out), "not writable", status=1)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            return  # root ignores permissions; the cases above cover it
        rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(locked / "run"), *sets(TINY)])
        assert_user_error(rc, err, str(locked / "run"), "not writable", status=1)
    finally:
        locked.chmod(0o700)


def test_full_disk_is_found_before_training(tiny_npz, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(twist.stage.os, "fsync", full)
    loaded = []
    monkeypatch.setattr(twist.train, "load_dataset", lambda *a, **k: loaded.append(1))
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(tmp_path / "r"), *sets(TINY)])
    assert_user_error(rc, err, str(tmp_path / "r"), "No space left", status=1)
    assert not loaded and not [p.name for p in (tmp_path / "r").iterdir()]  # the probe is cleaned up


def test_checkpoint_write_failure_stops_with_the_previous_checkpoint_intact(tiny_npz, tmp_path, capsys, monkeypatch):
    real_save, saved = twist.stage.save_checkpoint, []

    def save_then_fill_disk(payload, path):
        if saved:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(payload, path)
        saved.append(Path(path).read_bytes())

    monkeypatch.setattr(twist.stage, "save_checkpoint", save_then_fill_disk)
    out = tmp_path / "r"
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), "--epochs", "1", *sets(TINY),
                               "--set", "train.checkpoint_every_steps=1"])
    assert_user_error(rc, err, "cannot write checkpoint", "No space left", "intact", status=1)
    assert (out / CHECKPOINT_NAME).read_bytes() == saved[0]


# ====================================================================== non-finite steps
def poison_step(monkeypatch, at: int, seen: dict) -> None:
    """Make optimiser step ``at`` (1-based) see NaN images: NaN loss, gradients and BN statistics."""
    real_step = twist.train.train_step

    def step(model, criterion, optimizer, views, **kw):
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == at:
            seen["checkpoint_before"] = seen["path"].read_bytes() if seen["path"].exists() else None
            views = [torch.full_like(v, float("nan")) for v in views]
        return real_step(model, criterion, optimizer, views, **kw)

    monkeypatch.setattr(twist.train, "train_step", step)


def test_nonfinite_stop_names_the_step_and_keeps_the_last_checkpoint(tiny_npz, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    seen = {"path": out / CHECKPOINT_NAME}
    poison_step(monkeypatch, 3, seen)
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), "--epochs", "2", *sets(TINY),
                               "--set", "train.checkpoint_every_steps=2"])
    line = assert_user_error(rc, err, "non-finite", "optimiser step 3", "epoch 1", "intact", "train.nonfinite=skip", status=1)
    assert seen["checkpoint_before"] is not None
    assert (out / CHECKPOINT_NAME).read_bytes() == seen["checkpoint_before"]  # byte-identical
    assert load_checkpoint(out / CHECKPOINT_NAME)["state"]["global_step"] == 2
    assert not (out / "metrics.jsonl").exists(), line


def test_nonfinite_stop_on_the_first_step_writes_no_checkpoint(tiny_npz, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    poison_step(monkeypatch, 1, {"path": out / CHECKPOINT_NAME})
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), "--epochs", "1", *sets(TINY)])
    assert_user_error(rc, err, "optimiser step 1", "no checkpoint was written", status=1)
    assert not (out / CHECKPOINT_NAME).exists()


def test_nonfinite_skip_skips_the_step_and_keeps_the_model_finite(tiny_npz, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    poison_step(monkeypatch, 2, {"path": out / CHECKPOINT_NAME})
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), "--epochs", "1", *sets(TINY),
                               "--set", "train.nonfinite=skip"])
    assert rc == 0, err
    assert "optimiser step 2" in err and "step skipped" in err
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_steps"] == 1 and np.isfinite(record["loss"])
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["state"]["global_step"] == 4
    for key, tensor in ckpt["model"].items():  # BatchNorm statistics of the NaN forward were undone
        assert torch.isfinite(tensor.float()).all(), key


def test_nonfinite_skip_stops_after_too_many_skipped_steps_in_a_row(tiny_npz, tmp_path, capsys, monkeypatch):
    """A diverged run (every step from the second on non-finite) stops at
    train.max_skipped_in_a_row instead of skipping its whole budget; the checkpoint of the
    last finished epoch stays as it was."""
    out = tmp_path / "r"
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), "--epochs", "1", *sets(TINY)])
    assert rc == 0, err
    saved = (out / CHECKPOINT_NAME).read_bytes()
    real_step = twist.train.train_step
    calls = {"n": 0}

    def step(model, criterion, optimizer, views, **kw):
        calls["n"] += 1
        if calls["n"] >= 2:
            views = [torch.full_like(v, float("nan")) for v in views]
        return real_step(model, criterion, optimizer, views, **kw)

    monkeypatch.setattr(twist.train, "train_step", step)
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), "--epochs", "3", *sets(TINY),
                               "--set", "train.nonfinite=skip", "--set", "train.max_skipped_in_a_row=3"])
    assert_user_error(rc, err, "3 steps in a row", "train.max_skipped_in_a_row=3", "diverged", "intact", status=1)
    assert calls["n"] == 4  # one finite step, then three skipped ones
    assert (out / CHECKPOINT_NAME).read_bytes() == saved


def test_uniform_collapse_is_recognised_from_the_epoch_terms():
    """Figures of real CIFAR-10 epochs (docs/results.md): the alpha 0.5 run at epoch 2
    (collapsed) and epoch 1 (not yet), and the preset's first epoch."""
    from twist.train import predictions_collapsed

    assert predictions_collapsed({"consistency": 0.0001, "sharpness": 2.3024}, 10)
    assert not predictions_collapsed({"consistency": 0.0613, "sharpness": 2.2696}, 10)
    assert not predictions_collapsed({"consistency": 0.2822, "sharpness": 2.0435}, 10)
    assert not predictions_collapsed({"consistency": 0.0001, "sharpness": 2.3024}, 100)  # far from ln 100


def test_a_collapsed_run_warns_once_and_names_the_options(tiny_npz, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(twist.train, "predictions_collapsed", lambda record, c: True)
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(tmp_path / "r"), "--epochs", "2", *sets(TINY)])
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "collapsed" in line]
    assert len(warnings) == 1 and "loss.alpha >= loss.beta" in warnings[0] and "optim.lr" in warnings[0]


# ====================================================================== crafted checkpoints
class _Payload:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def crafted_checkpoints(tmp_path: Path) -> dict[str, bytes]:
    cfg = apply_overrides(get_preset("cifar10"), TINY)
    state = {"epoch": 1, "step_in_epoch": 0, "global_step": 4}
    other = apply_overrides(get_preset("cifar10"), TINY + ["model.hidden_dim=16"])
    buf = io.BytesIO()
    torch.save({"model": build_model(cfg.model, in_channels=1).state_dict(), "state": state, "optimizer": {}}, buf)
    whole = buf.getvalue()
    files = {"truncated": whole[: len(whole) // 2], "empty": b"", "text": b"not a checkpoint\n"}
    for name, obj in {
        "code": {"model": _Payload(tmp_path / "pwned"), "state": state},
        "not a dict": [1, 2, 3],
        "no model": {"state": state},
        "bad state": {"model": {}, "state": {"epoch": "one"}},
        "other model": {"model": build_model(other.model, in_channels=1).state_dict(), "state": state},
    }.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        files[name] = buf.getvalue()
    return files


def test_crafted_checkpoint_in_the_run_folder_is_refused(tiny_npz, tmp_path, capsys):
    for name, data in crafted_checkpoints(tmp_path).items():
        out = tmp_path / name.replace(" ", "_")
        out.mkdir()
        (out / CHECKPOINT_NAME).write_bytes(data)
        rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(out), "--epochs", "1", *sets(TINY)])
        line = assert_user_error(rc, err, "cannot resume from", str(out / CHECKPOINT_NAME))
        assert (out / CHECKPOINT_NAME).read_bytes() == data, name  # left as it was
        assert not (out / "metrics.jsonl").exists(), name
        if name == "other model":
            assert "does not match" in line
    assert not (tmp_path / "pwned").exists()  # nothing in any file was executed


def test_grayscale_data_under_the_colour_preset_gets_a_hint(tiny_npz, tmp_path, capsys):
    """`--preset cifar10` on grayscale images says that the mnist preset suits them (measured
    0.98 vs 0.857 on MNIST), and trains anyway; without --preset the grey 8 px images get the
    digits recipe (twist.autopreset) and no hint."""
    from twist.train import preset_hint

    assert "--preset mnist" in preset_hint(get_preset("cifar10"), 1)
    assert preset_hint(get_preset("cifar10"), 3) is None
    assert preset_hint(get_preset("mnist"), 1) is None
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(tmp_path / "r"), "--epochs", "1",
                               "--preset", "cifar10", *sets(TINY)])
    assert rc == 0, err
    assert sum("--preset mnist" in line for line in err.splitlines()) == 1
    rc, err = run_cli(capsys, ["train", str(tiny_npz), "--out", str(tmp_path / "auto"), "--epochs", "1", *sets(TINY)])
    assert rc == 0, err
    assert "auto preset 'digits'" in err and "--preset mnist" not in err
