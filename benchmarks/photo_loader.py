"""Speed of twist's photo loader against a release-style loader, and start-up on a large tree.

    python benchmarks/photo_loader.py                  # synthetic ImageNet-like folder (made once)
    python benchmarks/photo_loader.py --data DIR       # your own folder of class sub-folders

Both loaders read the same files with the same number of DataLoader workers (--workers, 1 by
default) and batches of --batch images:
- release-style: torchvision ``ImageFolder`` with the release's per-image PIL transforms
  (RandomResizedCrop bicubic, horizontal flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8,
  RandomGrayscale 0.2, PIL Gaussian blur, solarization, ToTensor, Normalize), written here from
  the release's description (bytedance/TWIST augmentation.py);
- twist: a streamed folder, views cut at decode time in the worker (``batch_loader(views=...)``),
  then ``MultiCropAugment.photometric`` on the batch in the main process, as training runs it.
A third figure times twist's loader without the photometric ops: the CPU's share when they run
on a GPU, as they do in GPU training. Recipes: the release multi-crop one (2 x 224 + 6 x 96, the vit-small preset's crops) and two
views (2 x 224, the rn50-twoview preset's crops). "Per core" = images per CPU-second of all
processes (main + workers, from getrusage), so a loader that keeps two cores busy is not
credited twice; wall-clock images/s are printed too. Each timing includes its DataLoader's start
(worker processes); twist's photometric call is made once on a batch of blank views before its
timing, as the once-per-process costs of a training run are (numba loading its compiled kernels,
the first touch of the output buffers: 0.4-0.7 s, which on 320 images would be 1-2 ms per image).

Start-up: a tree of --tree-files one-byte ``.jpg`` files (1000 per folder) is listed by
``load_dataset`` as a streamed folder (scan=list; nothing is opened except a 64-file header
sample) and by a plain recursive ``os.scandir`` walk; the best of 7 rounds that call the three
in turn, warm cache. The auto start-up is what ``twist train TREE`` without --preset does before
its first step: the recipe's look at the data (``summarize_data``: the listing and 16 headers)
and the load, which takes that listing instead of walking the tree again. Then a second load
with the run's index counts how many times the tree is listed again (should be 0).

Memory (Linux): trees of --memory-files and --tree-files image files (hard links to a few small
JPEGs, 1000 per folder) are each loaded as a streamed folder and read for one whole epoch by
two DataLoader workers cutting the photo-cpu recipe's views, each in a fresh process; it records
the index's own bytes (paths and labels), the training process's anonymous memory after the
epoch, and the peak private memory of any worker (``/proc/PID/smaps_rollup``, sampled every
50 ms). Before the epoch the probe hands the heap's freed pages back (``malloc_trim``): they hold
the listing's temporaries (about twice the index), which a training run's heap reuses, and
which forked workers would otherwise count as theirs once the parent rewrites them. ``*_bytes_per_image`` are the growths from the smaller tree to the larger one per added
image: a loader whose memory grows only by its index has the process's growth near the index's
and the workers' near 0 (a worker that copied the index as it read it would grow by as much).
The workers' peaks move by about 2 MB from run to run (their decoding buffers, the heap
settling over their first ~200 batches; hence 50,000 files in the smaller tree), so the headline
``worker_bytes_per_image`` comes from a cleaner probe: a child forked before the epoch reads
every path once in a shuffled order and nothing else (a list of ``str`` grows it by about 110
bytes per path, one copied string each).

The last line of stdout is one JSON object with multicrop_speedup, twoview_speedup,
startup_over_scandir, auto_startup_over_scandir, worker_bytes_per_image,
main_over_index_growth and the raw figures (``--part`` measures one of the three only).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from twist.autopreset import summarize_data
from twist.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment
from twist.presets import get_preset
from twist.data import ViewPlan, batch_loader, load_dataset
from twist.runtime import keep_freed_cpu_memory

IMAGENET_STATS = (IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------- synthetic data
def make_photos(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    """``count`` JPEGs (quality 90) in ``classes`` folders, ImageNet-like sizes (median about
    500 x 375: mostly 4:3 landscape, some portrait and square, the longer side log-normal around
    500) with content that does not compress away: a smooth random field plus pixel noise."""
    marker = root / f".made-{count}-{classes}-{seed}"
    if marker.exists():
        return
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        long_side = int(np.clip(rng.lognormal(np.log(500), 0.25), 160, 1400))
        shape = rng.choice([4 / 3, 3 / 4, 1.0, 3 / 2], p=[0.6, 0.15, 0.1, 0.15])
        w, h = (long_side, round(long_side / shape)) if shape >= 1 else (round(long_side * shape), long_side)
        coarse = rng.random((max(2, h // 24), max(2, w // 24), 3)) * 255
        field = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            root / f"class{i % classes:02d}" / f"img{i:05d}.jpg", quality=90)
    marker.touch()


def make_tree(root: Path, files: int, per_folder: int = 1000) -> None:
    marker = root.parent / f".{root.name}-made-{files}"  # outside the tree: the walks count every entry
    if marker.exists():
        return
    for i in range(files):
        folder = root / f"n{i // per_folder:05d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"f{i:07d}.jpg", "wb") as f:
            f.write(b"\xff")
    marker.touch()


def make_link_tree(root: Path, files: int, per_folder: int = 1000) -> None:
    """``files`` small JPEGs (96 x 72) in folders of ``per_folder``: hard links to one file per
    50,000 (a file system's link limit), so a large tree costs no disk and decodes fast."""
    marker = root.parent / f".{root.name}-made-{files}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        source = root.parent / f".{root.name}-source-{i // 50_000}.jpg"
        if i % 50_000 == 0:
            Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(source, quality=90)
        folder = root / f"n{i // per_folder:05d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"img{i:07d}.jpg"
        if not target.exists():
            os.link(source, target)
    marker.touch()


# ---------------------------------------------------------------------- release-style transforms
class _Blur:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, im: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return im.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return im


class _Solarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, im: Image.Image) -> Image.Image:
        return ImageOps.solarize(im) if random.random() < self.p else im


def release_views(global_scale, local_scale, num_local: int, blur=(1.0, 0.1, 0.5), solar=(0.0, 0.2, 0.0)):
    """The release's per-image multi-crop transform (num_local=0: its two-view variant)."""
    from torchvision import transforms as T

    colour = [T.RandomHorizontalFlip(0.5),
              T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
              T.RandomGrayscale(0.2)]
    tail = [T.ToTensor(), T.Normalize(*IMAGENET_STATS)]

    def view(size, scale, b, s):
        return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                          *colour, _Blur(b), _Solarize(s), *tail])

    chain = [view(224, global_scale, blur[0], solar[0]), view(224, global_scale, blur[1], solar[1])]
    chain += [view(96, local_scale, blur[2], solar[2])] * num_local

    def apply(im):
        return [t(im) for t in chain]

    return apply


