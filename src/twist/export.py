"""Export a trained backbone (and optionally its head) for use in other libraries.

``twist export CHECKPOINT --format FORMAT --out FILE [--head-out FILE]``

Formats (every file is written atomically: a temporary file in the same folder, then a rename):

``torchvision``
    A torch file holding the backbone's state dict with torchvision's names. It loads with
    ``strict=True`` into the torchvision model whose classifier is removed::

        net = torchvision.models.resnet50()
        net.fc = torch.nn.Identity()          # twist backbones have no classifier
        net.load_state_dict(torch.load("backbone.pt", weights_only=True), strict=True)

    ResNet-18/34/50 with the standard stem and 3 input channels only: a CIFAR stem (3x3 conv,
    no max-pool), another channel count or the ResNet-50w2 layout has no torchvision
    counterpart (use ``safetensors``).
``timm``
    A torch file with timm's names. ViTs load into
    ``timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)`` (base:
    ``vit_base_patch16_224``; other patch sizes: ``patch8`` etc.; grey images: ``in_chans=1``);
    ResNet-18/34/50 (standard stem) into ``timm.create_model("resnet50", num_classes=0)``,
    whose names are torchvision's.
``safetensors``
    The backbone's tensors (names as in the twist model without the ``backbone.`` prefix) in a
    ``.safetensors`` file, with metadata: ``arch``, ``feature_dim``, ``in_channels``,
    ``cifar_stem``, ``patch_size``, ``image_size``, ``mean``, ``std``, ``twist_version`` and the
    run's ``config`` (JSON). Any backbone, including the small convnet.
``detectron2``
    A ``.pkl`` file as detectron2 reads pretrained weights:
    ``{"model": {name: numpy array}, "__author__": "twist", "matching_heuristics": True}``.
    Names follow detectron2's ResNet (mapping below); ``num_batches_tracked`` counters are
    dropped. The pickle holds only dicts, strings, a bool and arrays, each array written as
    ``numpy.ndarray(shape, dtype, bytearray)``: the only globals in the file are
    ``numpy.ndarray`` and ``builtins.bytearray`` (no code object, no function, and no
    dependence on numpy's private module paths, so numpy 1.x and 2.x both read it).
    torchvision ResNets stride in the 3x3 conv: set ``MODEL.RESNETS.STRIDE_IN_1X1 False``;
    for ResNet-50w2 also ``MODEL.RESNETS.WIDTH_PER_GROUP 128``, ``STEM_OUT_CHANNELS 128``,
    ``RES2_OUT_CHANNELS 512``; for ResNet-18/34 ``DEPTH 18/34`` and ``RES2_OUT_CHANNELS 64``.

Name mapping torchvision -> detectron2 (i = 1..4 is torchvision's stage, detectron2's
``res{i+1}``; b the block index; k = 1..3 the conv in the block)::

    conv1.weight                    stem.conv1.weight
    bn1.*                           stem.conv1.norm.*
    layer{i}.{b}.conv{k}.weight     res{i+1}.{b}.conv{k}.weight
    layer{i}.{b}.bn{k}.*            res{i+1}.{b}.conv{k}.norm.*
    layer{i}.{b}.downsample.0.weight  res{i+1}.{b}.shortcut.weight
    layer{i}.{b}.downsample.1.*     res{i+1}.{b}.shortcut.norm.*

``--head-out FILE`` also writes the projection head + NBS (names ``projection_head.{0,1,4,5}``,
or ``{0,1}`` for two-layer heads, ``last_linear``, ``norm``; they load with ``strict=True`` into
``twist.head.TwistHead(feature_dim, hidden_dim, num_classes, activation, nbs, layers=layers)``): a
``.safetensors`` file (with those numbers as metadata) when FILE ends in ``.safetensors``,
otherwise a torch file ``{"state_dict": ..., "meta": {...}}``.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twist.checkpoint import CheckpointError, save_checkpoint
from twist.io import atomic_write
from twist.config import ConfigError

FORMATS = ("torchvision", "timm", "safetensors", "detectron2")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")


@dataclass
class ExportResult:
    path: Path
    format: str
    arch: str
    feature_dim: int
    num_tensors: int
    usage: str
    head_path: Path | None = None


# ---------------------------------------------------------------------- writing
def _detached(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies sharing no storage (safetensors refuses shared tensors)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    data = save(_detached(tensors), metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------- detectron2
_D2_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(.+)$")


def detectron2_name(name: str) -> str | None:
    """detectron2's name for a torchvision ResNet parameter/buffer (None: dropped)."""
    if name.endswith("num_batches_tracked"):
        return None
    if name == "conv1.weight":
        return "stem.conv1.weight"
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1."):]
    m = _D2_BLOCK.match(name)
    if m is None:
        raise CheckpointError(f"no detectron2 name for ResNet parameter '{name}'")
    stage, block, part, rest = m.groups()
    prefix = f"res{int(stage) + 1}.{block}."
    if part.startswith("conv"):
        return f"{prefix}{part}.{rest}"
    if part.startswith("bn"):
        return f"{prefix}conv{part[2:]}.norm.{rest}"
    if part == "downsample.0":
        return f"{prefix}shortcut.{rest}"
    return f"{prefix}shortcut.norm.{rest}"


