"""The full TWIST step fed by the photo loader, against the backbone-only ceiling, on one GPU;
the loader's JPEGs decoded by its CPU workers (train.decode=cpu) and on the GPU (train.decode=gpu).

    python benchmarks/gpu_check.py                         # what benchmarks/gpu_check.sh runs
    python benchmarks/gpu_check.py --device cpu --backbone small_cnn --batch 8 --steps 2 --warmup 1 --workers 1 --photos 40   # a smoke run

Recipe: the release's ResNet-50 multi-crop (rn50-multicrop preset) with 2 x 224 + 6 x 96 views,
batch --batch (128), bf16 autocast (fp32 on a CPU without bf16), channels_last.
- ceiling: the backbone alone, forward + backward, one call per crop resolution, on ready
  tensors of the views' shapes already on the device;
- full: a streamed synthetic photo folder (benchmarks/photo_loader.py makes it) read by
  ``batch_loader(views=...)`` with --workers DataLoader workers and pinned memory, views moved
  to the device, ``MultiCropAugment.photometric`` there, ``twist.stage.train_step`` (head, loss,
  backward, optimiser). The target in issue 16 is full >= 0.9 x ceiling.
- full, decode=gpu: the same, with ``batch_loader(decode_device=device)``: the workers only
  read the files and draw the crop boxes; the JPEGs are decoded together on the device
  (torchvision.io.decode_jpeg, nvJPEG) and each box cut and resized there
  (twist.data.device_decode).
- agreement: one batch's views both ways (same seed: same boxes), mean and max absolute
  difference in grey levels (nvJPEG and libjpeg-turbo may round their IDCT differently; on a
  CPU device they decode identically and the views differ by rounding, or by the reduced
  JPEG decode against area averaging for images much larger than their views).
Prints images/s of each, their ratios, and one JSON line. Not run on a GPU yet (none was lent
to the sessions that wrote it); the CPU smoke run above is what was tested (on a CPU device the
decode=gpu leg runs the same code and is slower: float32 resizes, no nvJPEG).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_loader import IMAGENET_STATS, make_photos  # noqa: E402

from twist.augment import MultiCropAugment  # noqa: E402
from twist.presets import get_preset  # noqa: E402
from twist.data import ViewPlan, batch_loader, load_dataset  # noqa: E402
from twist.loss import TwistLoss  # noqa: E402
from twist.model import build_model  # noqa: E402
from twist.optim import build_optimizer  # noqa: E402
from twist.runtime import autocast_context, resolve_device, resolve_precision  # noqa: E402
from twist.stage import train_step  # noqa: E402


def _timed(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--photos", type=int, default=4000)
    ap.add_argument("--work", default="/tmp/twist_gpu_check")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    cfg = get_preset("rn50-multicrop")
    cfg.model.backbone = args.backbone
    cfg.augment.num_local = 6
    root = Path(args.work) / "photos"
    make_photos(root, args.photos)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=3).to(device).to(memory_format=torch.channels_last).train()
    sizes = [cfg.augment.global_size] * 2 + [cfg.augment.local_size] * cfg.augment.num_local
    ready = [torch.randn(args.batch * 2, 3, sizes[0], sizes[0], device=device),
             torch.randn(args.batch * cfg.augment.num_local, 3, sizes[-1], sizes[-1], device=device)]
    ready = [x.contiguous(memory_format=torch.channels_last) for x in ready]

    def ceiling() -> None:
        model.backbone.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            out = sum(model.backbone(x).float().sum() for x in ready)
        out.backward()

    ceiling_s = _timed(ceiling, args.steps, args.warmup, device)
    ds = load_dataset(str(root), "train", max_memory_gb=1e-9, progress=False, crop_size=cfg.augment.global_size)
    augment = MultiCropAugment(cfg.augment, 3, *IMAGENET_STATS)
    criterion = TwistLoss(cfg.loss.alpha, cfg.loss.beta, cfg.loss.tau, cfg.loss.eps)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr * args.batch / 256)
    gen = torch.Generator().manual_seed(0)
    plan = ViewPlan.from_augment(cfg.augment, 0)

    def loader(epoch: int, decode_device: torch.device | None):
        return batch_loader(ds, args.batch, shuffle=True, drop_last=True, seed=0, epoch=epoch,
                            num_workers=args.workers, pin_memory=device.type == "cuda", views=plan,
                            decode_device=decode_device)

    def full_step(decode_device: torch.device | None):
        epochs, batches = iter(range(10**6)), iter(())

        def full() -> None:
            nonlocal batches
            views = next(batches, None)
            while views is None:  # a new epoch when the folder is used up
                batches = iter(loader(next(epochs), decode_device))
                views = next(batches, None)
            cut = [v.to(device, non_blocking=True) for v in views[0]]  # already there under decode=gpu
            out = [v.contiguous(memory_format=torch.channels_last) for v in augment.photometric(cut, gen)]
            train_step(model, criterion, optimizer, out, device=device, precision=precision)
        return full

    full_s = _timed(full_step(None), args.steps, args.warmup, device)
    gpu_decode_s = _timed(full_step(device), args.steps, args.warmup, device)
    (cpu_views, _), = itertools.islice(loader(0, None), 1)
    (gpu_views, _), = itertools.islice(loader(0, device), 1)
    diffs = [(a.to(device).float() - b.float()).abs() for a, b in zip(cpu_views, gpu_views)]
    ips = lambda s: round(args.steps * args.batch / s, 2)  # noqa: E731
    result = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
              "precision": precision, "backbone": args.backbone, "batch": args.batch, "views": len(sizes),
              "workers": args.workers, "ceiling_ips": ips(ceiling_s), "full_ips": ips(full_s),
              "full_gpu_decode_ips": ips(gpu_decode_s),
              "views_mean_abs_diff": round(float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs)), 3),
              "views_max_abs_diff": int(max(d.max() for d in diffs))}
    result["full_over_ceiling"] = round(result["full_ips"] / result["ceiling_ips"], 3)
    result["gpu_decode_over_ceiling"] = round(result["full_gpu_decode_ips"] / result["ceiling_ips"], 3)
    result["gpu_decode_over_cpu_decode"] = round(result["full_gpu_decode_ips"] / result["full_ips"], 3)
    print(f"ceiling {result['ceiling_ips']} img/s, full step with the photo loader {result['full_ips']} img/s: "
          f"{result['full_over_ceiling']} of the ceiling (target >= 0.9)", file=sys.stderr)
    print(f"decode=gpu: full step {result['full_gpu_decode_ips']} img/s, {result['gpu_decode_over_ceiling']} of the "
          f"ceiling, {result['gpu_decode_over_cpu_decode']} x decode=cpu; its views differ from decode=cpu's by "
          f"{result['views_mean_abs_diff']} grey levels on average (max {result['views_max_abs_diff']})", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
