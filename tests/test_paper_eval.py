"""The paper recipe of `twist eval` (twist.paper_eval): settings equal to the release's arguments,
a run on a tiny image folder, subset lists, and the ViT feature recipes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from twist.cli import main
from twist.config import ConfigError, ModelConfig
from twist.presets import get_preset
from twist.data import DataError, load_dataset
from twist.paper_eval import CenterCropTransform, PaperSettings, paper_settings
from twist.protocols import read_subset_list, select_subset

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# The release's arguments, read from bytedance/TWIST (README commands and the scripts' argparse
# defaults / hard-coded values); written out here independently of twist.paper_eval's tables.
COMMON = dict(momentum=0.9, nesterov=False, crop_size=224, resize_size=256, crop_scale=(0.08, 1.0),
              crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, head_init_std=0.01, eval_every=1, processes=8)
RELEASE_ARGS = {
    # evaluate.py ... --weight-decay 0 --batch-size 1024 --val_epoch 1 --lr-classifier 0.2 (epochs default 100)
    ("linear", "rn50-multicrop"): dict(epochs=100, batch_size=1024, lr_head=0.2, lr_backbone=0.0,
                                       lr_batch_scaling=False, weight_decay=0.0, interpolation="bilinear",
                                       features="pooled", label_percent=100),
    # evaluate_vitlinear.py --arch vit_s --lr 0.02, batch_size_per_gpu 128 x 8 GPUs, n_last_blocks 4
    ("linear", "vit-small"): dict(epochs=100, batch_size=1024, lr_head=0.02, lr_backbone=0.0, lr_batch_scaling=True,
                                  weight_decay=0.0, interpolation="bicubic", features="last4", label_percent=100),
    # evaluate_vitlinear.py --arch vit_b --lr 0.0015 (class token + averaged patch tokens for ViT-Base)
    ("linear", "vit-base"): dict(epochs=100, batch_size=1024, lr_head=0.0015, lr_backbone=0.0, lr_batch_scaling=True,
                                 weight_decay=0.0, interpolation="bicubic", features="cls+avgpool",
                                 label_percent=100),
    # evaluate.py --weights finetune --lr-backbone 0.04 --lr-classifier 0.2 --train-percent 1 --weight-decay 0
    # --epochs 20 (batch-size default 256)
    ("semi1", "rn50-multicrop"): dict(epochs=20, batch_size=256, lr_head=0.2, lr_backbone=0.04, lr_batch_scaling=False,
                                      weight_decay=0.0, interpolation="bilinear", features="pooled", label_percent=1),
    # ... --lr-backbone 0.02 --train-percent 10 --epochs 20
    ("semi10", "rn50-multicrop"): dict(epochs=20, batch_size=256, lr_head=0.2, lr_backbone=0.02,
                                       lr_batch_scaling=False, weight_decay=0.0, interpolation="bilinear",
                                       features="pooled", label_percent=10),
}


@pytest.mark.parametrize("key", sorted(RELEASE_ARGS))
def test_release_recipe_dry_run_equals_release_arguments_field_by_field(key):
    protocol, preset = key
    cfg = get_preset(preset)
    fraction = {"semi1": 12811 / 1281167, "semi10": 128116 / 1281167}.get(protocol)
    s = paper_settings("semi" if fraction else protocol, cfg.model.backbone, crop_size=cfg.augment.global_size,
                       label_fraction=fraction)
    expected = {**COMMON, **RELEASE_ARGS[key]}
    got = dataclasses.asdict(s)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), f"{key}: {name} = {got[name]!r}, the release has {value!r}"
    assert set(got) == set(expected) | {"protocol", "source"}  # no setting left unchecked
    if protocol == "linear" and preset == "vit-small":
        assert s.effective_lr_head() == pytest.approx(0.02 * 1024 / 256)


def test_overrides_are_typed_and_checked():
    s = paper_settings("linear", "resnet50", overrides=["epochs=2", "crop_scale=0.2,1", "nesterov=true"])
    assert (s.epochs, s.crop_scale, s.nesterov) == (2, (0.2, 1.0), True)
    with pytest.raises(ConfigError, match="field=value"):
        paper_settings("linear", "resnet50", overrides=["epoch=2"])
    with pytest.raises(ConfigError, match="epochs"):
        paper_settings("linear", "resnet50", overrides=["epochs=0"])
    with pytest.raises(ConfigError, match="ResNets only"):
        paper_settings("semi", "vit_small")


def test_center_crop_view_matches_resize_then_centre_crop():
    img = torch.arange(2 * 1 * 20 * 30, dtype=torch.float32).reshape(2, 1, 20, 30).remainder(256).to(torch.uint8)
    t = CenterCropTransform(crop=8, resize=10, mean=[0.0], std=[1.0])
    out = t(img)
    assert out.shape == (2, 1, 8, 8)
    ref = torch.nn.functional.interpolate(img.float() / 255, size=(10, 15), mode="bilinear", align_corners=False,
                                          antialias=True).clamp(0, 1)
    torch.testing.assert_close(out, ref[..., 1:9, 4:12])  # torchvision's CenterCrop offsets: round((10-8)/2), round(7/2)


# ---------------------------------------------------------------------- a tiny image folder
def _folder(root, n_train=8, n_test=4):
    """train/ and val/ with two ImageNet-like class folders of grey JPEGs (dark vs bright), 20 x 26 px."""
    rng = np.random.default_rng(0)
    for split, n, offset in (("train", n_train, 0), ("val", n_test, 1000)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip((40 if c == 0 else 210) + rng.normal(0, 15, (20, 26)), 0, 255).astype(np.uint8)
                Image.fromarray(a, "L").save(d / f"{wnid}_{i + offset}.JPEG", "JPEG")
    return root


def test_paper_linear_and_semi_on_a_tiny_folder(trained_digits_run, tmp_path, capsys):
    data = _folder(tmp_path / "imgs")
    subset = tmp_path / "1percent.txt"
    subset.write_text("n01440764_1.JPEG\nn01443537_2.JPEG\nn01443537_5.JPEG\n")
    out = tmp_path / "eval"
    rc = main(["eval", str(trained_digits_run), str(data), "--protocol", "linear,semi", "--recipe", "paper",
               "--paper-set", "epochs=3", "--paper-set", "batch_size=4", "--semi-subset", str(subset),
               "--out-dir", str(out), "--json", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lin, semi = res["linear"], res["semi"]
    assert lin["recipe"] == "paper" and semi["recipe"] == "paper"
    assert lin["settings"]["epochs"] == 3 and [h["epoch"] for h in lin["history"]] == [1, 2, 3]
    assert lin["settings"]["lr_head"] == 0.2 and lin["lr_backbone"] == 0.0          # evaluate.py's probe
    assert lin["settings"]["crop_size"] == 16 and lin["settings"]["resize_size"] == 18  # 16 / 0.875
    assert lin["eval_view"] == "CenterCropTransform(resize=18, crop=16, bilinear)"
    # cosine per epoch from 0.2 to 0 over 3 epochs: 0.2, 0.15, 0.05
    assert [round(h["lr_head"], 6) for h in lin["history"]] == [0.2, 0.15, 0.05]
    assert lin["best_top1"] >= lin["top1"] and lin["num_train"] == 16 and lin["num_test"] == 8
    assert lin["top1"] >= 0.75  # dark vs bright is linearly separable in any feature space worth the name
    run = semi["fractions"]["1percent"]
    assert run["num_labels"] == 3 and run["subset_source"].startswith("list ")
    train = load_dataset(str(data / "train"), "train", image_size=18)
    names = sorted(str(train.paths[i]).rsplit("/", 1)[-1] for i in run["subset_indices"])
    assert names == ["n01440764_1.JPEG", "n01443537_2.JPEG", "n01443537_5.JPEG"]
    assert run["settings"]["label_percent"] == 10 and run["lr_backbone"] == 0.02  # 3 of 16 labels: nearest is 10 %
    assert (out / "linear.json").is_file() and (out / "semi_subset_1percent.txt").is_file()


def test_paper_recipe_refuses_fast_only_flags(trained_digits_run, tmp_path, capsys):
    data = _folder(tmp_path / "imgs", 2, 1)
    assert main(["eval", str(trained_digits_run), str(data), "--protocol", "linear", "--recipe", "paper",
                 "--linear-epochs", "3", "--no-progress"]) == 2
    assert "--paper-set" in capsys.readouterr().err
    assert main(["eval", str(trained_digits_run), str(data), "--protocol", "linear", "--paper-set", "epochs=1",
                 "--no-progress"]) == 2
    assert "--recipe paper" in capsys.readouterr().err


# ---------------------------------------------------------------------- subset lists
def test_subset_list_selects_exactly_its_files(tmp_path):
    data = _folder(tmp_path / "imgs", 6, 1)
    ds = load_dataset(str(data / "train"), "train", image_size=8)
    listed = ["n01443537_4.JPEG", "n01440764_0.JPEG", "n01440764_5.JPEG", "n01440764_0.JPEG"]
    f = tmp_path / "list.txt"
    f.write_text("\n".join(listed) + "\n\n")
    assert read_subset_list(f) == listed
    idx = select_subset(ds, read_subset_list(f))
    assert sorted(str(ds.paths[i]).rsplit("/", 1)[-1] for i in idx) == sorted(set(listed))
    assert list(idx) == sorted(idx) and len(idx) == 3
    with_dir = select_subset(ds, ["n01443537/n01443537_4.JPEG"])
    assert str(ds.paths[with_dir[0]]).endswith("n01443537/n01443537_4.JPEG")


def test_subset_list_missing_names_are_an_error(tmp_path):
    ds = load_dataset(str(_folder(tmp_path / "imgs", 3, 1) / "train"), "train", image_size=8)
    names = ["n01440764_0.JPEG", "n09999999_1.JPEG", "n09999999_2.JPEG", "n01443537_77.JPEG"]
    with pytest.raises(DataError, match=r"3 of 4 listed file names are not in the training data") as e:
        select_subset(ds, names, "--semi-subset x.txt")
    assert "n09999999_1.JPEG" in str(e.value) and "--semi-subset x.txt" in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="lists no names"):
        read_subset_list(empty)
    with pytest.raises(DataError, match="not an image folder"):
        select_subset(load_dataset("digits", progress=False), names)


def test_real_imagenet_lists_have_the_expected_format():
    """The shipped 1 % list (when this machine has it) parses to 12811 unique ImageNet file names."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet_subsets", "1percent.txt")
    if not os.path.isfile(path):
        pytest.skip("the ImageNet subset lists are not on this machine")
    names = read_subset_list(path)
    assert len(names) == len(set(names)) == 12811
    assert all(n.startswith("n") and n.endswith(".JPEG") and "_" in n for n in names)