class _ArrayPickler(pickle.Pickler):
    """Pickles numpy arrays as ``numpy.ndarray(shape, dtype, bytearray(data))``: no private numpy
    paths, no functions; the arrays come back writable."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            a = np.ascontiguousarray(obj)
            return np.ndarray, (a.shape, a.dtype.str, bytearray(a.tobytes()))
        return NotImplemented


def detectron2_bytes(backbone: dict[str, torch.Tensor]) -> bytes:
    model = {}
    for name, value in backbone.items():
        new = detectron2_name(name)
        if new is not None:
            model[new] = value.detach().to("cpu", torch.float32).contiguous().numpy().copy()
    buf = io.BytesIO()
    _ArrayPickler(buf, protocol=4).dump({"model": model, "__author__": "twist", "matching_heuristics": True})
    return buf.getvalue()


# ---------------------------------------------------------------------- the export
def _check_resnet(arch: str, cifar_stem: bool, channels: int, fmt: str, archs: tuple[str, ...]) -> None:
    """Refuse backbones that have no counterpart in the target library's standard models."""
    if arch not in archs:
        hint = " (ViTs: --format timm)" if arch.startswith("vit_") else ""
        raise ConfigError(f"--format {fmt} exports {', '.join(archs)} backbones, not {arch}{hint}; "
                          f"--format safetensors exports every backbone")
    if cifar_stem:
        raise ConfigError(f"this {arch} has the CIFAR stem (3x3 conv, no max-pool), which no standard {fmt} model "
                          f"has; use --format safetensors")
    if channels != 3:
        raise ConfigError(f"this {arch} takes {channels}-channel images, standard {fmt} models take 3; "
                          f"use --format safetensors")


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, *, head_out: str | Path | None = None,
                      trust_pickle: bool = False) -> ExportResult:
    """Write the backbone of ``checkpoint`` (file or run folder) in format ``fmt`` to ``out``."""
    from twist import __version__
    from twist.serving import load_trained

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    out = Path(out)
    trained = load_trained(checkpoint, device="cpu", trust_pickle=trust_pickle)
    cfg, model, channels = trained.config, trained.model, trained.channels
    arch, cifar_stem = cfg.model.backbone, cfg.model.cifar_stem
    backbone = model.backbone.state_dict()
    feature_dim = int(model.feature_dim)
    vit = arch.startswith("vit_")
    if fmt == "torchvision":
        _check_resnet(arch, cifar_stem, channels, fmt, TORCHVISION_RESNETS)
        save_checkpoint(_detached(backbone), out)
        usage = (f"net = torchvision.models.{arch}(); net.fc = torch.nn.Identity(); "
                 f"net.load_state_dict(torch.load('{out}', weights_only=True), strict=True)")
    elif fmt == "timm":
        if vit:
            from twist.vit import DEFAULT_IMG_SIZE

            name = f"{arch}_patch{cfg.model.patch_size}_{DEFAULT_IMG_SIZE}"
        else:
            _check_resnet(arch, cifar_stem, 3, fmt, TORCHVISION_RESNETS)  # timm ResNets take in_chans
            name = arch
        extra = f", in_chans={channels}" if channels != 3 else ""
        save_checkpoint(_detached(backbone), out)
        usage = (f"net = timm.create_model('{name}', pretrained=False, num_classes=0{extra}); "
                 f"net.load_state_dict(torch.load('{out}', weights_only=True), strict=True)")
    elif fmt == "safetensors":
        info = trained.checkpoint.get("data", {})
        metadata = {
            "format": "pt", "twist_format": "twist-backbone/1", "twist_version": __version__,
            "arch": arch, "feature_dim": str(feature_dim), "in_channels": str(channels),
            "cifar_stem": json.dumps(cifar_stem), "patch_size": str(cfg.model.patch_size),
            "image_size": str(trained.image_size), "mean": json.dumps(info.get("mean")),
            "std": json.dumps(info.get("std")), "config": json.dumps(cfg.to_dict()),
        }
        save_safetensors(backbone, out, metadata)
        usage = (f"sd = safetensors.torch.load_file('{out}'); "
                 f"twist.backbones.build_backbone(ModelConfig(backbone='{arch}', ...)).load_state_dict(sd)")
    else:  # detectron2
        _check_resnet(arch, cifar_stem, channels, fmt, TORCHVISION_RESNETS + ("resnet50w2",))
        data = detectron2_bytes(backbone)
        atomic_write(out, lambda f: f.write(data))
        mean, std = (trained.eval_transform.mean, trained.eval_transform.std)
        pixels = lambda v: "[" + ",".join(f"{255 * float(x):.3f}" for x in v) + "]"  # noqa: E731
        usage = (f"MODEL.WEIGHTS {out} MODEL.PIXEL_MEAN {pixels(mean)} MODEL.PIXEL_STD {pixels(std)} "
                 f"INPUT.FORMAT RGB MODEL.RESNETS.STRIDE_IN_1X1 False")
    head_path = None
    if head_out is not None:
        head_path = export_head(trained, Path(head_out))
    return ExportResult(out, fmt, arch, feature_dim, len(backbone), usage, head_path)


def export_head(trained, path: Path) -> Path:
    """The projection head + NBS as safetensors (by suffix) or a torch file, with its sizes."""
    m = trained.config.model
    state = trained.model.head.state_dict()
    meta = {"feature_dim": int(trained.model.feature_dim), "hidden_dim": m.hidden_dim, "num_classes": m.num_classes,
            "activation": m.activation, "nbs": m.nbs, "layers": m.head_layers}
    if path.suffix == ".safetensors":
        return save_safetensors(state, path, {"format": "pt", "twist_format": "twist-head/1",
                                              **{k: json.dumps(v) for k, v in meta.items()}})
    return save_checkpoint({"state_dict": _detached(state), "meta": meta}, path)