# ---------------------------------------------------------------------- timing
def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(run) -> dict:
    """Run ``run()`` (returns the number of images) and time it: wall and CPU of all processes."""
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = run()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {"images": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "images_per_s": round(n / wall, 2), "images_per_cpu_s": round(n / cpu, 2)}


def release_loader(root: str, transform, subset: list[int], batch: int, workers: int) -> dict:
    from torchvision.datasets import ImageFolder

    ds = torch.utils.data.Subset(ImageFolder(root, transform=transform), subset)

    def run() -> int:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
        n = 0
        for views, _ in loader:
            n += views[0].shape[0]
        return n

    return _measure(run)


def twist_loader(root: str, aug_cfg, subset_size: int, batch: int, workers: int, photometric: bool = True,
                 colour: str = "auto") -> dict:
    ds = load_dataset(root, "train", image_size=aug_cfg.global_size, max_memory_gb=1e-9, progress=False,
                      crop_size=aug_cfg.global_size)
    ds.paths, ds.labels = ds.paths[:subset_size], ds.labels[:subset_size] if ds.labels is not None else None
    plan = ViewPlan.multicrop(aug_cfg.global_size, aug_cfg.local_size, aug_cfg.num_local, aug_cfg.global_scale,
                              aug_cfg.local_scale, aug_cfg.ratio, aug_cfg.interpolation, 0)
    augment = MultiCropAugment(aug_cfg, ds.channels, *IMAGENET_STATS, colour=colour)
    gen = torch.Generator().manual_seed(0)
    if photometric:  # once per process, not per image: numba loads (or compiles) the kernels, memory is touched
        augment.photometric([torch.zeros((batch, ds.channels, s, s), dtype=torch.uint8) for s in plan.sizes], gen)

    def run() -> int:
        n = 0
        for views, _ in batch_loader(ds, batch, shuffle=True, drop_last=False, seed=0, epoch=0,
                                     num_workers=workers, views=plan):
            if photometric:
                views = augment.photometric(views, gen)
            n += views[0].shape[0]
        return n

    return _measure(run)