# ---------------------------------------------------------------------- ViT feature recipes
@pytest.mark.parametrize("arch,recipe,width", [("vit_small", "last4", 4 * 384), ("vit_base", "cls+avgpool", 2 * 768),
                                               ("vit_small", "cls", 384)])
def test_vit_feature_recipes_have_the_release_width(arch, recipe, width):
    pytest.importorskip("timm")
    from twist.paper_eval import feature_recipe
    from twist.vit import build_vit, vit_feature_dim, vit_features

    torch.manual_seed(0)
    net = build_vit(ModelConfig(backbone=arch, patch_size=8, drop_path=0.0), in_channels=1).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        cls, f = vit_features(net, x, recipe)
        ref = net(x)
        tokens = net.forward_features(x)  # (B, 1 + patches, D) after the final LayerNorm
    assert f.shape == (3, width) and vit_feature_dim(net.feature_dim, recipe) == width
    torch.testing.assert_close(cls, ref)
    d = net.feature_dim
    if recipe == "last4":
        torch.testing.assert_close(f[:, 3 * d:], ref)  # the last block's class token comes last
        assert not torch.allclose(f[:, :d], ref)
    if recipe == "cls+avgpool":
        torch.testing.assert_close(f[:, d:], tokens[:, 1:].mean(dim=1))
    if recipe != "cls":
        assert feature_recipe(arch) == recipe  # the default of the architecture


