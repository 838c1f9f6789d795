"""Training images per second of the CPU photo recipe's candidate backbones (twist.autopreset).

    OMP_NUM_THREADS=1 python benchmarks/photo_backbone_speed.py [--threads 1]

Batch 64, two views of random tensors, the photo-cpu heads (C=10 x 5 heads + an over-clustering
head, hidden 256), channels-last as ``twist train`` lays them out on a CPU, in the precision it
would pick there: forward, a stand-in loss, backward and an SGD step; the best of three timed
steps after one warm-up step (twist.autopreset.measure_images_per_s, the same timing the
default uses to fit its epochs). Why the stride-2 small convnet at 64 px: see docs/results.md,
"The photo default".
"""

import argparse

import torch

from twist.autopreset import measure_images_per_s
from twist.config import apply_overrides
from twist.presets import get_preset

CANDIDATES = [
    ("small convnet, 32 px (cifar10)", ["augment.global_size=32", "model.small_cnn_stride=1"]),
    ("small convnet, stride-2 stem, 64 px (photo-cpu)", []),
    ("small convnet, 64 px", ["model.small_cnn_stride=1"]),
    ("ResNet-18, 64 px", ["model.backbone=resnet18"]),
]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name, overrides in CANDIDATES:
        cfg = apply_overrides(get_preset("photo-cpu"), ["train.batch_size=64", *overrides])
        rate = measure_images_per_s(cfg, channels=3, steps=3)
        print(f"{name}: {rate:.1f} images/s ({args.threads} thread(s), 2 views, forward + backward + SGD)")
