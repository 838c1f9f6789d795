"""Import of the authors' release checkpoints (METHOD.md section 10) and the refusal of pickles
that would run code (issues 7.5 and 8.4).

Release files are built here in the release's exact layout with ``torch.save``: modules named
``backbone`` and ``projection_heads`` (new head names, or the old ``cls_heads.0.{0,1}``), an
``argparse.Namespace`` as ``args``, optimiser and scaler state, ``epoch``; EMA runs add
``teacher`` and ``teacher_backbone``. Heads are small (H=256, C=64) but the ResNet-50 trunk is
real; the ViT is a timm VisionTransformer of depth 2 and width 64, registered as twist's
``vit_small`` for the test.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from twist.checkpoint import CheckpointError, load_checkpoint
from twist.cli import main
from twist.release import import_release, infer_backbone, read_release_file
from twist.serving import load_trained

H, C = 256, 64


class ReleaseHead(nn.Module):
    """The release's projection head layout; ``old_names`` uses the older ``cls_heads.0`` nesting."""

    def __init__(self, dim: int, hidden: int, classes: int, act: type[nn.Module] = nn.ReLU, old_names: bool = False):
        super().__init__()
        self.projection_head = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), act(), nn.Dropout(0.0),
                                             nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), act())
        last, norm = nn.Linear(hidden, classes), nn.BatchNorm1d(classes, affine=False)
        self.old_names = old_names
        if old_names:
            self.cls_heads = nn.ModuleList([nn.Sequential(last, norm)])
        else:
            self.last_linear, self.norm = last, norm

    def forward(self, x):
        x = self.projection_head(x)
        return self.cls_heads[0](x) if self.old_names else self.norm(self.last_linear(x))


class ReleaseNet(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, **head_kw):
        super().__init__()
        self.backbone = backbone
        self.projection_heads = ReleaseHead(dim, H, C, **head_kw)

    def forward(self, x):
        return self.projection_heads(self.backbone(x))


def _randomise(net: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine values, so eval-mode outputs test every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1234)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return net.eval()


def _release_args(**kw) -> argparse.Namespace:
    """args as the release saves them (lr already scaled by batch x world / 256)."""
    base = dict(backbone="resnet50", dim=C, hid_dim=H, act="relu", lam1=0.0, lam2=1.0, tau=1.0, EPS=1e-5,
                aug="multicrop", local_crops_number=12, min1=0.4, max1=1.0, min2=0.05, max2=0.4, optim="lars",
                lr=0.5 * 128 * 16 / 256, lr_sl=0.05 * 128 * 16 / 256, batch_size=128, world_size=16, epochs=850,
                mme_epochs=800, weight_decay=1.5e-6, weight_decay_end=1.5e-6, warmup_epochs=10, img_size=224,
                use_momentum_encoder=0, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.14),
                quantile=0.5, quantile_end=0.6, gpu=0, rank=0, distributed=True, dist_url="env://",
                output_dir="/nothing/out")
    base.update(kw)
    return argparse.Namespace(**base)


