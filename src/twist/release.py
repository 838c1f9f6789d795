"""Import of the authors' release checkpoints (METHOD.md section 10) as twist run folders.

The release saves two kinds of files:

- *full* training checkpoints: a dict with ``model`` (backbone + head state dict),
  ``backbone``, ``optimizer``, ``epoch``, ``args`` (a pickled ``argparse.Namespace``) and
  ``scaler``; runs with an EMA teacher add ``teacher`` and ``teacher_backbone``.
- *backbone-only* files: a bare state dict with torchvision ResNet names (without ``fc``) or
  timm ViT names. ``.safetensors`` files of a backbone are read too.

Head names come in two variants, both accepted::

    projection_heads.projection_head.{0,4}   Linear       -> head.projection_head.{0,4}
    projection_heads.projection_head.{1,5}   BatchNorm    -> head.projection_head.{1,5}
    projection_heads.last_linear             Linear       -> head.last_linear
    projection_heads.norm                    NBS stats    -> head.norm
    projection_heads.cls_heads.0.0           (old files)  -> head.last_linear
    projection_heads.cls_heads.0.1           (old files)  -> head.norm

The architecture (resnet18/34/50, resnet50w2, CIFAR stem, input channels, ViT-S/B and patch
size), the number of classes C and the hidden width H are read from tensor shapes; the
training recipe (loss weights, crops, optimiser, schedule, EMA, self-labeling) from the
release's ``args`` when the file has them. The result is a normal twist checkpoint
(``RUN_DIR/checkpoint.pt``, written atomically, plus ``RUN_DIR/config.json``) that
``twist eval / predict / report / export`` use directly and that ``twist train DATA --out
RUN_DIR`` continues to train (fresh optimiser, fresh schedule: the release's optimiser state
is not carried over, since its parameter groups do not map onto twist's).

Safety
------
Unpickling can execute code, and the release's ``args`` Namespace makes its files
non-tensor pickles. By default they are read with PyTorch's restricted unpickler
(``torch.load(weights_only=True)``), which builds only tensors, numbers, strings and plain
containers, with exactly one class added to its allowlist: ``argparse.Namespace``. That is safe
because the restricted unpickler only ever creates an allowlisted class with
``cls.__new__(cls)`` (``object.__new__``) and fills it with ``__dict__.update`` / ``setattr`` of
values that are themselves restricted to safe types; ``Namespace`` has no ``__new__``,
``__setstate__``, ``__reduce__`` or descriptors of its own, so nothing in the file chooses code to
run. Calling ``Namespace(*args)`` through REDUCE only accepts keyword arguments, which a
pickle cannot pass, so it fails. The Namespace is turned into a plain dict at once.
Any other global in the pickle (``os.system``, ``builtins.eval``, a custom class ...) makes the
load fail *before* anything is called; the error lists the globals (found by a scan that
does not execute the pickle) and names ``--trust-pickle`` for files the user trusts.
"""

from __future__ import annotations

import argparse
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twist.augment import IMAGENET_MEAN, IMAGENET_STD
from twist.checkpoint import CHECKPOINT_NAME, FORMAT, CheckpointError, save_checkpoint, unsafe_globals
from twist.io import write_text_atomic
from twist.config import ConfigError, TwistConfig
from twist.presets import PRESETS, get_preset

RELEASE_ARCHS = ("resnet50", "resnet50w2", "vit_small", "vit_base")
"""The architectures the release trained (the values ``--arch`` accepts)."""
_RECIPES = {"resnet50w2": "rn50w2", "vit_small": "vit-small", "vit_base": "vit-base"}
"""The preset whose recipe fills what a file's args do not say (ResNets: rn50-multicrop)."""

_HEAD_PREFIXES = {
    "projection_head.": "projection_head.",
    "last_linear.": "last_linear.",
    "norm.": "norm.",
    "cls_heads.0.0.": "last_linear.",   # older release files
    "cls_heads.0.1.": "norm.",
}


