"""Export of backbones (and heads) to torchvision, timm, safetensors and detectron2 (issues 3.4, 7.6).

Each format is round-tripped: the exported file loads with ``strict=True`` into the named
library's model and gives the same features as the twist model (max abs diff < 1e-5); the
detectron2 pickle is checked name by name against the torchvision -> detectron2 mapping and
for holding nothing but dicts and arrays.
"""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
import torchvision
from torch import nn

from twist.checkpoint import FORMAT, save_checkpoint
from twist.cli import main
from twist.config import TwistConfig
from twist.export import detectron2_name, export_checkpoint
from twist.head import TwistHead
from twist.model import build_model


def _make_checkpoint(path, backbone: str, *, channels: int = 3, cifar_stem: bool = False, seed: int = 0,
                     size: int = 32):
    """A twist checkpoint with random weights and non-trivial BN statistics; returns the model."""
    cfg = TwistConfig()
    cfg.model.backbone, cfg.model.cifar_stem = backbone, cifar_stem
    cfg.model.num_classes, cfg.model.hidden_dim = 12, 32
    cfg.augment.global_size = size
    if backbone.startswith("vit_"):
        cfg.model.activation = "gelu"
    cfg.validate()
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=channels)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    save_checkpoint({"format": FORMAT, "model": model.state_dict(), "teacher": None, "optimizer": None, "scaler": None,
                     "state": {"epoch": 1, "step_in_epoch": 0, "global_step": 1}, "rng_per_rank": {},
                     "config": cfg.to_dict(),
                     "data": {"channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels,
                              "image_size": size, "class_names": None, "source": "test"}}, path)
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def rn50(tmp_path_factory):
    path = tmp_path_factory.mktemp("rn50") / "checkpoint.pt"
    return path, _make_checkpoint(path, "resnet50")


@pytest.fixture(scope="module")
def rn18(tmp_path_factory):
    path = tmp_path_factory.mktemp("rn18") / "checkpoint.pt"
    return path, _make_checkpoint(path, "resnet18", seed=3)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- torchvision
