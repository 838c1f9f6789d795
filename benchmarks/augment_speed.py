"""Speed of the batched augmentation (twist.augment.MultiCropAugment).

    python benchmarks/augment_speed.py                      # CPU, torch's default threads
    python benchmarks/augment_speed.py --threads 2          # emulate a 2-core machine
    python benchmarks/augment_speed.py --device cuda --large

Prints, per configuration, the best and the median milliseconds of one call over --reps calls
(after warm-up). On CUDA every call is synchronised, so the numbers are the GPU time of one
batch. --large adds the paper's ResNet-50 recipes (256 px images, 2 x 224 + 12 x 96 crops).

    python benchmarks/augment_speed.py --threads 1 --photometric

times ``MultiCropAugment.photometric`` instead, the part of the pipeline that runs on the training
device when the photo loader cuts the views (``benchmarks/photo_loader.py``): uint8 views of the
vit-small (2 x 224 + 6 x 96) and rn50-twoview (2 x 224) recipes, batch 64, in ms per image, with
everything on and then with one step turned off at a time (what each step costs). On CPU with
glibc malloc keeping freed memory, as ``twist train`` sets it.

--colour picks how steps 2-7 run on a CPU (``MultiCropAugment(colour=...)``): ``auto`` (the
default: the compiled pass of twist.fused_colour when numba imports), ``fused`` or ``tensor``
(the batched tensor operations, as on a GPU); run both to compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch

from twist.augment import MultiCropAugment
from twist.config import AugmentConfig
from twist.presets import get_preset
from twist.runtime import keep_freed_cpu_memory


def _configs(large: bool) -> list[tuple[str, AugmentConfig, int, int]]:
    cifar = get_preset("cifar10").augment
    default = AugmentConfig()
    out = [
        ("crop+flip only, 2 x 32 bilinear", dataclasses.replace(
            cifar, jitter_p=0.0, grayscale_p=0.0, solarize_p=(0.0, 0.0, 0.0)), 32, 256),
        ("cifar10 preset: 2 x 32 bilinear, jitter, gray, solarize", cifar, 32, 256),
        ("AugmentConfig(): 2 x 32 bicubic, + blur (1, .1)", default, 32, 256),
        ("cifar10 preset + 6 x 16 locals (bilinear)", dataclasses.replace(cifar, num_local=6), 32, 256),
        ("AugmentConfig() + 6 x 16 locals (bicubic, blur)", dataclasses.replace(default, num_local=6), 32, 256),
    ]
    if large:
        out += [
            ("rn50-twoview: 2 x 224 from 256 px, batch 128", get_preset("rn50-twoview").augment, 256, 128),
            ("rn50-multicrop: 2 x 224 + 12 x 96 from 256 px, batch 128",
             get_preset("rn50-multicrop").augment, 256, 128),
        ]
    return out


def _time(fn, reps: int, device: torch.device) -> tuple[float, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, statistics.median(times) * 1e3


def _photometric(reps: int, device: torch.device, colour: str) -> None:
    """ms per image of ``photometric`` for the two photo recipes, all steps and one step off at a time."""
    off = {"everything on": {}, "without blur": dict(blur_p=(0.0, 0.0, 0.0)),
           "without colour jitter": dict(jitter_p=0.0), "without hue": dict(hue=0.0),
           "without jitter, grey, blur, solarize": dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                                                        solarize_p=(0.0, 0.0, 0.0))}
    batch = 64
    for preset in ("vit-small", "rn50-twoview"):
        base = get_preset(preset).augment
        sizes = [base.global_size] * 2 + [base.local_size] * base.num_local
        views = [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=device) for s in sizes]
        for label, change in off.items():
            aug = MultiCropAugment(dataclasses.replace(base, **change), 3, colour=colour)
            gen = torch.Generator().manual_seed(0)
            best, median = _time(lambda: aug.photometric(views, gen), reps, device)
            print(f"  {preset} photometric, {label:<40s} batch {batch}: best {best / batch:6.2f} ms per image   "
                  f"median {median / batch:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--large", action="store_true", help="add the 224 px ResNet-50 recipes")
    ap.add_argument("--resample", default="auto", choices=["auto", "grid", "separable"])
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's op table for each configuration")
    ap.add_argument("--colour", default="auto", choices=["auto", "fused", "tensor"],
                    help="steps 2-7 on a CPU: compiled per image (fused), tensor operations, or auto (see above)")
    ap.add_argument("--photometric", action="store_true",
                    help="time MultiCropAugment.photometric on the photo recipes' views instead (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.photometric:
        if device.type == "cpu":
            keep_freed_cpu_memory()
        print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
              f"colour={args.colour}")
        _photometric(args.reps, device, args.colour)
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"resample={args.resample}, colour={args.colour}")
    ref = torch.rand(256 * 2 * 3 * 32 * 32, device=device)  # one float32 pass over 2 views of a CIFAR batch
    best, _ = _time(lambda: ref.mul_(1.0), args.reps, device)
    print(f"  {'reference: in-place multiply of 256 x 2 x 3 x 32 x 32 floats':<60s}           best {best:7.3f} ms")
    for label, cfg, side, batch in _configs(args.large):
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=device)
        aug = MultiCropAugment(cfg, 3, resample=args.resample, colour=args.colour)
        gen = torch.Generator().manual_seed(0)
        best, median = _time(lambda: aug(images, gen), args.reps, device)
        print(f"  {label:<60s} batch {batch:4d}: best {best:7.2f} ms   median {median:7.2f} ms")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    aug(images, gen)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=24))


if __name__ == "__main__":
    main()
