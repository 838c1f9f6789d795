"""Quality benchmark: TWIST with a preset against baselines on the same data and budget.

    python benchmarks/quality.py DATASET --preset NAME [--epochs N] [--out DIR]
        [--methods twist,iic,simclr,barlow,kmeans_raw,random] [--seed S] [--set key=value ...]

DATASET is anything ``twist train`` accepts: ``digits`` (built in), an npz file, or a folder of
npz splits such as /path/to/mnist or /path/to/cifar10 (``train*.npz`` + ``test.npz``), or an image
folder holding ``train/`` and ``test/`` folders (e.g. flowers5). ``--preset auto`` uses the recipe
``twist train`` picks without --preset (twist.autopreset: the data and this device decide).

Every method is scored on the test split (the ``test`` split of a split folder; ``digits`` and
single npz files have one split, so there "test" is the training data: see *Protocol*):

* cluster ACC / NMI / ARI (Hungarian one-to-one matching, twist.evaluate.cluster_metrics) and
  the number of clusters used;
* kNN top-1 (k = 20, T = 0.07, cosine; bank = training-split features);
* linear top-1 (twist.evaluate.linear_probe on frozen, standardised features).

Methods (all on the same data, backbone, augmentation, optimiser, batch size and number of
optimiser steps as the TWIST preset -- its self-labeling epochs, if any, included: the
baselines then train ``train.epochs + selflabel.epochs`` epochs; see benchmarks/baselines.py):

* ``twist``       -- ``twist.train.train`` with the preset (the product's own code path);
                     clusters = argmax of the head; also reported: k-means on its features.
* ``iic``         -- IIC-style mutual-information clustering head with the same C.
* ``simclr``      -- SimCLR NT-Xent; clusters by k-means on its backbone features.
* ``barlow``      -- Barlow Twins; clusters by k-means on its backbone features.
* ``kmeans_raw``  -- k-means / kNN / linear on raw pixels (the dataset's own resolution).
* ``random``      -- a randomly initialised backbone (BN statistics from 20 training batches);
                     k-means / kNN / linear on its features.

k-means: scikit-learn KMeans with k = the number of true classes, n_init = 10, fitted on the
training split and applied to the test split; network features are L2-normalised first (the
geometry kNN uses), raw pixels are used as they are.

Protocol for one-split data (digits): k-means and the cluster heads are scored on all images
(the usual protocol for clustering benchmarks), kNN is leave-one-out, and the linear probe is
trained on a fixed random half and scored on the other half.

Output: ``OUT/<method>.json`` per method (so methods can run in separate processes into the
same folder, e.g. two at a time on a small machine), then ``OUT/results.json`` with every
method found in OUT for this dataset and preset, and a markdown table on stdout (also written
to ``OUT/results.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import OBJECTIVES, as_features, calibrate_bn, train_objective  # noqa: E402

from twist.augment import EvalTransform, dataset_stats  # noqa: E402
from twist.backbones import build_backbone  # noqa: E402
from twist.config import apply_overrides  # noqa: E402
from twist.presets import get_preset  # noqa: E402
from twist.data import load_dataset  # noqa: E402
from twist.evaluate import cluster_metrics, knn_top1, linear_probe  # noqa: E402
from twist.inference import extract  # noqa: E402
from twist.model import TwistModel  # noqa: E402
from twist.serving import load_trained  # noqa: E402
from twist.runtime import resolve_device, resolve_precision  # noqa: E402
from twist.train import train  # noqa: E402

METHODS = ("kmeans_raw", "random", "twist") + OBJECTIVES
LABELS = {
    "kmeans_raw": "raw pixels (k-means)",
    "random": "random-init backbone (k-means)",
    "twist": "TWIST (argmax of head)",
    "twist_kmeans": "TWIST features (k-means)",
    "iic": "IIC (argmax of head)",
    "simclr": "SimCLR (k-means)",
    "barlow": "Barlow Twins (k-means)",
}


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- scoring
class Scorer:
    """Scores features / cluster assignments on the benchmark's protocol."""

    def __init__(self, y_train: np.ndarray, y_test: np.ndarray, same_split: bool, seed: int,
                 probe_epochs: int, kmeans_init: int):
        self.y_train, self.y_test = y_train, y_test
        self.same = same_split
        self.k = int(max(y_train.max(), y_test.max())) + 1
        self.seed = seed
        self.probe_epochs = probe_epochs
        self.kmeans_init = kmeans_init
        if same_split:  # a fixed random half for the linear probe
            perm = np.random.default_rng(seed).permutation(len(y_train))
            self.half_a, self.half_b = perm[: len(perm) // 2], perm[len(perm) // 2:]

    def clusters(self, pred: np.ndarray, num_clusters: int) -> dict[str, Any]:
        m = cluster_metrics(self.y_test, pred, num_clusters=num_clusters)
        return {k: m[k] for k in ("acc", "nmi", "ari", "clusters_used")}

    def kmeans(self, f_train: np.ndarray, f_test: np.ndarray, normalize: bool) -> dict[str, Any]:
        from sklearn.cluster import KMeans

        if normalize:
            f_train = f_train / np.maximum(np.linalg.norm(f_train, axis=1, keepdims=True), 1e-12)
            f_test = f_test / np.maximum(np.linalg.norm(f_test, axis=1, keepdims=True), 1e-12)
        km = KMeans(n_clusters=self.k, n_init=self.kmeans_init, random_state=self.seed)
        km.fit(f_train.astype(np.float64))
        return self.clusters(km.predict(f_test.astype(np.float64)), self.k)

    def knn(self, f_train: np.ndarray, f_test: np.ndarray) -> float:
        if self.same:
            return knn_top1(f_train, self.y_train, f_train, self.y_train, exclude_self=True)
        return knn_top1(f_train, self.y_train, f_test, self.y_test)

    def linear(self, f_train: np.ndarray, f_test: np.ndarray) -> float:
        if self.same:
            a, b = self.half_a, self.half_b
            r = linear_probe(f_train[a], self.y_train[a], f_train[b], self.y_train[b],
                             epochs=self.probe_epochs, seed=self.seed)
        else:
            r = linear_probe(f_train, self.y_train, f_test, self.y_test, epochs=self.probe_epochs, seed=self.seed)
        return r["top1"]

    def all(self, f_train: np.ndarray, f_test: np.ndarray, normalize: bool) -> dict[str, Any]:
        out = self.kmeans(f_train, f_test, normalize)
        out["knn_top1"] = self.knn(f_train, f_test)
        out["linear_top1"] = self.linear(f_train, f_test)
        return out


# ---------------------------------------------------------------------- the run
def split_paths(dataset: str) -> tuple[str, str]:
    """(train, test) specs: an image folder holding train/ and test/ folders gives those two;
    anything else is one spec whose ``train`` / ``test`` splits load_dataset tells apart."""
    root = Path(os.path.expanduser(str(dataset)))
    if root.is_dir() and (root / "train").is_dir() and (root / "test").is_dir() and not list(root.glob("*.npz")):
        return str(root / "train"), str(root / "test")
    return str(dataset), str(dataset)


def preset_config(name: str, train_spec: str, overrides: list[str]):
    """``--preset auto``: what ``twist train --set OVERRIDES`` chooses without --preset
    (twist.autopreset: the CPU photo recipe's epochs from the speed measured here, unless
    ``train.epochs`` is among the overrides)."""
    if name != "auto":
        return get_preset(name)
    from twist.autopreset import auto_preset

    cfg, reasons = auto_preset(train_spec, overrides)
    for line in reasons:
        log(line)
    return cfg


def run(args: argparse.Namespace) -> int:
    train_spec, test_spec = split_paths(args.dataset)
    epochs = [] if args.epochs is None else [f"train.epochs={args.epochs}"]
    cfg = preset_config(args.preset, train_spec, [*args.overrides, *epochs])
    apply_overrides(cfg, args.overrides)
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.seed is not None:
        cfg.train.seed = args.seed
    cfg.train.eval_every = 0  # the benchmark evaluates once, at the end, on its own protocol
    cfg.train.val_data = ""
    cfg.validate()
    out = Path(args.out or f"runs/quality-{Path(str(args.dataset)).name}-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    image_size = cfg.train.image_size or cfg.augment.global_size
    train_ds = load_dataset(train_spec, "train", image_size=image_size, progress=False)
    test_ds = load_dataset(test_spec, "test", image_size=image_size, progress=False)
    same = train_ds.kind in ("digits", "npz")  # one split: "test" is the training data
    if same:
        test_ds = train_ds
    if train_ds.labels is None or test_ds.labels is None:
        raise SystemExit("the benchmark needs labelled data")
    y_train, y_test = np.asarray(train_ds.labels), np.asarray(test_ds.labels)
    mean, std = dataset_stats(train_ds.images)
    eval_t = EvalTransform(cfg.augment.global_size, train_ds.channels, mean, std)
    scorer = Scorer(y_train, y_test, same, cfg.train.seed, args.probe_epochs, args.kmeans_init)
    # A self-labeling stage (selflabel.epochs) is part of TWIST's budget: the baselines train as
    # many epochs as both of TWIST's stages together, so every method takes the same number of steps.
    total_epochs = cfg.train.epochs + cfg.selflabel.epochs
    baseline_cfg = copy.deepcopy(cfg)
    baseline_cfg.train.epochs = total_epochs
    meta = {"dataset": str(args.dataset), "preset": args.preset, "epochs": total_epochs,
            "twist_epochs": cfg.train.epochs, "selflabel_epochs": cfg.selflabel.epochs,
            "batch_size": cfg.train.batch_size, "steps": (len(train_ds) // cfg.train.batch_size) * total_epochs,
            "seed": cfg.train.seed, "overrides": list(args.overrides), "train_images": len(train_ds),
            "test_images": len(test_ds), "one_split": same, "device": str(device), "precision": precision,
            "torch_threads": torch.get_num_threads(), "config": cfg.to_dict()}
    log(f"{args.dataset}: {len(train_ds)} train / {len(test_ds)} test images, preset {args.preset}, "
        f"{meta['epochs']} epochs = {meta['steps']} steps"
        f"{f' (TWIST {cfg.train.epochs} + self-labeling {cfg.selflabel.epochs})' if cfg.selflabel.epochs else ''}, "
        f"{device} {precision}")

    def feats(model, ds, probs: bool = False):
        return extract(model, ds, eval_t, device=device, precision=precision, batch_size=512,
                       want_probs=probs, channels_last=cfg.train.channels_last)

    def save(name: str, record: dict[str, Any]) -> None:
        record = {"method": name, "label": LABELS[name], **record, "meta": meta}
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        log(f"{name}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in record.items() if k not in ("meta", "label", "method")))

    for method in methods:
        t0 = time.perf_counter()
        if method == "kmeans_raw":
            raw_tr = load_dataset(train_spec, "train", image_size=0, progress=False)
            raw_te = raw_tr if same else load_dataset(test_spec, "test", image_size=0, progress=False)
            r = scorer.all(as_features(raw_tr.images), as_features(raw_te.images), normalize=False)
            save(method, {**r, "seconds": time.perf_counter() - t0})
        elif method == "random":
            torch.manual_seed(cfg.train.seed)
            net = TwistModel(build_backbone(cfg.model, train_ds.channels), torch.nn.Identity()).to(device)
            net = net.to(memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
            calibrate_bn(net.backbone, train_ds, eval_t, device, seed=cfg.train.seed)
            f_tr = feats(net, train_ds)["features"].numpy()
            f_te = f_tr if same else feats(net, test_ds)["features"].numpy()
            save(method, {**scorer.all(f_tr, f_te, normalize=True), "seconds": time.perf_counter() - t0})
        elif method == "twist":
            run_dir = out / "twist-run"
            if run_dir.exists() and not args.resume:
                shutil.rmtree(run_dir)
            train(cfg, train_spec, run_dir, progress=not args.no_progress)
            train_s = time.perf_counter() - t0
            logged = (run_dir / "metrics.jsonl").read_text().splitlines()
            steps = json.loads(logged[-1]).get("step") if logged else None  # both stages' optimiser steps
            trained = load_trained(run_dir, device=str(device))
            model = trained.model
            tr = feats(model, train_ds, probs=False)
            te = tr if same else feats(model, test_ds, probs=True)
            probs = (feats(model, train_ds, probs=True) if same else te)["probs"]
            f_tr, f_te = tr["features"].numpy(), te["features"].numpy()
            r = scorer.clusters(probs.argmax(1).numpy(), probs.shape[1])
            r["knn_top1"] = scorer.knn(f_tr, f_te)
            r["linear_top1"] = scorer.linear(f_tr, f_te)
            save("twist", {**r, "steps": steps, "train_seconds": train_s, "seconds": time.perf_counter() - t0})
            save("twist_kmeans", {**scorer.kmeans(f_tr, f_te, normalize=True), "knn_top1": r["knn_top1"],
                                  "linear_top1": r["linear_top1"], "train_seconds": train_s})
        else:
            model, info = train_objective(method, baseline_cfg, train_ds, mean, std, device=device, precision=precision,
                                          projector_dim=args.projector_dim,
                                          log=log if not args.no_progress else (lambda _m: None))
            tr = feats(model, train_ds, probs=method == "iic")
            te = tr if same else feats(model, test_ds, probs=method == "iic")
            f_tr, f_te = tr["features"].numpy(), te["features"].numpy()
            if method == "iic":
                probs = te["probs"]
                r = scorer.clusters(probs.argmax(1).numpy(), probs.shape[1])
                r["knn_top1"] = scorer.knn(f_tr, f_te)
                r["linear_top1"] = scorer.linear(f_tr, f_te)
            else:
                r = scorer.all(f_tr, f_te, normalize=True)
            save(method, {**r, **info, "seconds": time.perf_counter() - t0})

    report(out, meta)
    return 0


# ---------------------------------------------------------------------- report
def report(out: Path, meta: dict[str, Any]) -> None:
    rows = []
    for name in ("kmeans_raw", "random", "iic", "simclr", "barlow", "twist_kmeans", "twist"):
        path = out / f"{name}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        m = rec["meta"]
        if (m["dataset"], m["preset"], m["epochs"], m["seed"]) != (meta["dataset"], meta["preset"], meta["epochs"],
                                                                    meta["seed"]):
            log(f"skipping {path}: from another run ({m['dataset']}, {m['preset']}, {m['epochs']} epochs, "
                f"seed {m['seed']})")
            continue
        rows.append(rec)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    head = (f"{meta['dataset']} | preset `{meta['preset']}` | {meta['epochs']} epochs x batch {meta['batch_size']} "
            f"= {meta['steps']} steps | seed {meta['seed']} | test images: {meta['test_images']}"
            f"{' (one split: all images)' if meta['one_split'] else ''}\n\n")
    lines = ["| method | cluster ACC | NMI | ARI | clusters used | kNN top-1 | linear top-1 | train time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        t = r.get("train_seconds")
        lines.append(f"| {r['label']} | {r['acc']:.4f} | {r['nmi']:.4f} | {r['ari']:.4f} | {r['clusters_used']} | "
                     f"{r['knn_top1']:.4f} | {r['linear_top1']:.4f} | {'' if t is None else f'{t:.0f}'} |")
    text = head + "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="'digits', an npz file, or a folder of npz splits (train*.npz, test.npz)")
    p.add_argument("--preset", required=True, help="twist preset (digits, mnist, cifar10, ...) or 'auto' (what twist train picks without --preset)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs (every method gets the same)")
    p.add_argument("--out", default=None, help="output folder (default runs/quality-<data>-<preset>)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every method (repeatable)")
    p.add_argument("--projector-dim", type=int, default=None,
                   help="width of SimCLR's and Barlow Twins' projectors (default: the TWIST heads' width, "
                        "at least 1024, so that narrow TWIST heads never narrow a baseline)")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs (default 100)")
    p.add_argument("--kmeans-init", type=int, default=10, help="k-means restarts (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--resume", action="store_true", help="resume the TWIST run folder instead of starting afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch logs")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
