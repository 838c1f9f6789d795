"""Training images per second of the CPU photo recipe's candidate backbones (twist.autopreset).

    OMP_NUM_THREADS=1 python benchmarks/photo_backbone_speed.py

One thread, batch 64, two views of random tensors, the photo-cpu heads (C=10 x 5 heads + an
over-clustering head, hidden 256): forward, a stand-in loss, backward and an SGD step; the best
of three timed steps after one warm-up step. Why ResNet-18 and not the small convnet for photos
at 64 px: see docs/results.md, "The photo default".
"""

import time

import torch

from twist.config import ModelConfig
from twist.model import build_model

torch.set_num_threads(1)
for backbone, size in [("small_cnn", 64), ("resnet18", 64), ("small_cnn", 96), ("resnet18", 96)]:
    model = build_model(ModelConfig(backbone=backbone, small_cnn_width=32, num_classes=10, hidden_dim=256,
                                    num_heads=5, overcluster_classes=100), in_channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    views = [torch.randn(64, 3, size, size) for _ in range(2)]
    times = []
    for _ in range(4):
        t = time.perf_counter()
        loss = sum(z.float().logsumexp(1).mean() for z in model(views))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    print(f"{backbone} {size} px: {64 / min(times[1:]):.1f} images/s (1 thread, 2 views, forward + backward + SGD)")
