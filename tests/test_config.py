"""Configuration: presets validate, overrides are typed, bad keys and values are errors that
name the valid choices, and configs round-trip through JSON."""

import json

import pytest

from twist.config import ConfigError, TwistConfig, apply_overrides, override_value, valid_keys
from twist.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = get_preset(name).validate()
    again = TwistConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_override_value_reads_the_overrides_as_they_are_applied():
    items = ["train.device=cpu", " train.epochs = 3", "train.epochs=5"]
    assert override_value(items, "train.epochs") == "5" == str(apply_overrides(TwistConfig(), items).train.epochs)
    assert override_value(items, "train.device") == "cpu" and override_value(items, "optim.lr") is None
    with pytest.raises(ConfigError, match="key=value"):
        override_value(["train.epochs"], "train.epochs")


def test_overrides_are_typed():
    cfg = apply_overrides(get_preset("digits"), ["optim.lr=0.25", "train.epochs=3", "train.channels_last=false",
                                                 "augment.global_scale=0.3,1.0", "optim.weight_decay_end=none",
                                                 "optim.weight_decay_end=0.1"])
    assert cfg.optim.lr == 0.25 and cfg.train.epochs == 3 and cfg.train.channels_last is False
    assert cfg.augment.global_scale == (0.3, 1.0) and cfg.optim.weight_decay_end == 0.1


@pytest.mark.parametrize("item,needle", [
    ("optim.nope=1", "Valid keys"),
    ("nope=1", "Valid keys"),
    ("train.epochs=1.5", "expected int"),
    ("train.epochs=abc", "expected int"),
    ("optim.lr=nan", "expected float"),
    ("train.channels_last=maybe", "expected bool"),
    ("augment.global_scale=0.3", "2 comma-separated"),
    ("noequals", "key=value"),
])
def test_bad_overrides(item, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(TwistConfig(), [item])


@pytest.mark.parametrize("item,needle", [
    ("model.num_classes=1", "model.num_classes"),
    ("train.batch_size=1", "batch norm"),
    ("model.backbone=vgg", "resnet18"),
    ("optim.name=rmsprop", "sgd, lars or adamw"),
    ("loss.tau=0", "loss.tau"),
    ("augment.global_scale=0.5,0.2", "augment.global_scale"),
    ("train.precision=fp8", "bf16"),
    ("model.overcluster_classes=1", "model.overcluster_classes"),
    ("model.overcluster_classes=-3", "model.overcluster_classes"),
    ("model.classifier_grad_scale=0", "model.overcluster_classes > 0"),  # nothing would train the backbone
    ("model.classifier_grad_scale=1.5", "model.classifier_grad_scale"),
    ("augment.progressive_start=1", "a fraction of augment.global_size"),
    ("augment.progressive_start=-0.5", "augment.progressive_start"),
    ("augment.progressive_fraction=0", "augment.progressive_fraction"),
])
def test_bad_values_fail_validation(item, needle):
    cfg = apply_overrides(TwistConfig(), [item])
    with pytest.raises(ConfigError, match=needle):
        cfg.validate()


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="digits"):
        get_preset("imagenet-9000")


def test_valid_keys_cover_every_group():
    keys = valid_keys()
    for group in ("model.", "loss.", "augment.", "optim.", "ema.", "selflabel.", "train."):
        assert any(k.startswith(group) for k in keys)


def test_progressive_view_sizes_ramp_in_steps_of_8_px_then_stay():
    from twist.config import AugmentConfig

    aug = AugmentConfig(global_size=64, local_size=32, progressive_start=0.625)
    sizes = [aug.view_sizes(e, 80) for e in range(80)]
    assert sizes[0] == (40, 20) and sizes[59:] == [(64, 32)] * 21  # the last quarter at full size
    assert [s for s, _ in sizes] == sorted(s for s, _ in sizes) and {s for s, _ in sizes} == {40, 48, 56, 64}
    assert all(local * 2 == side for side, local in sizes)
    assert [sum(1 for s, _ in sizes if s == side) for side in (40, 48, 56, 64)] == [10, 20, 20, 30]
    assert AugmentConfig(global_size=64, local_size=32).view_sizes(3, 80) == (64, 32)  # off
    assert aug.resized(48).global_size == 48 and aug.resized(48).local_size == 24 and aug.global_size == 64
    vit = apply_overrides(get_preset("vit-small"), ["augment.progressive_start=0.5"])
    with pytest.raises(ConfigError, match="ViT"):
        vit.validate()


def test_progressive_resizing_starts_at_8_px_at_least_and_is_off_for_tiny_views():
    from twist.config import AugmentConfig

    assert AugmentConfig(global_size=32, progressive_start=0.1).view_sizes(0, 10) == (8, 4)
    tiny = AugmentConfig(global_size=8, local_size=4, progressive_start=0.625)  # nothing to grow from:
    assert {tiny.view_sizes(e, 10) for e in range(10)} == {(8, 4)}  # a --set of a small size is not an error
    small = AugmentConfig(global_size=12, local_size=4, progressive_start=0.625)
    assert [small.view_sizes(e, 8)[0] for e in range(8)] == [8] * 6 + [12] * 2  # 12 is reached at the ramp's end