def test_torchvision_resnet50_strict_load_and_same_features(tmp_path, rn50, capsys):
    path, model = rn50
    out = tmp_path / "rn50_torchvision.pt"
    assert main(["export", str(path), "--format", "torchvision", "--out", str(out)]) == 0
    assert "net.fc = torch.nn.Identity()" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    net = torchvision.models.resnet50()
    missing = net.load_state_dict(state, strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys
    net.fc = nn.Identity()  # as documented: strict load into resnet50 minus fc
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert _max_diff(net.eval()(X), model.features(X)) < 1e-5


def test_torchvision_refuses_what_it_cannot_load(tmp_path, capsys):
    _make_checkpoint(tmp_path / "cifar.pt", "resnet18", cifar_stem=True)
    assert main(["export", str(tmp_path / "cifar.pt"), "--format", "torchvision", "--out", str(tmp_path / "a.pt")]) == 2
    assert "CIFAR stem" in capsys.readouterr().err
    _make_checkpoint(tmp_path / "grey.pt", "resnet18", channels=1)
    assert main(["export", str(tmp_path / "grey.pt"), "--format", "detectron2", "--out", str(tmp_path / "b.pkl")]) == 2
    assert "1-channel" in capsys.readouterr().err
    _make_checkpoint(tmp_path / "cnn.pt", "small_cnn", channels=1, size=16)
    assert main(["export", str(tmp_path / "cnn.pt"), "--format", "timm", "--out", str(tmp_path / "c.pt")]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("a.pt", "b.pkl", "c.pt"))


# ---------------------------------------------------------------------- timm
def test_timm_vit_and_resnet_strict_load(tmp_path, rn18, monkeypatch):
    timm = pytest.importorskip("timm")
    import twist.vit

    monkeypatch.setitem(twist.vit.VIT_ARCHS, "vit_small", (64, 2, 1))  # a tiny ViT-S stand-in
    model = _make_checkpoint(tmp_path / "vit.pt", "vit_small", size=224)
    result = export_checkpoint(tmp_path / "vit.pt", "timm", tmp_path / "vit_timm.pt")
    assert "vit_small_patch16_224" in result.usage and result.feature_dim == 64
    net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, embed_dim=64, depth=2, num_heads=1)
    net.load_state_dict(torch.load(result.path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_diff(net.eval()(x), model.features(x)) < 1e-5

    path, r18 = rn18
    export_checkpoint(path, "timm", tmp_path / "r18_timm.pt")
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    net.load_state_dict(torch.load(tmp_path / "r18_timm.pt", weights_only=True), strict=True)
    with torch.no_grad():
        assert _max_diff(net.eval()(X), r18.features(X)) < 1e-5


# ---------------------------------------------------------------------- safetensors (+ head)
def test_safetensors_backbone_and_head(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from twist.backbones import build_backbone
    from twist.config import ModelConfig

    model = _make_checkpoint(tmp_path / "ck.pt", "resnet18", channels=1, cifar_stem=True)
    assert main(["export", str(tmp_path / "ck.pt"), "--format", "safetensors", "--out", str(tmp_path / "bb.safetensors"),
                 "--head-out", str(tmp_path / "head.safetensors")]) == 0
    with safe_open(str(tmp_path / "bb.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet18" and meta["feature_dim"] == "512" and meta["in_channels"] == "1"
    assert json.loads(meta["cifar_stem"]) is True and meta["twist_version"]
    assert json.loads(meta["config"])["model"]["backbone"] == "resnet18"
    net = build_backbone(ModelConfig(backbone="resnet18", cifar_stem=True), in_channels=1)
    net.load_state_dict(load_file(str(tmp_path / "bb.safetensors")), strict=True)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = net.eval()(x)
        assert _max_diff(feats, model.features(x)) < 1e-5

    with safe_open(str(tmp_path / "head.safetensors"), "pt") as f:
        hmeta = {k: json.loads(v) for k, v in f.metadata().items() if k not in ("format", "twist_format")}
    assert hmeta["layers"] == 3
    head = TwistHead(hmeta["feature_dim"], hmeta["hidden_dim"], hmeta["num_classes"], hmeta["activation"], hmeta["nbs"])
    head.load_state_dict(load_file(str(tmp_path / "head.safetensors")), strict=True)
    with torch.no_grad():
        assert _max_diff(head.eval()(feats), model.head(feats)) < 1e-5

    # the head as a torch file
    export_checkpoint(tmp_path / "ck.pt", "safetensors", tmp_path / "bb2.safetensors", head_out=tmp_path / "head.pt")
    saved = torch.load(tmp_path / "head.pt", weights_only=True)
    head2 = TwistHead(**{k: saved["meta"][k] for k in ("hidden_dim", "num_classes", "activation", "nbs")},
                      in_dim=saved["meta"]["feature_dim"])
    head2.load_state_dict(saved["state_dict"], strict=True)
    with torch.no_grad():
        assert _max_diff(head2.eval()(feats), model.head(feats)) < 1e-5


# ---------------------------------------------------------------------- detectron2
def _expected_detectron2_names(blocks: list[int], bottleneck: bool) -> dict[str, str]:
    """detectron2 name -> torchvision name, written out from detectron2's ResNet layout."""
    bn = ("weight", "bias", "running_mean", "running_var")
    names = {"stem.conv1.weight": "conv1.weight", **{f"stem.conv1.norm.{p}": f"bn1.{p}" for p in bn}}
    convs = 3 if bottleneck else 2
    for stage, count in enumerate(blocks, start=1):
        for b in range(count):
            d2, tv = f"res{stage + 1}.{b}", f"layer{stage}.{b}"
            for k in range(1, convs + 1):
                names[f"{d2}.conv{k}.weight"] = f"{tv}.conv{k}.weight"
                names.update({f"{d2}.conv{k}.norm.{p}": f"{tv}.bn{k}.{p}" for p in bn})
            if b == 0 and (stage > 1 or bottleneck):
                names[f"{d2}.shortcut.weight"] = f"{tv}.downsample.0.weight"
                names.update({f"{d2}.shortcut.norm.{p}": f"{tv}.downsample.1.{p}" for p in bn})
    return names


class _OnlyArrays(pickle.Unpickler):
    """Refuses every global except the two an exported array needs; records those it sees."""

    def __init__(self, file):
        super().__init__(file)
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module, name):
        self.seen.add((module, name))
        if (module, name) in (("numpy", "ndarray"), ("builtins", "bytearray")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} in an exported detectron2 file")


@pytest.mark.parametrize("which", ["rn18", "rn50"])
def test_detectron2_names_shapes_and_no_code(tmp_path, which, request):
    path, model = request.getfixturevalue(which)
    out = tmp_path / "d2.pkl"
    assert main(["export", str(path), "--format", "detectron2", "--out", str(out)]) == 0
    # every callable a pickle can reach goes through find_class: record them all
    unpickler = _OnlyArrays(io.BytesIO(out.read_bytes()))
    obj = unpickler.load()
    assert unpickler.seen == {("numpy", "ndarray"), ("builtins", "bytearray")}
    assert obj["__author__"] == "twist" and obj["matching_heuristics"] is True
    tv = model.backbone.state_dict()
    expected = _expected_detectron2_names([2, 2, 2, 2] if which == "rn18" else [3, 4, 6, 3], which == "rn50")
    assert set(obj["model"]) == set(expected)
    for d2, name in expected.items():
        array = obj["model"][d2]
        assert array.shape == tuple(tv[name].shape) and array.flags.writeable
        assert torch.equal(torch.from_numpy(array), tv[name].float())
    assert detectron2_name("layer1.0.num_batches_tracked") is None