# ---------------------------------------------------------------------- safe reading
def _plain(obj: Any) -> Any:
    """Namespaces (anywhere in dicts and lists) become plain dicts."""
    if type(obj) is argparse.Namespace:
        return {k: _plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def read_release_file(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """The content of a release file as a dict, its ``args`` Namespace turned into a dict.

    Without ``trust_pickle`` nothing in the file can run code (see the module docstring);
    files that need more than tensors, plain containers and ``argparse.Namespace`` are refused
    with a :class:`CheckpointError` that names the offending globals and ``--trust-pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"release file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = [g for g in unsafe_globals(path) if g != "argparse.Namespace"]
        found = f"it refers to {', '.join(unsafe)}, " if unsafe else "it holds Python objects other than tensors, plain containers and argparse.Namespace, "
        raise CheckpointError(
            f"{path} was not loaded: {found}and unpickling it could execute code. The safe loader reads "
            f"the release's files (tensors + the args Namespace) without running anything. If you trust "
            f"this file, pass --trust-pickle (Python: trust_pickle=True)."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a dict of weights (found {type(obj).__name__})")
    return _plain(obj)


# ---------------------------------------------------------------------- architecture from shapes
@dataclass
class BackboneInfo:
    """What the shapes of a backbone state dict say about its architecture."""

    name: str                 # twist backbone name: resnet18/34/50, resnet50w2, vit_small, vit_base
    in_channels: int
    feature_dim: int
    cifar_stem: bool = False
    patch_size: int = 16
    img_size: int = 224       # ViT: side of the positional-embedding grid, in pixels


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def infer_backbone(sd: dict[str, torch.Tensor]) -> BackboneInfo:
    """The architecture of a backbone state dict (torchvision ResNet or timm ViT names)."""
    if "patch_embed.proj.weight" in sd:
        from twist.vit import DEFAULT_IMG_SIZE, VIT_ARCHS

        w = sd["patch_embed.proj.weight"]
        dim, cin, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
        depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
        arch = next((name for name, (d, n, _) in VIT_ARCHS.items() if (d, n) == (dim, depth)), None)
        if arch is None:
            known = ", ".join(f"{n} (dim {d}, depth {k})" for n, (d, k, _) in VIT_ARCHS.items())
            raise CheckpointError(f"ViT with embedding dim {dim} and depth {depth} is not a twist architecture; known: {known}")
        if "pos_embed" not in sd or "cls_token" not in sd:
            raise CheckpointError("ViT weights without pos_embed/cls_token are not supported")
        tokens = int(sd["pos_embed"].shape[1]) - 1
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise CheckpointError(f"ViT pos_embed holds {tokens} patch positions, not a square grid")
        if grid * patch != DEFAULT_IMG_SIZE:
            raise CheckpointError(f"ViT pos_embed is stored for {grid * patch} px images with patch {patch}; "
                                  f"twist's ViTs store it for {DEFAULT_IMG_SIZE} px")
        return BackboneInfo(arch, cin, dim, patch_size=patch, img_size=grid * patch)
    if "conv1.weight" in sd and "layer4.0.conv1.weight" in sd:
        w = sd["conv1.weight"]
        width, cin, k = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
        bottleneck = "layer1.0.conv3.weight" in sd
        blocks = [1 + max(int(key.split(".")[1]) for key in sd if key.startswith(f"layer{i}.")) for i in range(1, 5)]
        name = None
        if not bottleneck and width == 64:
            name = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}.get(tuple(blocks))
        elif bottleneck and blocks == [3, 4, 6, 3]:
            name = {64: "resnet50", 128: "resnet50w2"}.get(width)
        if name is None:
            raise CheckpointError(f"ResNet with stem width {width}, blocks {blocks} "
                                  f"({'bottleneck' if bottleneck else 'basic'}) is not a twist architecture "
                                  f"(resnet18/34/50, resnet50w2)")
        last = f"layer4.{blocks[3] - 1}.bn{3 if bottleneck else 2}.weight"
        return BackboneInfo(name, cin, int(sd[last].shape[0]), cifar_stem=(k == 3))
    some = ", ".join(list(sd)[:5])
    raise CheckpointError(f"unrecognised backbone weights (first keys: {some}); expected torchvision ResNet "
                          f"or timm ViT parameter names")


# ---------------------------------------------------------------------- splitting a release file
@dataclass
class ReleaseWeights:
    """A release file split into backbone and head state dicts (twist head names)."""

    kind: str                                   # "full" or "backbone"
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None
    teacher_backbone: dict[str, torch.Tensor] | None = None
    teacher_head: dict[str, torch.Tensor] | None = None
    epoch: int | None = None                    # epochs completed, for full files
    args: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _split_model(sd: dict[str, torch.Tensor], what: str, notes: list[str]) -> tuple[dict, dict]:
    """``backbone.*`` and ``projection_heads.*`` of a release model state dict, renamed for twist."""
    sd = _strip(sd, "module.")
    backbone, head, other = {}, {}, []
    for key, value in sd.items():
        if key.startswith("backbone."):
            backbone[key[len("backbone."):]] = value
        elif key.startswith("projection_heads."):
            rest = key[len("projection_heads."):]
            for old, new in _HEAD_PREFIXES.items():
                if rest.startswith(old):
                    head[new + rest[len(old):]] = value
                    break
            else:
                other.append(key)
        else:
            other.append(key)
    if other:
        notes.append(f"ignored {len(other)} {what} key(s) twist has no place for: {', '.join(other[:4])}"
                     + (" ..." if len(other) > 4 else ""))
    if not backbone:
        raise CheckpointError(f"the {what} state dict has no backbone.* weights")
    return backbone, head


def split_release(obj: dict[str, Any], use_teacher: bool = False) -> ReleaseWeights:
    """Backbone and head weights of a release file's content (full or backbone-only)."""
    notes: list[str] = []
    if "model" in obj and isinstance(obj["model"], dict):
        backbone, head = _split_model(obj["model"], "model", notes)
        t_backbone = t_head = None
        if isinstance(obj.get("teacher"), dict) and obj["teacher"]:
            t_backbone, t_head = _split_model(obj["teacher"], "teacher", notes)
        if use_teacher:
            if t_backbone is None:
                raise CheckpointError("the file has no EMA teacher weights ('teacher'); import without --use-teacher")
            backbone, head, t_backbone, t_head = t_backbone, t_head, backbone, head
            notes.append("model weights taken from the EMA teacher")
        epoch = obj.get("epoch")
        epoch = int(epoch) + 1 if isinstance(epoch, int) else None  # the release saves the 0-based epoch index
        args = obj.get("args") if isinstance(obj.get("args"), dict) else None
        return ReleaseWeights("full", backbone, head or None, t_backbone, t_head or None, epoch, args, notes)
    if use_teacher:
        if _is_tensor_dict(obj.get("teacher_backbone")):
            obj = obj["teacher_backbone"]
        else:
            raise CheckpointError("the file has no EMA teacher weights; import without --use-teacher")
    for wrapper in ("state_dict", "backbone"):
        if wrapper in obj and _is_tensor_dict(obj[wrapper]):
            notes.append(f"weights read from the file's '{wrapper}' entry")
            obj = obj[wrapper]
            break
    if not _is_tensor_dict(obj):
        keys = ", ".join(map(str, list(obj)[:6]))
        raise CheckpointError(f"not a release checkpoint: expected a 'model' entry or a state dict of tensors, "
                              f"found keys {keys}")
    sd = _strip(_strip(obj, "module."), "backbone.")
    dropped = [k for k in sd if k.split(".")[0] in ("fc", "head")]
    if dropped:
        notes.append(f"dropped the classifier ({', '.join(dropped)})")
    sd = {k: v for k, v in sd.items() if k not in dropped}
    return ReleaseWeights("backbone", sd, None, notes=notes)


# ---------------------------------------------------------------------- config from shapes + args
def _set(cfg: TwistConfig, key: str, value: Any, notes: list[str]) -> None:
    from twist.config import set_field

    try:
        set_field(cfg, key, value)
    except ConfigError as exc:
        notes.append(f"release setting for {key} not used: {exc}")


def _base_lr(args: dict[str, Any], key: str) -> float | None:
    """The per-256 learning rate: the release saves args after scaling lr by batch x world / 256."""
    lr, batch, world = args.get(key), args.get("batch_size"), args.get("world_size")
    if isinstance(lr, (int, float)) and isinstance(batch, int) and isinstance(world, int) and batch > 0 and world > 0:
        return float(lr) * 256.0 / (batch * world)
    return None


def release_config(info: BackboneInfo, num_classes: int, hidden_dim: int, nbs: bool,
                   args: dict[str, Any] | None, notes: list[str]) -> TwistConfig:
    """A twist configuration for imported weights: architecture from shapes, recipe from args."""
    preset = _RECIPES.get(info.name, "rn50-multicrop")
    cfg = get_preset(preset if preset in PRESETS else "rn50-multicrop")
    cfg.preset = "release-import"
    m = cfg.model
    m.backbone, m.cifar_stem, m.num_classes, m.hidden_dim, m.nbs = info.name, info.cifar_stem, num_classes, hidden_dim, nbs
    m.patch_size = info.patch_size
    if args:
        a = args
        if a.get("act") in ("relu", "gelu"):
            m.activation = a["act"]
        if isinstance(a.get("drop_path"), (int, float)):
            _set(cfg, "model.drop_path", a["drop_path"], notes)
        if isinstance(a.get("bunch_size"), int):
            _set(cfg, "model.bunch_size", a["bunch_size"], notes)
        for src, dst in (("tau", "loss.tau"), ("EPS", "loss.eps"), ("lam2", "loss.beta")):
            if isinstance(a.get(src), (int, float)):
                _set(cfg, dst, a[src], notes)
        if isinstance(a.get("lam1"), (int, float)):
            _set(cfg, "loss.alpha", 1.0 + a["lam1"], notes)
        if isinstance(a.get("img_size"), int):
            _set(cfg, "augment.global_size", a["img_size"], notes)
        if a.get("aug") is not None:
            _set(cfg, "augment.num_local", a.get("local_crops_number", 0) if a["aug"] == "multicrop" else 0, notes)
        if all(isinstance(a.get(k), (int, float)) for k in ("min1", "max1")):
            _set(cfg, "augment.global_scale", (a["min1"], a["max1"]), notes)
        if all(isinstance(a.get(k), (int, float)) for k in ("min2", "max2")):
            _set(cfg, "augment.local_scale", (a["min2"], a["max2"]), notes)
        optim = {"lars": "lars", "lars_oss": "lars", "sgd": "sgd", "admw": "adamw", "adamw": "adamw"}.get(a.get("optim"))
        if optim:
            _set(cfg, "optim.name", optim, notes)
        if (lr := _base_lr(a, "lr")) is not None:
            _set(cfg, "optim.lr", lr, notes)
        for src, dst in (("weight_decay", "optim.weight_decay"), ("weight_decay_end", "optim.weight_decay_end"),
                         ("warmup_epochs", "optim.warmup_epochs"), ("clip_norm", "optim.clip_grad"),
                         ("momentum_start", "ema.momentum"), ("momentum_end", "ema.momentum_end"),
                         ("quantile", "selflabel.quantile_start"), ("quantile_end", "selflabel.quantile_end"),
                         ("sl_warmup_epochs", "selflabel.warmup_epochs"), ("batch_size", "train.batch_size"),
                         ("seed", "train.seed")):
            if isinstance(a.get(src), (int, float)) and not isinstance(a.get(src), bool):
                _set(cfg, dst, a[src], notes)
        if "use_momentum_encoder" in a:
            cfg.ema.enabled = bool(a["use_momentum_encoder"])
        if (lr := _base_lr(a, "lr_sl")) is not None:
            _set(cfg, "selflabel.lr", lr, notes)
        epochs, twist_epochs = a.get("epochs"), a.get("mme_epochs")
        if isinstance(epochs, int):
            twist_epochs = twist_epochs if isinstance(twist_epochs, int) and 0 < twist_epochs <= epochs else epochs
            _set(cfg, "train.epochs", twist_epochs, notes)
            _set(cfg, "selflabel.epochs", epochs - twist_epochs, notes)
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"the configuration read from the release file is not valid: {exc}") from None


def _json_safe(value: Any) -> Any:
    """A copy of the release args that loads with weights_only and prints as JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if torch.is_tensor(value):
        return f"<tensor {tuple(value.shape)}>"
    return repr(value)


# ---------------------------------------------------------------------- the import
def _twist_state_dict(model: torch.nn.Module, backbone: dict, head: dict | None, what: str) -> dict:
    """The model's state dict with the release's backbone (and head) values, checked key by key."""
    target = model.state_dict()
    incoming = {"backbone." + k: v for k, v in backbone.items()}
    if head is not None:
        incoming.update({"head." + k: v for k, v in head.items()})
    parts = ("backbone.", "head.") if head is not None else ("backbone.",)
    missing = [k for k in target if k.startswith(parts) and k not in incoming and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in incoming if k not in target]
    wrong = [f"{k} {tuple(incoming[k].shape)} vs {tuple(target[k].shape)}" for k in incoming
             if k in target and incoming[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                           for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if items)
        raise CheckpointError(f"the {what} weights do not fit the inferred twist model ({detail})")
    out = dict(target)
    for k, v in incoming.items():
        out[k] = v.to(dtype=target[k].dtype).clone()
    return out


@dataclass
class ImportResult:
    path: Path
    config: TwistConfig
    kind: str
    notes: list[str]


def import_release(path: str | Path, out: str | Path, *, arch: str | None = None, num_classes: int | None = None,
                   trust_pickle: bool = False, use_teacher: bool = False, force: bool = False) -> ImportResult:
    """Import a release checkpoint into the run folder ``out`` as a twist checkpoint.

    Args:
        path: a release file (full training checkpoint or backbone-only state dict).
        out: run folder to create; refuses to overwrite a checkpoint unless ``force``.
        arch: expected architecture (``resnet50``, ``resnet50w2``, ``vit_small``, ``vit_base``);
            an error if the shapes say otherwise. Default: inferred.
        num_classes: for backbone-only files, C of the fresh head (default 1000); for full
            files it must agree with the file's head.
        trust_pickle: load the file with full unpickling (can execute code; trusted files only).
        use_teacher: take the EMA teacher's weights as the model (full files of EMA runs).
    """
    from twist.model import build_model

    out = Path(out)
    target = out / CHECKPOINT_NAME
    if target.exists() and not force:
        raise CheckpointError(f"{target} already exists; choose another --out folder (or --force to overwrite it)")
    if arch is not None and arch not in RELEASE_ARCHS + ("resnet18", "resnet34"):
        raise ConfigError(f"unknown --arch '{arch}'; valid: {', '.join(RELEASE_ARCHS)}")
    weights = split_release(read_release_file(path, trust_pickle=trust_pickle), use_teacher=use_teacher)
    notes = weights.notes
    info = infer_backbone(weights.backbone)
    if arch is not None and arch != info.name:
        raise CheckpointError(f"--arch {arch} given, but the weights' shapes are those of a {info.name}")
    head, args = weights.head, weights.args or {}
    if head is not None:
        for key in ("projection_head.0.weight", "projection_head.4.weight", "last_linear.weight"):
            if key not in head:
                raise CheckpointError(f"the release head has no {key}; head keys: {', '.join(list(head)[:6])}")
        if "projection_head.1.running_mean" not in head:
            raise CheckpointError("the release head normalises with LayerNorm or nothing (proj_norm != bn); "
                                  "twist's head uses BatchNorm, so this head cannot be imported "
                                  "(its backbone can: save the file's 'backbone' entry on its own)")
        hidden = int(head["projection_head.0.weight"].shape[0])
        classes = int(head["last_linear.weight"].shape[0])
        if num_classes is not None and num_classes != classes:
            raise CheckpointError(f"--num-classes {num_classes} given, but the file's head has C={classes}")
        if int(head["projection_head.0.weight"].shape[1]) != info.feature_dim:
            raise CheckpointError(f"the head expects {head['projection_head.0.weight'].shape[1]}-d features, "
                                  f"the backbone gives {info.feature_dim}")
        nbs = "norm.running_mean" in head
    else:
        classes = num_classes if num_classes is not None else int(args.get("dim", 1000))
        hidden = int(args.get("hid_dim", 4096))
        nbs = True
        notes.append(f"backbone-only file: fresh head with C={classes}, H={hidden} (train it, or its predictions are arbitrary)")
    cfg = release_config(info, classes, hidden, nbs, args, notes)
    model = build_model(cfg.model, in_channels=info.in_channels)
    state = _twist_state_dict(model, weights.backbone, head, "model")
    teacher = None
    if weights.teacher_backbone is not None and cfg.ema.enabled:
        teacher = _twist_state_dict(model, weights.teacher_backbone, weights.teacher_head, "teacher")
    model.load_state_dict(state, strict=True)  # proves the checkpoint rebuilds
    # the release normalises with the ImageNet statistics; other channel counts get twist's defaults (None)
    mean, std = (list(IMAGENET_MEAN), list(IMAGENET_STD)) if info.in_channels == 3 else (None, None)
    source = str(Path(path).resolve())
    save_checkpoint({
        "format": FORMAT,
        "model": state,
        "teacher": teacher,
        "optimizer": None,   # the release's optimiser state does not map onto twist's parameter groups
        "scaler": None,
        "state": {"epoch": 0, "step_in_epoch": 0, "global_step": 0},
        "rng_per_rank": {},
        "config": cfg.to_dict(),
        "data": {"channels": info.in_channels, "mean": mean, "std": std, "image_size": cfg.augment.global_size,
                 "eval_resize": round(cfg.augment.global_size / 0.875),  # the release's Resize 256 + CenterCrop 224
                 "class_names": None, "source": f"release:{source}"},
        "import": {"source": source, "kind": weights.kind, "release_epochs": weights.epoch,
                   "head": "release" if head is not None else "fresh", "teacher": use_teacher,
                   "args": _json_safe(weights.args) if weights.args else None, "notes": list(notes)},
    }, target)
    write_text_atomic(out / "config.json", cfg.to_json() + "\n")
    return ImportResult(target, cfg, weights.kind, notes)


def summary(result: ImportResult) -> str:
    """One human-readable paragraph about an import (for the CLI)."""
    m = result.config.model
    lines = [f"imported {result.kind} release checkpoint -> {result.path}",
             f"  {m.backbone}{' (cifar stem)' if m.cifar_stem else ''}, head H={m.hidden_dim}, C={m.num_classes}, "
             f"activation {m.activation}, NBS {'on' if m.nbs else 'off'}"]
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)