def startup(tree: Path, work: Path) -> dict:
    import twist.data.folder as folder_module

    def scandir_walk() -> int:
        count, stack = 0, [str(tree)]
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir():
                        stack.append(e.path)
                    else:
                        count += 1
        return count

    def best(*fns, rounds: int = 7) -> list[float]:
        """The best time of each of ``fns`` over ``rounds`` rounds that call them in turn: a walk
        of 100,000 entries takes about 0.1 s, where this VM's noise moves a single timing by
        half (interleaving gives each the same share of the noisy moments)."""
        times = [[] for _ in fns]
        for _ in range(rounds):
            for fn, own in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                own.append(time.perf_counter() - t0)
        return [min(own) for own in times]

    def load(**extra):  # a streamed folder (nothing fits 1e-9 GiB), as a photo run loads it
        return load_dataset(str(tree), "train", image_size=224, max_memory_gb=1e-9, progress=False, crop_size=224,
                            **extra)

    def twist_list() -> None:
        load()

    def twist_auto() -> None:  # `twist train TREE` without --preset: the recipe's look, then the load
        load(listing=summarize_data(str(tree)).listing)

    index = work / "index.json"
    index.unlink(missing_ok=True)
    scandir_s, twist_s, auto_s = best(scandir_walk, twist_list, twist_auto)
    load(index_path=index)  # a first run writes the index
    calls = []
    original = folder_module.list_tree
    folder_module.list_tree = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        t0 = time.perf_counter()
        ds = load(index_path=index)
        resume_s = time.perf_counter() - t0
    finally:
        folder_module.list_tree = original
    return {"files": scandir_walk(), "scandir_s": round(scandir_s, 4), "twist_list_s": round(twist_s, 4),
            "startup_over_scandir": round(twist_s / scandir_s, 2), "auto_startup_s": round(auto_s, 4),
            "auto_startup_over_scandir": round(auto_s / scandir_s, 2), "resume_load_s": round(resume_s, 4),
            "resume_listings": len(calls), "resume_images": len(ds)}


