"""Loading a trained model back for evaluation, prediction, reports and export.

``load_trained`` rebuilds the network from the configuration stored in a twist checkpoint,
loads its weights (safely: tensors only), and returns it with the evaluation transform the
model was trained with (same image size and normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twist.augment import EvalTransform
from twist.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from twist.config import TwistConfig
from twist.model import TwistModel, build_model


@dataclass
class TrainedModel:
    model: TwistModel
    config: TwistConfig
    eval_transform: EvalTransform
    image_size: int
    channels: int
    device: torch.device
    precision: str
    class_names: list[str] | None
    path: Path
    checkpoint: dict[str, Any]

    @property
    def crop_size(self) -> int:
        """The ``crop_size`` to load photos with (twist.data.load_dataset): the global crop size
        when the model was trained on streamed photos or imported from the release (evaluation
        = shorter side to crop / 0.875, centre crop), else 0 (the training resize + centre crop)."""
        return self.config.augment.global_size if (self.checkpoint.get("data") or {}).get("eval_resize") else 0


def load_trained(path: str | Path, device: str = "auto", trust_pickle: bool = False,
                 precision: str = "fp32") -> TrainedModel:
    """Rebuild a model from a checkpoint file or run folder, in eval mode on ``device``."""
    from twist.runtime import resolve_device

    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a twist checkpoint (no 'config'/'model'); "
                              f"release files are imported with `twist import`")
    cfg = TwistConfig.from_dict(ckpt["config"])
    info = ckpt.get("data", {})
    channels = int(info.get("channels", 3))
    image_size = int(info.get("image_size") or cfg.train.image_size or cfg.augment.global_size)
    dev = resolve_device(device)
    model = build_model(cfg.model, in_channels=channels)
    if isinstance(ckpt.get("state"), dict) and ckpt["state"].get("heads_dropped") is True:
        model.drop_losing_heads()  # model.drop_heads_after: the checkpoint holds the winner only
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    transform = EvalTransform(cfg.augment.global_size, channels, info.get("mean"), info.get("std"))
    return TrainedModel(model, cfg, transform, image_size, channels, dev, precision, info.get("class_names"), path, ckpt)