def _optimizer_state(net: nn.Module) -> dict:
    """A real optimiser state dict with momentum buffers (one step on zero gradients)."""
    params = list(net.parameters())
    opt = torch.optim.SGD([{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None
    return opt.state_dict()


def _save_release(path, net: ReleaseNet, args, *, teacher: ReleaseNet | None = None, optimizer: bool = True):
    ckpt = {"model": net.state_dict(), "backbone": net.backbone.state_dict(), "epoch": 799, "args": args,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 17}}
    if optimizer:
        ckpt["optimizer"] = _optimizer_state(net)
    if teacher is not None:
        ckpt["teacher"] = teacher.state_dict()
        ckpt["teacher_backbone"] = teacher.backbone.state_dict()
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def rn50() -> ReleaseNet:
    torch.manual_seed(0)
    trunk = torchvision.models.resnet50()
    trunk.fc = nn.Identity()
    return _randomise(ReleaseNet(trunk, 2048), 1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def _imported_logits(run_dir, x: torch.Tensor) -> torch.Tensor:
    trained = load_trained(run_dir, device="cpu")
    return trained.model.logits(x)


# ---------------------------------------------------------------------- ResNet-50
def test_full_resnet50_import_matches_release_outputs(tmp_path, rn50, images, capsys):
    src = _save_release(tmp_path / "checkpoint.pth", rn50, _release_args())
    assert main(["import", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "resnet50" in capsys.readouterr().out
    model = load_trained(tmp_path / "run", device="cpu").model
    with torch.no_grad():
        features, expected = model.features(images), rn50.backbone(images)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.head(features), rn50.projection_heads(expected), atol=1e-5, rtol=0)

    ckpt = load_checkpoint(tmp_path / "run")  # a plain twist checkpoint: loads with weights_only
    cfg = ckpt["config"]
    assert cfg["model"]["backbone"] == "resnet50" and not cfg["model"]["cifar_stem"]
    assert (cfg["model"]["num_classes"], cfg["model"]["hidden_dim"]) == (C, H)
    assert cfg["optim"]["name"] == "lars" and cfg["optim"]["lr"] == pytest.approx(0.5)  # unscaled per-256 lr
    assert cfg["selflabel"]["lr"] == pytest.approx(0.05)
    assert (cfg["train"]["epochs"], cfg["selflabel"]["epochs"]) == (800, 50)
    assert cfg["augment"]["num_local"] == 12 and tuple(cfg["augment"]["global_scale"]) == (0.4, 1.0)
    assert ckpt["optimizer"] is None and ckpt["state"] == {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    assert ckpt["import"]["release_epochs"] == 800 and ckpt["import"]["args"]["backbone"] == "resnet50"
    assert (tmp_path / "run" / "config.json").is_file()
    # the run folder is not overwritten by a second import
    with pytest.raises(CheckpointError, match="already exists"):
        import_release(src, tmp_path / "run")


def test_backbone_only_resnet50_file(tmp_path, rn50, images):
    # torchvision names: the file loads into resnet50 with only fc missing
    torch.save(rn50.backbone.state_dict(), tmp_path / "backbone.pth")
    result = import_release(tmp_path / "backbone.pth", tmp_path / "bb_run", arch="resnet50", num_classes=10)
    assert result.kind == "backbone" and result.config.model.num_classes == 10
    trained = load_trained(tmp_path / "bb_run", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(trained.model.features(images), rn50.backbone(images), atol=1e-5, rtol=0)
        assert trained.model.logits(images).shape == (3, 10)
    assert trained.checkpoint["import"]["head"] == "fresh"
    with pytest.raises(CheckpointError, match="resnet50w2"):
        import_release(tmp_path / "backbone.pth", tmp_path / "x", arch="resnet50w2")


def test_old_head_names(tmp_path, images):
    """Older files name the last linear and the NBS projection_heads.cls_heads.0.{0,1}."""
    torch.manual_seed(1)
    trunk = torchvision.models.resnet18()
    trunk.fc = nn.Identity()
    old = _randomise(ReleaseNet(trunk, 512, old_names=True), 2)
    assert "projection_heads.cls_heads.0.1.running_var" in old.state_dict()
    src = _save_release(tmp_path / "old.pth", old, _release_args(backbone="resnet18"))
    import_release(src, tmp_path / "old_run")
    with torch.no_grad():
        torch.testing.assert_close(_imported_logits(tmp_path / "old_run", images), old(images), atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="C=64"):
        import_release(src, tmp_path / "y", num_classes=10)


def test_safetensors_backbone_with_classifier(tmp_path, images):
    """A torchvision state dict with its fc, as safetensors: fc dropped, features kept."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    net = _randomise(torchvision.models.resnet18(), 3)
    save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
    result = import_release(tmp_path / "r18.safetensors", tmp_path / "run", num_classes=5)
    assert any("fc.weight" in note for note in result.notes)
    net.fc = nn.Identity()
    with torch.no_grad():
        features = load_trained(tmp_path / "run", device="cpu").model.features(images)
        torch.testing.assert_close(features, net(images), atol=1e-5, rtol=0)


def test_architecture_inferred_from_shapes():
    from twist.backbones import resnet50w2

    w2 = resnet50w2().state_dict()
    info = infer_backbone({k: v for k, v in w2.items() if not k.startswith("fc.")})
    assert (info.name, info.feature_dim, info.in_channels, info.cifar_stem) == ("resnet50w2", 4096, 3, False)
    r18 = torchvision.models.resnet18()
    r18.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    info = infer_backbone(r18.state_dict())
    assert (info.name, info.feature_dim, info.in_channels, info.cifar_stem) == ("resnet18", 512, 1, True)
    with pytest.raises(CheckpointError, match="unrecognised"):
        infer_backbone({"foo.weight": torch.zeros(2)})


# ---------------------------------------------------------------------- ViT (tiny, EMA run)
@pytest.fixture()
def tiny_vit(monkeypatch):
    """twist's vit_small made tiny (width 64, depth 2, 1 head) for the duration of a test."""
    import twist.vit

    monkeypatch.setitem(twist.vit.VIT_ARCHS, "vit_small", (64, 2, 1))
    from timm.models.vision_transformer import VisionTransformer

    def make(seed: int) -> ReleaseNet:
        torch.manual_seed(seed)
        vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=1, qkv_bias=True,
                                num_classes=0)
        return _randomise(ReleaseNet(vit, 64, act=nn.GELU), seed)

    return make


def test_vit_full_file_with_teacher(tmp_path, tiny_vit, capsys):
    student, teacher = tiny_vit(3), tiny_vit(4)
    args = _release_args(backbone="vit_s", act="gelu", optim="admw", lam1=-0.6, use_momentum_encoder=1,
                         momentum_start=0.996, clip_norm=3.0, drop_path=0.1, local_crops_number=6, epochs=300,
                         mme_epochs=300, batch_size=64, world_size=16, lr=3e-4 * 1024 / 256)
    src = _save_release(tmp_path / "vit.pth", student, args, teacher=teacher)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(9))

    assert main(["import", str(src), "--out", str(tmp_path / "run"), "--arch", "vit_small"]) == 0
    ckpt = load_checkpoint(tmp_path / "run")
    cfg = ckpt["config"]
    assert cfg["model"]["backbone"] == "vit_small" and cfg["model"]["activation"] == "gelu"
    assert cfg["model"]["patch_size"] == 16 and cfg["ema"]["enabled"] is True
    assert cfg["loss"]["alpha"] == pytest.approx(0.4) and cfg["optim"]["name"] == "adamw"
    assert cfg["optim"]["lr"] == pytest.approx(3e-4) and cfg["augment"]["num_local"] == 6
    assert ckpt["teacher"] is not None
    with torch.no_grad():
        torch.testing.assert_close(_imported_logits(tmp_path / "run", x), student(x), atol=1e-5, rtol=0)

    assert main(["import", str(src), "--out", str(tmp_path / "teacher_run"), "--use-teacher"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(_imported_logits(tmp_path / "teacher_run", x), teacher(x), atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["import", str(src), "--out", str(tmp_path / "r"), "--arch", "resnet50"]) == 2
    assert "vit_small" in capsys.readouterr().err


# ---------------------------------------------------------------------- continuing training
def test_imported_run_trains_on_and_evaluates(tmp_path, capsys):
    torch.manual_seed(0)
    trunk = torchvision.models.resnet18()
    trunk.fc = nn.Identity()
    net = _randomise(ReleaseNet(trunk, 512), 7)
    src = _save_release(tmp_path / "r18.pth", net, _release_args(backbone="resnet18", epochs=3, mme_epochs=3))
    run = tmp_path / "run"
    assert main(["import", str(src), "--out", str(run)]) == 0
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), y=np.arange(32) % 4)
    data = str(tmp_path / "data.npz")

    # `twist train DATA --out RUN` trains on with the run folder's config and a fresh optimiser
    code = main(["train", data, "--out", str(run), "--epochs", "1", "--no-progress",
                 "--set", "train.batch_size=16", "--set", "augment.global_size=32", "--set", "train.image_size=32",
                 "--set", "augment.num_local=0", "--set", "train.device=cpu", "--set", "train.precision=fp32",
                 "--set", "selflabel.epochs=0", "--set", "train.eval_every=0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "fresh optimiser" in err
    ckpt = load_checkpoint(run)
    assert ckpt["optimizer"] is not None and ckpt["state"]["epoch"] == 1
    assert ckpt["config"]["model"]["backbone"] == "resnet18" and ckpt["config"]["model"]["num_classes"] == C
    moved = ckpt["model"]["head.last_linear.weight"] - net.projection_heads.last_linear.weight
    assert moved.abs().max() > 0  # it trained from the imported weights
    assert main(["eval", str(run), data, "--json", "--batch-size", "16"]) == 0
    assert '"acc"' in capsys.readouterr().out


# ---------------------------------------------------------------------- untrusted files (issue 8.4)
class _WritesMarker:
    """Unpickling this runs code (os.system): the payload a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"echo pwned > '{self.marker}'",)


class _ExecMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _malicious_files(tmp_path):
    """Crafted files: payload beside the weights, hidden in the args Namespace, and at the top."""
    marker = tmp_path / "MARKER"
    w = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}
    files = {
        "beside": {"model": w, "args": _release_args(), "epoch": 1, "extra": _WritesMarker(marker)},
        "in_namespace": {"model": w, "args": _release_args(note=_ExecMarker(marker)), "epoch": 1},
        "top": _WritesMarker(marker),
    }
    paths = []
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        paths.append(tmp_path / f"{name}.pth")
    return marker, paths


def test_crafted_pickles_are_refused_and_never_run(tmp_path, capsys):
    marker, paths = _malicious_files(tmp_path)
    for path in paths:
        with pytest.raises(CheckpointError) as info:
            read_release_file(path)
        message = str(info.value)
        assert "--trust-pickle" in message and "execute code" in message
        with pytest.raises(CheckpointError, match="--trust-pickle"):
            import_release(path, tmp_path / "run")
        with pytest.raises(CheckpointError, match="--trust-pickle"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="--trust-pickle"):
            load_trained(path, device="cpu")
        assert main(["import", str(path), "--out", str(tmp_path / "run")]) == 2
        assert main(["eval", str(path), "digits"]) == 2
        assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "x.st")]) == 2
        err = capsys.readouterr().err
        assert err.count("twist: error:") == 3 and "--trust-pickle" in err and "Traceback" not in err
        assert not marker.exists()
    # the error names what the file would have called
    with pytest.raises(CheckpointError, match="system"):
        read_release_file(paths[0])
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.st").exists()
    assert not marker.exists()


def test_crafted_pickle_payload_is_real(tmp_path):
    """Control: with the explicit opt-in the same file does run its payload (it only writes the
    marker), so the refusal above is what keeps the marker from being written."""
    marker, paths = _malicious_files(tmp_path)
    read_release_file(paths[0], trust_pickle=True)
    assert marker.exists()


def test_namespace_is_the_only_extra_class_allowed(tmp_path):
    """The safe reader gives the args back as a plain dict, and refuses any other class."""
    torch.save({"model": {"a": torch.ones(1)}, "args": _release_args()}, tmp_path / "ok.pth")
    obj = read_release_file(tmp_path / "ok.pth")
    assert type(obj["args"]) is dict and obj["args"]["dim"] == C and obj["args"]["global_crops_scale"] == (0.4, 1.0)
    # the generic loader (eval, predict, export) refuses it but points at `twist import`
    with pytest.raises(CheckpointError, match="twist import"):
        load_checkpoint(tmp_path / "ok.pth")
    torch.save({"args": _release_args(), "when": __import__("datetime").date(2021, 12, 1)}, tmp_path / "date.pth")
    with pytest.raises(CheckpointError, match="datetime.date"):
        read_release_file(tmp_path / "date.pth")
    # after a refused load, Namespace is not left in torch's global allowlist
    with pytest.raises(Exception):
        torch.load(tmp_path / "ok.pth", weights_only=True)