def test_vit_features_flow_through_extract():
    pytest.importorskip("timm")
    from twist.augment import EvalTransform
    from twist.inference import extract
    from twist.model import build_model
    from twist.vit import vit_features

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="vit_small", patch_size=8, drop_path=0.0, num_classes=4, hidden_dim=16,
                                    activation="gelu"), in_channels=1)
    ds = load_dataset("digits", progress=False, image_size=16)
    sub = torch.arange(6)
    from twist.protocols import subset_dataset

    small = subset_dataset(ds, sub.numpy())
    t = EvalTransform(16, 1)
    plain = extract(model, small, t)
    rich = extract(model, small, t, features_fn=lambda x: vit_features(model.backbone, x, "last4"))
    assert rich["features"].shape == (6, 4 * 384)
    torch.testing.assert_close(rich["probs"], plain["probs"])  # the head still sees the final class token
    torch.testing.assert_close(rich["features"][:, -384:], plain["features"])


def test_vit_features_option_rejected_for_cnn():
    from twist.paper_eval import feature_recipe

    with pytest.raises(ConfigError, match="ViT backbones only"):
        feature_recipe("resnet50", "last4")
    assert PaperSettings.__dataclass_params__.frozen


def test_finetune_step_emulates_per_gpu_batchnorm_and_ddp_averaging():
    """_step with processes=2 gives the gradient of the mean of the two halves' losses, each half
    normalised by its own BatchNorm statistics, and keeps the running statistics of the first half."""
    import copy

    from twist.paper_eval import _step

    torch.manual_seed(0)
    bb = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    fc = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 1, 6, 6) * torch.arange(1, 9).view(8, 1, 1, 1), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ref_bb, ref_fc = copy.deepcopy(bb), copy.deepcopy(fc)
    opt = torch.optim.SGD([*bb.parameters(), *fc.parameters()], lr=0.0)
    bb.train()
    _step(bb, bb, fc, opt, x, y, finetune=True, processes=2)
    ref_bb.train()
    first = torch.nn.functional.cross_entropy(ref_fc(ref_bb(x[:4])), y[:4])
    stats = [b.clone() for b in ref_bb.buffers()]
    second = torch.nn.functional.cross_entropy(ref_fc(ref_bb(x[4:])), y[4:])
    ((first + second) / 2).backward()
    for p, q in zip([*bb.parameters(), *fc.parameters()], [*ref_bb.parameters(), *ref_fc.parameters()]):
        torch.testing.assert_close(p.grad, q.grad)
    for b, s in zip(bb.buffers(), stats):
        torch.testing.assert_close(b, s)
    whole_bb, whole_fc = copy.deepcopy(ref_bb), copy.deepcopy(ref_fc)
    for p in [*whole_bb.parameters(), *whole_fc.parameters()]:
        p.grad = None
    torch.nn.functional.cross_entropy(whole_fc(whole_bb(x)), y).backward()
    assert not torch.allclose(whole_bb[0].weight.grad, bb[0].weight.grad)  # one batch of 8 differs