def _smaps(pid: int | str, key: str) -> float:
    """MiB of ``key`` (e.g. Anonymous, Private_Dirty) in /proc/PID/smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory_probe(root: Path, workers: int = 2) -> dict:
    """One epoch of the streamed folder ``root`` in this process (see the module docstring)."""
    from twist.data import ViewPlan

    ds = load_dataset(str(root), "train", image_size=73, max_memory_gb=1e-9, progress=False, crop_size=64)
    index_bytes = ds.paths.nbytes() if hasattr(ds.paths, "nbytes") else \
        sys.getsizeof(ds.paths) + sum(map(sys.getsizeof, ds.paths))
    index_bytes += ds.labels.nbytes if ds.labels is not None else 0
    # the listing's temporaries (about twice the index) are freed into the heap; handed back here,
    # or the workers forked next would inherit those pages and count them as their own once this
    # process reuses them (any page the parent rewrites after a fork stays private to the child)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    peak, done = [0.0], threading.Event()

    def poll() -> None:  # the workers' private memory, whichever of them is alive
        me = os.getpid()
        while not done.is_set():
            try:
                with open(f"/proc/{me}/task/{me}/children") as f:
                    for pid in f.read().split():
                        peak[0] = max(peak[0], _smaps(pid, "Private_Dirty"))
            except OSError:  # a worker that has just ended
                pass
            time.sleep(0.05)

    copied = forked_reader_growth(ds)
    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    plan = ViewPlan.from_augment(get_preset("photo-cpu").augment, 0)
    seen = sum(len(idx) for _, idx in batch_loader(ds, 128, shuffle=True, drop_last=True, seed=0, epoch=0,
                                                    num_workers=workers, views=plan))
    done.set()
    sampler.join()
    return {"files": len(ds), "images_read": seen, "index_mb": round(index_bytes / 2**20, 2),
            "main_anonymous_mb": round(_smaps("self", "Anonymous"), 1), "worker_private_peak_mb": round(peak[0], 1),
            "forked_reader_mb": round(copied, 2)}


def forked_reader_growth(ds) -> float:
    """MiB a forked child's private memory grows by while it reads every path of ``ds`` once in
    a shuffled order, as loader workers do over an epoch (and nothing else, so no decoding
    buffers blur it): what reading the index copies."""
    order = np.random.default_rng(0).permutation(len(ds))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            before = _smaps("self", "Private_Dirty")
            for i in order:
                ds.source(int(i))
            os.write(write, str(_smaps("self", "Private_Dirty") - before).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return float(f.read())


def memory(work: Path, sizes: tuple[int, int]) -> dict:
    """:func:`memory_probe` of a small and a large tree, each in a fresh process, and the growth
    per added image."""
    runs = []
    for files in sizes:
        tree = work / f"linktree{files}"
        make_link_tree(tree, files)
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import photo_loader as b; "
                "from pathlib import Path; print(json.dumps(b.memory_probe(Path(sys.argv[2]))))")
        out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tree)], check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, large = runs
    added = large["files"] - small["files"]

    def per_image(key: str) -> float:
        return round((large[key] - small[key]) * 2**20 / added, 1)

    index, main = per_image("index_mb"), per_image("main_anonymous_mb")
    return {"small": small, "large": large, "index_bytes_per_image": index, "main_bytes_per_image": main,
            "worker_bytes_per_image": per_image("forked_reader_mb"),
            "worker_peak_bytes_per_image": per_image("worker_private_peak_mb"),
            "main_over_index_growth": round(main / index, 2) if index > 0 else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a folder of class sub-folders of photos (default: a synthetic one)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "twist_photo_bench"),
                    help="where the synthetic folder and tree are made (kept for the next run)")
    ap.add_argument("--photos", type=int, default=2000, help="synthetic photos to make")
    ap.add_argument("--images", type=int, default=640, help="images timed per loader and recipe")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tree-files", type=int, default=100_000)
    ap.add_argument("--colour", default="auto", choices=["auto", "fused", "tensor"],
                    help="how twist's photometric steps run on this CPU (MultiCropAugment(colour=...)): the "
                         "compiled pass of twist.fused_colour, tensor operations, or auto (fused when numba imports)")
    ap.add_argument("--memory-files", type=int, default=50_000,
                    help="the smaller tree of the memory part (the larger has --tree-files)")
    ap.add_argument("--part", choices=["all", "loaders", "startup", "memory"], default="all",
                    help="measure every part (the JSON's speedups need 'loaders', its start-up ratios 'startup', "
                         "its memory growths 'memory')")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    keep_freed_cpu_memory()  # as twist train does on CPU; process-wide, so both loaders (and forked workers) get it
    work = Path(args.work)
    root = Path(args.data) if args.data else work / "photos"
    if not args.data and args.part in ("all", "loaders"):
        t0 = time.perf_counter()
        make_photos(root, args.photos)
        print(f"synthetic folder {root}: {args.photos} JPEGs ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    subset = list(range(args.images))
    random.seed(0)
    torch.manual_seed(0)
    mc, tv = get_preset("vit-small").augment, get_preset("rn50-twoview").augment
    result: dict = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "colour": MultiCropAugment(mc, 3, colour=args.colour).colour_path(torch.device("cpu")),
                    "workers": args.workers, "batch": args.batch, "images": args.images}
    for name, cfg in (("multicrop", mc), ("twoview", tv)) if args.part in ("all", "loaders") else ():
        rel = release_loader(str(root), release_views(cfg.global_scale, cfg.local_scale, cfg.num_local),
                             subset, args.batch, args.workers)
        tw = twist_loader(str(root), cfg, args.images, args.batch, args.workers, colour=args.colour)
        cut = twist_loader(str(root), cfg, args.images, args.batch, args.workers, photometric=False)
        result[name] = {"release": rel, "twist": tw, "twist_views_only": cut}
        result[f"{name}_speedup"] = round(tw["images_per_cpu_s"] / rel["images_per_cpu_s"], 2)
        # on a GPU the photometric ops run there: the CPU then only decodes and cuts views
        result[f"{name}_speedup_cpu_side_of_gpu_training"] = round(cut["images_per_cpu_s"] / rel["images_per_cpu_s"], 2)
        print(f"{name}: release {rel['images_per_cpu_s']} img/CPU-s ({rel['images_per_s']} img/s), "
              f"twist {tw['images_per_cpu_s']} img/CPU-s ({tw['images_per_s']} img/s): "
              f"x{result[f'{name}_speedup']}; views only (photometric on a GPU) {cut['images_per_cpu_s']} img/CPU-s: "
              f"x{result[f'{name}_speedup_cpu_side_of_gpu_training']}", file=sys.stderr)
    if args.part in ("all", "startup"):
        tree = work / "tree"
        make_tree(tree, args.tree_files)
        result["startup"] = startup(tree, work)
        result["startup_over_scandir"] = result["startup"]["startup_over_scandir"]
        result["auto_startup_over_scandir"] = result["startup"]["auto_startup_over_scandir"]
    if args.part in ("all", "memory") and sys.platform.startswith("linux"):
        result["memory"] = memory(work, (args.memory_files, args.tree_files))
        for key in ("worker_bytes_per_image", "main_over_index_growth"):
            result[key] = result["memory"][key]
        m = result["memory"]
        print(f"memory: index {m['index_bytes_per_image']} B/image, training process {m['main_bytes_per_image']} "
              f"B/image, a forked reader of every path {m['worker_bytes_per_image']} B/image (loader workers' "
              f"peaks over the epoch {m['worker_peak_bytes_per_image']} B/image)", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
