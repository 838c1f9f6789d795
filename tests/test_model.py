"""Head shapes, the NBS, the per-resolution backbone calls, and backbone variants."""

import dataclasses

import pytest
import torch
from torch import nn

from twist.config import ConfigError, ModelConfig, TwistConfig
from twist.presets import get_preset
from twist.head import TwistHead
from twist.model import build_model


def test_head_layout_matches_release_names():
    head = TwistHead(32, hidden_dim=64, num_classes=10)
    names = set(dict(head.named_parameters()))
    assert {"projection_head.0.weight", "projection_head.0.bias", "projection_head.1.weight",
            "projection_head.4.weight", "projection_head.5.bias", "last_linear.weight", "last_linear.bias"} <= names
    assert not any(n.startswith("norm.") for n in names)  # NBS has no affine parameters
    buffers = dict(head.named_buffers())
    assert "norm.running_mean" in buffers and "norm.running_var" in buffers
    assert all(isinstance(m, nn.Linear) for m in (head.projection_head[0], head.projection_head[4], head.last_linear))


def test_two_layer_head_drops_only_the_hidden_layer():
    three, two = TwistHead(32, hidden_dim=64, num_classes=10), TwistHead(32, hidden_dim=64, num_classes=10, layers=2)
    names3, names2 = set(dict(three.named_parameters())), set(dict(two.named_parameters()))
    assert names2 == names3 - {"projection_head.4.weight", "projection_head.4.bias",
                               "projection_head.5.weight", "projection_head.5.bias"}
    assert sum(p.numel() for p in three.parameters()) - sum(p.numel() for p in two.parameters()) == 64 * 64 + 64 + 2 * 64
    assert two(torch.randn(8, 32)).shape == (8, 10)
    # the layers are initialised in order: a seed gives both heads the same first layer, and the
    # three-layer head the draws it had before two-layer heads existed (first layer, then H x H)
    torch.manual_seed(5)
    three = TwistHead(32, hidden_dim=64, num_classes=10)
    torch.manual_seed(5)
    two = TwistHead(32, hidden_dim=64, num_classes=10, layers=2)
    torch.manual_seed(5)
    first, hidden = nn.Linear(32, 64), nn.Linear(64, 64)
    assert torch.equal(three.projection_head[0].weight, first.weight)
    assert torch.equal(two.projection_head[0].weight, first.weight)
    assert torch.equal(three.projection_head[4].weight, hidden.weight)
    cfg = get_preset("digits")
    cfg.model.head_layers = 2
    model = build_model(cfg.model, in_channels=1)
    assert len(model.heads) == 5 and all(len(h.projection_head) == 3 for h in model.heads)
    cfg.model.head_layers = 4
    with pytest.raises(ConfigError, match="model.head_layers"):
        cfg.validate()


def test_nbs_standardises_each_logit_over_the_batch():
    torch.manual_seed(0)
    head = TwistHead(16, hidden_dim=32, num_classes=7).train()
    z = head(torch.randn(64, 16) * 5 + 3)
    assert z.shape == (64, 7)
    torch.testing.assert_close(z.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(7), atol=1e-3, rtol=0)


