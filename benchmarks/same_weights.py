"""Train a preset for N optimiser steps with the twist on PYTHONPATH and save the weights and
optimiser state, so that two checkouts can be compared bit for bit (a refactor that claims "no
behaviour change" shows it this way without a full-length run).

    OMP_NUM_THREADS=1 PYTHONPATH=OLD/src python benchmarks/same_weights.py /path/to/cifar10 cifar10 40 old
    OMP_NUM_THREADS=1 PYTHONPATH=NEW/src python benchmarks/same_weights.py /path/to/cifar10 cifar10 40 new
    python benchmarks/same_weights.py --compare old new

Both runs must use the same thread count (reductions are ordered per thread)."""
import sys
import tempfile
import time

import torch

if sys.argv[1] == "--compare":
    a, b = (torch.load(p + ".weights.pt", weights_only=True) for p in sys.argv[2:4])
    same_model = a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    same_opt = a["optimizer"].keys() == b["optimizer"].keys() and all(
        torch.equal(a["optimizer"][k][j], b["optimizer"][k][j]) for k in a["optimizer"] for j in a["optimizer"][k])
    print(f"weights identical: {same_model}; optimiser state identical: {same_opt}")
    sys.exit(0 if same_model and same_opt else 1)

try:  # the layout after the one-engine refactor, then the one before it
    from twist.presets import get_preset
except ImportError:
    from twist.config import get_preset
from twist.checkpoint import load_checkpoint
from twist.train import train

torch.set_num_threads(1)
data, preset, steps, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = tempfile.mkdtemp(prefix="same-weights-")
t = time.perf_counter()
train(get_preset(preset), data, out, progress=False, max_steps=steps)
ck = load_checkpoint(out + "/checkpoint.pt")
torch.save({"model": ck["model"], "optimizer": ck["optimizer"]["state"]}, name + ".weights.pt")
print(f"{name}: {ck['state']['global_step']} steps in {time.perf_counter() - t:.0f} s")
