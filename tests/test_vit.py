"""ViT backbones through timm (names, class token, crop sizes, drop path, optional dependency)
and the EMA teacher (METHOD.md section 5)."""

import sys

import pytest
import torch
from torch import nn

from twist.config import ConfigError, ModelConfig, apply_overrides
from twist.presets import get_preset
from twist.ema import make_teacher, update_teacher
from twist.model import build_model

timm = pytest.importorskip("timm")

from twist.vit import MissingDependencyError, build_vit  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small, busy CPU these many small ops run faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit_s():
    torch.manual_seed(0)
    return build_vit(ModelConfig(backbone="vit_small", drop_path=0.0), in_channels=3).eval()


@pytest.fixture(scope="module")
def vit_s8():
    """ViT-S with 8 px patches on grey images, stochastic depth 0.2 (test sizes)."""
    torch.manual_seed(0)
    return build_vit(ModelConfig(backbone="vit_small", patch_size=8, drop_path=0.2), in_channels=1)


def test_vit_small_keeps_timm_names_and_outputs_the_class_token(vit_s):
    assert vit_s.feature_dim == 384
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    ref.load_state_dict(vit_s.state_dict(), strict=True)  # an export loads into timm as is
    ref.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = vit_s(x)
        torch.testing.assert_close(out, ref(x))
        tokens = vit_s.forward_features(x)
    assert out.shape == (1, 384)
    torch.testing.assert_close(out, tokens[:, 0])  # class token after the final norm


def test_global_and_local_crops_share_the_network(vit_s, vit_s8):
    with torch.no_grad():
        assert vit_s(torch.randn(2, 3, 96, 96)).shape == (2, 384)  # 6 x 6 patches: embedding resampled
        vit_s8.eval()
        assert vit_s8(torch.randn(3, 1, 32, 32)).shape == (3, 384)
        assert vit_s8(torch.randn(3, 1, 16, 16)).shape == (3, 384)


def test_vit_base_names_and_width():
    net = build_vit(ModelConfig(backbone="vit_base"), in_channels=3)
    assert net.feature_dim == 768
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, device="meta")
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_drop_path_and_in_channels_follow_the_config(vit_s8):
    assert vit_s8.patch_embed.proj.in_channels == 1 and vit_s8.patch_embed.proj.kernel_size == (8, 8)
    assert vit_s8.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # linear rule up to drop_path


def test_model_with_vit_has_gelu_head_and_vit_init():
    cfg = get_preset("vit-small").model
    cfg.patch_size, cfg.hidden_dim, cfg.num_classes = 8, 32, 16
    model = build_model(cfg, in_channels=3)
    assert isinstance(model.head.projection_head[2], nn.GELU)
    assert torch.all(model.head.last_linear.bias == 0)
    views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 2
    assert [z.shape for z in model(views)] == [torch.Size([4, 16])] * 4


def test_crop_sizes_must_be_multiples_of_the_patch():
    cfg = get_preset("vit-small")
    with pytest.raises(ConfigError, match="augment.local_size"):
        apply_overrides(cfg, ["model.patch_size=16", "augment.local_size=40"]).validate()


def test_missing_timm_is_a_clear_error(monkeypatch):
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'twist\[vit\]'") as err:
        build_vit(ModelConfig(backbone="vit_small"), 3)
    assert isinstance(err.value, ImportError) and isinstance(err.value, ConfigError)  # CLI prints one line


# ---------------------------------------------------------------------- EMA teacher
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_teacher_is_a_frozen_copy():
    student = _Tiny()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert teacher.training
    for (n, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(t, s, msg=n)
        assert t.data_ptr() != s.data_ptr()


def test_ema_update_by_hand():
    torch.manual_seed(0)
    student = _Tiny()
    teacher = make_teacher(student)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student.bn.running_mean.fill_(0.25)
        student.bn.num_batches_tracked.fill_(7)
    update_teacher(teacher, student, momentum=0.9)
    for name in ("lin.weight", "lin.bias", "bn.weight", "bn.bias"):
        expected = 0.9 * t0[name] + 0.1 * student.state_dict()[name]
        torch.testing.assert_close(teacher.state_dict()[name], expected, msg=name)
    assert torch.all(teacher.bn.running_mean == 0.25)  # buffers are copied
    assert int(teacher.bn.num_batches_tracked) == 7
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(teacher, student, momentum=1.0)  # the end of the cosine: teacher frozen
    torch.testing.assert_close(teacher.lin.weight, before["lin.weight"], rtol=0, atol=0)
    wrapped = nn.Module()
    wrapped.module = student  # what DistributedDataParallel looks like
    update_teacher(teacher, wrapped, momentum=0.0)
    torch.testing.assert_close(teacher.lin.weight, student.lin.weight)
    with pytest.raises(ValueError):
        update_teacher(teacher, student, momentum=1.5)


def test_teacher_keeps_stochastic_depth_as_the_release(vit_s8):
    """The release's teacher is built with the student's drop_path and stays in training mode,
    so its stochastic depth is on (bytedance/TWIST train.py, vision_transformer.py)."""
    teacher = make_teacher(vit_s8)
    assert teacher.training
    assert teacher.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        torch.manual_seed(0)
        a = teacher(x)
        torch.manual_seed(1)
        b = teacher(x)
        torch.manual_seed(0)
        a_again = teacher(x)
        teacher.eval()
        c, d = teacher(x), teacher(x)
    assert not torch.allclose(a, b)  # different paths dropped under different random draws
    torch.testing.assert_close(a, a_again)
    torch.testing.assert_close(c, d)  # eval mode: no drop