def test_eval_mode_uses_running_statistics():
    torch.manual_seed(0)
    head = TwistHead(8, hidden_dim=16, num_classes=4)
    head.train()
    for _ in range(5):
        head(torch.randn(32, 8))
    head.eval()
    x = torch.randn(3, 8)
    single = torch.cat([head(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(single, head(x))  # batch-independent in eval mode


def test_vit_init_is_trunc_normal_zero_bias():
    head = TwistHead(8, hidden_dim=256, num_classes=100, activation="gelu", vit_init=True)
    assert isinstance(head.projection_head[2], nn.GELU)
    w = head.last_linear.weight
    assert torch.all(head.last_linear.bias == 0)
    assert 0.015 < w.std().item() < 0.025


def test_backbone_runs_once_per_resolution_and_head_once():
    model = build_model(ModelConfig(backbone="small_cnn", small_cnn_width=8, hidden_dim=32, num_classes=5), in_channels=1)
    calls = {"backbone": [], "head": 0}
    model.backbone.register_forward_hook(lambda m, i, o: calls["backbone"].append(tuple(i[0].shape)))
    model.head.register_forward_hook(lambda m, i, o: calls.__setitem__("head", calls["head"] + 1))
    views = [torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)] + [torch.randn(6, 1, 8, 8) for _ in range(4)]
    out = model(views)
    assert [tuple(z.shape) for z in out] == [(6, 5)] * 6
    assert calls["backbone"] == [(12, 1, 16, 16), (24, 1, 8, 8)]
    assert calls["head"] == 1


def test_nbs_statistics_cover_all_views():
    model = build_model(ModelConfig(backbone="small_cnn", small_cnn_width=8, hidden_dim=32, num_classes=5), in_channels=1)
    views = [torch.randn(8, 1, 16, 16) + i for i in range(3)]
    out = torch.cat(model(views))
    torch.testing.assert_close(out.mean(0), torch.zeros(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnets_and_cifar_stem(name, dim):
    model = build_model(ModelConfig(backbone=name, cifar_stem=True, hidden_dim=32, num_classes=10), in_channels=3)
    assert model.feature_dim == dim
    assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, nn.Identity)
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_small_cnn_stride_two_stem_sees_64_px_through_32_px_maps():
    """model.small_cnn_stride=2 (the photo-cpu recipe): the first convolution halves the image,
    so every later layer of a 64 px view works on the maps a 32 px view gives with stride 1, and
    the weights are the same tensors (checkpoints and exports do not change)."""
    cfg = ModelConfig(backbone="small_cnn", small_cnn_width=4, hidden_dim=16, num_classes=5)
    plain = build_model(cfg, in_channels=3)
    stem = build_model(dataclasses.replace(cfg, small_cnn_stride=2), in_channels=3)
    assert stem.backbone.features[0].stride == (2, 2) and plain.backbone.features[0].stride == (1, 1)
    assert {k: v.shape for k, v in stem.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    seen = []
    stem.backbone.features[3].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    plain.backbone.features[3].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    assert stem.features(torch.randn(2, 3, 64, 64)).shape == plain.features(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    assert seen == [(2, 4, 32, 32), (2, 4, 32, 32)]
    with pytest.raises(Exception, match="small_cnn_stride"):
        TwistConfig.from_dict({"model": {"small_cnn_stride": 3}}).validate()


def test_resnet50_backbone_loads_into_torchvision_without_fc():
    import torchvision

    model = build_model(ModelConfig(backbone="resnet50", hidden_dim=32, num_classes=10))
    tv = torchvision.models.resnet50(weights=None)
    missing, unexpected = tv.load_state_dict(model.backbone.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_resnet50w2_is_twice_as_wide():
    model = build_model(ModelConfig(backbone="resnet50w2", hidden_dim=32, num_classes=10))
    assert model.feature_dim == 4096
    assert model.backbone.conv1.out_channels == 128
    n = sum(p.numel() for p in model.backbone.parameters())
    assert 90e6 < n < 100e6  # ~94M with the widened stem, as SwAV's RN50w2


def test_presets_build_models():
    cfg = get_preset("digits")
    model = build_model(cfg.model, in_channels=1)
    assert model.num_classes == cfg.model.num_classes


def test_extra_heads_share_the_backbone_and_promotion_swaps_values_and_optimizer_state():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="small_cnn", small_cnn_width=8, hidden_dim=16, num_classes=4, num_heads=3)
    model = build_model(cfg, in_channels=1)
    assert len(model.heads) == 3 and model.heads[0] is model.head
    views = [torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)]
    outs = model(views, all_heads=True)
    assert len(outs) == 3 and all(len(o) == 2 and o[0].shape == (8, 4) for o in outs)
    torch.testing.assert_close(outs[0][0], model(views)[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sum(o[0].square().sum() + o[1].sum() for o in outs).backward()
    opt.step()
    model.eval()
    x = torch.randn(5, 1, 16, 16)
    before = [h(model.backbone(x)) for h in model.heads]
    mom_before = opt.state[model.heads[2].last_linear.weight]["momentum_buffer"].clone()
    params_before = [id(p) for p in model.parameters()]
    model.promote_head(2, opt)
    after = [h(model.backbone(x)) for h in model.heads]
    torch.testing.assert_close(after[0], before[2])
    torch.testing.assert_close(after[2], before[0])
    torch.testing.assert_close(after[1], before[1])
    torch.testing.assert_close(opt.state[model.head.last_linear.weight]["momentum_buffer"], mom_before)
    assert [id(p) for p in model.parameters()] == params_before  # same parameter objects
    assert "extra_heads.1.last_linear.weight" in model.state_dict()


def test_dropping_the_losing_heads_leaves_the_optimiser_a_fresh_build_would_give():
    """After promotion and the drop, the model is the winner (+ over-clustering head) on the
    backbone, and the optimiser's groups and state are those of the smaller model in the same
    order: its state dict loads into a rebuilt, likewise dropped model and optimiser."""
    from twist.config import OptimConfig
    from twist.optim import build_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="small_cnn", small_cnn_width=4, hidden_dim=16, num_classes=4, num_heads=3,
                      overcluster_classes=8)
    model = build_model(cfg, in_channels=1)
    opt = build_optimizer(model, OptimConfig(name="adamw"), 1e-3)
    views = [torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)]
    sum(z.square().sum() for h in model(views, all_heads=True) for z in h).backward()
    opt.step()
    model.eval()
    x = torch.randn(5, 1, 16, 16)
    winner = model.heads[2](model.backbone(x))
    model.promote_lowest(torch.tensor([3.0, 2.0, 1.0, 0.0]), opt)
    assert model.drop_losing_heads(opt) == 2 and model.drop_losing_heads(opt) == 0
    assert len(model.heads) == 1 and len(model.trained_heads) == 2
    torch.testing.assert_close(model.logits(x), winner)
    live = {id(p) for p in model.parameters()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == live and set(map(id, opt.state)) == live
    assert not any(k.startswith("extra_heads") for k in model.state_dict())

    torch.manual_seed(1)
    rebuilt = build_model(cfg, in_channels=1)
    rebuilt_opt = build_optimizer(rebuilt, OptimConfig(name="adamw"), 1e-3)
    rebuilt.drop_losing_heads(rebuilt_opt)
    single = build_model(dataclasses.replace(cfg, num_heads=1), in_channels=1)
    single_opt = build_optimizer(single, OptimConfig(name="adamw"), 1e-3)
    assert [len(g["params"]) for g in rebuilt_opt.param_groups] == [len(g["params"]) for g in single_opt.param_groups]
    assert [[p.shape for p in g["params"]] for g in rebuilt_opt.param_groups] == \
        [[p.shape for p in g["params"]] for g in opt.param_groups]
    rebuilt.load_state_dict(model.state_dict())
    rebuilt_opt.load_state_dict(opt.state_dict())
    for a, b in zip(opt.param_groups, rebuilt_opt.param_groups):
        for p, q in zip(a["params"], b["params"]):
            torch.testing.assert_close(opt.state[p]["exp_avg"], rebuilt_opt.state[q]["exp_avg"])


def test_single_head_model_has_no_extra_heads():
    model = build_model(ModelConfig(backbone="small_cnn", small_cnn_width=8, hidden_dim=16, num_classes=4), 1)
    assert len(model.heads) == 1
    assert not any(k.startswith("extra_heads") for k in model.state_dict())


def test_overcluster_head_is_trained_but_never_a_candidate():
    cfg = ModelConfig(backbone="small_cnn", small_cnn_width=8, hidden_dim=16, num_classes=4, num_heads=2,
                      overcluster_classes=12)
    model = build_model(cfg, in_channels=1)
    assert len(model.heads) == 2 and len(model.trained_heads) == 3
    assert model.trained_heads[-1] is model.aux_heads[0] and model.aux_heads[0] not in model.heads
    views = [torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16), torch.randn(8, 1, 12, 12)]
    outs = model(views, all_heads=True)
    assert [o[0].shape[1] for o in outs] == [4, 4, 12]
    assert all(len(o) == 3 and [v.shape[0] for v in o] == [8, 8, 8] for o in outs)
    assert model(views)[0].shape == (8, 4) and model.num_classes == 4  # the classifier is unchanged
    assert "aux_heads.0.last_linear.weight" in model.state_dict()
    # its loss reaches the backbone
    outs[-1][0].square().sum().backward()
    assert model.backbone.features[0].weight.grad.abs().sum() > 0
    assert model.head.last_linear.weight.grad is None


@pytest.mark.parametrize("scale", [1.0, 0.25, 0.0])
def test_classifier_grad_scale_scales_only_the_classifier_heads_share_of_the_backbone_gradient(scale):
    """The classifier heads' gradient into the backbone is multiplied by the scale; their own
    parameters and the over-clustering head's path are untouched, and the logits are too."""
    cfg = ModelConfig(backbone="small_cnn", small_cnn_width=4, hidden_dim=16, num_classes=4, num_heads=2,
                      overcluster_classes=8)
    views = [torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)]

    def grads(grad_scale):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(cfg, classifier_grad_scale=grad_scale), in_channels=1)
        model.train()
        outs = model(views, all_heads=True)
        found = {}
        for part, heads in (("cls", outs[:2]), ("aux", outs[2:])):
            model.zero_grad()
            sum(z.square().sum() for h in heads for z in h).backward(retain_graph=True)
            bb = model.backbone.features[0].weight.grad
            found[part] = (torch.zeros_like(model.backbone.features[0].weight) if bb is None else bb.clone(),
                           model.extra_heads[0].last_linear.weight.grad)
        return outs, found

    ref_outs, ref = grads(1.0)
    outs, got = grads(scale)
    for a, b in zip(ref_outs, outs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert torch.allclose(got["cls"][0], scale * ref["cls"][0], atol=1e-6)
    assert ref["cls"][0].abs().sum() > 0
    assert torch.allclose(got["cls"][1], ref["cls"][1])  # the heads themselves learn at full rate
    assert torch.allclose(got["aux"][0], ref["aux"][0])  # the over-clustering head's path is unscaled


def test_train_step_updates_the_overcluster_head():
    from twist.loss import TwistLoss
    from twist.stage import train_step

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="small_cnn", small_cnn_width=4, hidden_dim=16, num_classes=4, overcluster_classes=8)
    model = build_model(cfg, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.aux_heads[0].last_linear.weight.detach().clone()
    views = [torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)]
    terms, finite = train_step(model, TwistLoss(), opt, views, device=torch.device("cpu"), precision="fp32")
    assert finite and terms.head_losses.shape == (2,)
    assert not torch.equal(before, model.aux_heads[0].last_linear.weight)


def test_training_logs_the_overcluster_loss_and_never_promotes_it(tmp_path):
    import numpy as np

    from twist.config import apply_overrides
    from twist.presets import get_preset
    from twist.train import train

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=rng.integers(0, 256, size=(16, 16, 16), dtype=np.uint8), y=np.arange(16) % 4)
    cfg = apply_overrides(get_preset("digits"), [
        "model.small_cnn_width=4", "model.hidden_dim=16", "model.num_classes=4", "model.num_heads=2",
        "model.overcluster_classes=8", "train.batch_size=8", "train.epochs=2", "train.eval_every=0",
        "train.precision=fp32", "train.device=cpu", "model.bunch_size=8"])
    record = train(cfg, str(data), tmp_path / "run", progress=False)
    # candidates are the two C=4 heads only; the over-clustering head's loss is logged apart
    assert len(record["head_losses"]) == 2
    assert record["promoted_head"] == min(range(2), key=lambda i: record["head_losses"][i])
    assert record["overcluster_loss"] not in record["head_losses"]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["model"]["aux_heads.0.last_linear.weight"].shape == (8, 16)
    assert state["model"]["head.last_linear.weight"].shape == (4, 16)
