"""A self-contained HTML report of a run: training curves, cluster gallery, sizes, confusion matrix.

``twist report RUN_DIR_OR_CHECKPOINT [DATA] --out report/`` is a thin layer over :func:`report`.
The page needs no network: CSS and charts (SVG drawn here) are inline, thumbnails are PNG
``data:`` URIs (or, with ``embed_images=False``, files in ``<out>/thumbs/`` referenced by
relative paths), and a few lines of inline JavaScript only mark, once the page has loaded,
whether every image decoded (``<body data-images-status="ok|broken" data-images-loaded=N
data-images-total=M>``, and the title gains `` [images ok]``) -- used by the tests and handy to
check a copied report.

Sections:

* run summary (preset, backbone, C, epochs, data) and final metrics;
* training curves from ``RUN/metrics.jsonl``: loss terms, learning rate / weight decay, and the
  evaluation metrics (ACC, NMI, ARI, AMI, kNN) over epochs;
* cluster-size chart (clusters sorted by size) and the number of clusters used;
* confusion matrix (classes x clusters in Hungarian-matched order) when the data has labels;
* cluster gallery: for each cluster (largest first, up to ``max_clusters``) its size, its
  majority label and purity when labels exist, and its ``per_cluster`` most confident images.
  Images from files (folders, tar shards) are shown as thumbnails of the ORIGINAL photos (whole
  image, its own aspect, longer side PHOTO_THUMB px, JPEG), not of the decoded training-size
  copy; arrays (npz, digits) as thumbnails of the arrays (tiny ones enlarged, pixelated).

DATA defaults to the data the run was trained on (``checkpoint['data']['source']``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from twist.data import DataError, ImageDataset, display_path
from twist.io import write_text_atomic

__all__ = ["report", "read_metrics", "svg_line_chart", "svg_bar_chart"]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


# ====================================================================== metrics
def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (one JSON object per line); unreadable lines are skipped.

    Example::

        >>> read_metrics("runs/digits/metrics.jsonl")[-1]["loss"]     # doctest: +SKIP
        -2.18
    """
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


# ====================================================================== SVG charts
def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-6:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if 1e3 <= abs(v) < 1e6:
        return f"{v:.0f}"
    if abs(v) >= 1e6 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3g}"


def svg_line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str = "", *,
                   xlabel: str = "epoch", width: int = 460, height: int = 250) -> str:
    """An inline ``<svg>`` line chart of ``[(name, xs, ys), ...]`` (non-finite points dropped).

    Example::

        >>> svg = svg_line_chart([("loss", [1, 2, 3], [0.9, 0.5, 0.4])], "loss")
        >>> svg.startswith("<svg") and "polyline" in svg
        True
    """
    clean = []
    for name, xs, ys in series:
        pts = [(float(x), float(y)) for x, y in zip(xs, ys)
               if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
        if pts:
            clean.append((name, pts))
    ml, mr, mt, mb = 58, 12, 26, 34
    pw, ph = width - ml - mr, height - mt - mb
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" class="ctitle">{html.escape(title)}</text>']
    if not clean:
        out.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" class="muted">no data</text>')
        return "".join(out) + "</svg>"
    xs = [x for _, pts in clean for x, _ in pts]
    ys = [y for _, pts in clean for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return mt + (1 - (y - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="plotbg"/>')
    for t in _nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{ml - 4}" y="{y + 3:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    for t in _nice_ticks(x0, x1, integer=all(float(x).is_integer() for x in xs)):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" class="axis"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 15}" text-anchor="middle" class="tick">{_fmt(t)}</text>')
    out.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" class="tick">'
               f'{html.escape(xlabel)}</text>')
    for i, (name, pts) in enumerate(clean):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(pts) <= 40:
            out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{color}"/>' for x, y in pts)
    out.append(f'<rect x="{ml + pw - 122}" y="{mt + 2}" width="118" height="{13 * len(clean) + 4}" '
               f'class="legendbg"/>')
    for i, (name, _) in enumerate(clean):
        ly = mt + 12 + 13 * i
        out.append(f'<rect x="{ml + pw - 118}" y="{ly - 6}" width="10" height="3" fill="{PALETTE[i % len(PALETTE)]}"/>'
                   f'<text x="{ml + pw - 104}" y="{ly - 1}" class="legend">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_bar_chart(values: Sequence[float], labels: Sequence[str] | None = None, title: str = "", *,
                  width: int = 760, height: int = 230, color: str = "#1f77b4") -> str:
    """An inline ``<svg>`` bar chart; labels under the bars when there are at most 60 of them.

    Example::

        >>> "rect" in svg_bar_chart([3, 1, 2], ["a", "b", "c"], "sizes")
        True
    """
    n = len(values)
    ml, mr, mt, mb = 50, 10, 26, 40
    pw, ph = width - ml - mr, height - mt - mb
    top = max([float(v) for v in values] + [1.0])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" class="ctitle">{html.escape(title)}</text>',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="plotbg"/>']
    for t in _nice_ticks(0, top):
        y = mt + (1 - t / top) * ph
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{ml - 4}" y="{y + 3:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    bw = pw / max(n, 1)
    for i, v in enumerate(values):
        h = float(v) / top * ph
        x = ml + i * bw
        label = labels[i] if labels is not None else str(i)
        out.append(f'<rect x="{x + bw * 0.1:.2f}" y="{mt + ph - h:.2f}" width="{max(bw * 0.8, 0.5):.2f}" '
                   f'height="{h:.2f}" fill="{color}"><title>{html.escape(label)}: {_fmt(float(v))}</title></rect>')
        if n <= 60:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{mt + ph + 13}" text-anchor="middle" class="tick">'
                       f'{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


# ====================================================================== thumbnails
PHOTO_THUMB = 128
"""Longer side of a photo's thumbnail (shown at 96 CSS px: sharp on high-density screens)."""


def _thumb(im, target: int = 64, max_side: int = 96) -> tuple[bytes, str]:
    """A PIL image -> (bytes, MIME type): tiny images upscaled by an integer factor (nearest) as
    PNG, large ones shrunk to ``max_side`` keeping their aspect, as JPEG once they are photo-sized
    (a PNG photo thumbnail is ~8x larger in the page for no visible gain)."""
    from PIL import Image

    side = max(im.size)
    if side < target:
        f = max(1, target // side)
        im = im.resize((im.size[0] * f, im.size[1] * f), Image.Resampling.NEAREST)
    elif side > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if side > 96:
        im.save(buf, format="JPEG", quality=85)
        return buf.getvalue(), "image/jpeg"
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue(), "image/png"


def _array_image(img: np.ndarray):
    """uint8 (C, H, W) -> a PIL image ('L' or 'RGB')."""
    from PIL import Image

    a = img[0] if img.shape[0] == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))
    return Image.fromarray(a, "L" if img.shape[0] == 1 else "RGB")


def _original_thumb(ds: ImageDataset, i: int) -> tuple[bytes, str] | None:
    """The thumbnail of image ``i``'s ORIGINAL file (whole photo, its own aspect; JPEGs decoded
    at a reduced DCT scale), or None when the file no longer decodes."""
    from twist.data.decode import load_oriented, open_image

    try:
        with open_image(ds.source(i), ds.max_pixels or 100_000_000) as im:
            return _thumb(load_oriented(im, ds.channels, draft=(PHOTO_THUMB, PHOTO_THUMB)), max_side=PHOTO_THUMB)
    except Exception:  # noqa: BLE001 - the gallery then shows the decoded copy
        return None


def _data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")


# ====================================================================== page
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fff}
header{background:#1f3a5f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85}main{padding:8px 24px 40px;max-width:1400px}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table.kv{border-collapse:collapse}table.kv td,table.kv th{border:1px solid #ddd;padding:3px 10px;text-align:left}
table.kv th{background:#f4f6f8}.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #e3e3e3}.ctitle{font-weight:600;font-size:13px}
.tick{font-size:10px;fill:#555}.legend{font-size:11px;fill:#333}
.legendbg{fill:#fff;fill-opacity:.85;stroke:#ddd}.grid{stroke:#eee}.axis{stroke:#999}.plotbg{fill:#fcfcfc;stroke:#ccc}.muted{fill:#888;color:#888}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
section.cluster{border:1px solid #ddd;border-radius:6px;padding:8px 10px;width:min(100%,440px);box-sizing:border-box}
section.cluster h3{margin:0 0 4px;font-size:15px}section.cluster .meta{font-size:12px;color:#555;margin-bottom:6px}
.thumbs{display:flex;flex-wrap:wrap;gap:4px}.thumbs figure{margin:0;text-align:center;font-size:10px;color:#666}
.thumbs img{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;background:#f0f0f0;display:block}
.thumbs img.photo{width:96px;height:96px;image-rendering:auto}
.note{background:#fff8e1;border:1px solid #f0d98c;padding:6px 10px;border-radius:4px}
"""

JS = """
(function(){
  function check(){
    var imgs=document.images, ok=0;
    for(var i=0;i<imgs.length;i++){ if(imgs[i].complete && imgs[i].naturalWidth>0) ok++; }
    var b=document.body, status = ok===imgs.length ? 'ok' : 'broken';
    b.setAttribute('data-images-loaded', String(ok));
    b.setAttribute('data-images-total', String(imgs.length));
    b.setAttribute('data-images-status', status);
    b.setAttribute('data-clusters-shown', String(document.querySelectorAll('section.cluster').length));
    if(document.title.indexOf(' [images ')<0){ document.title += ' [images ' + status + ']'; }
  }
  if(document.readyState==='complete'){ check(); } else { window.addEventListener('load', check); }
})();
"""


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = []
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}"
        cells.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
    return '<table class="kv">' + "".join(cells) + "</table>"


def _curves(records: list[dict[str, Any]]) -> str:
    recs = [r for r in records if isinstance(r.get("epoch"), (int, float))]
    if not recs:
        return '<p class="muted">No metrics.jsonl records (nothing to plot).</p>'
    groups = [
        ("loss terms", ["loss", "consistency", "sharpness", "diversity"]),
        ("learning rate", ["lr"]),
        ("weight decay", ["weight_decay"]),
        ("evaluation (fractions)", ["acc", "nmi", "ari", "ami", "knn_top1"]),
        ("clusters used", ["clusters_used"]),
        ("throughput (images / s)", ["images_per_sec"]),
    ]
    charts = []
    for title, keys in groups:
        series = []
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in recs if isinstance(r.get(key), (int, float))
                   and not isinstance(r.get(key), bool)]
            if pts:
                series.append((key, [p[0] for p in pts], [p[1] for p in pts]))
        if series:
            charts.append(svg_line_chart(series, title))
    return '<div class="charts">' + "".join(charts) + "</div>"


def _resolve_run(path: str | os.PathLike) -> tuple[Path, Path]:
    from twist.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    return ckpt.parent, ckpt


def report(run: str | os.PathLike, data: str | ImageDataset | None = None, out: str | os.PathLike = "report", *,
           per_cluster: int = 12, max_clusters: int = 100, embed_images: bool = True, batch_size: int = 256,
           device: str = "auto", split: str = "train", trust_pickle: bool = False, num_workers: int = 0,
           progress: bool = True, trained=None) -> dict[str, Any]:
    """Write ``<out>/index.html`` for a run folder (or checkpoint) and return a summary dict.

    Args:
        run: a run folder (``checkpoint.pt`` + ``metrics.jsonl``) or a checkpoint file (its
            folder is read for ``metrics.jsonl``).
        data: images for the gallery (spec or :class:`ImageDataset`); default: the run's training
            data source stored in the checkpoint. Folders are streamed (decoded per batch).
        out: output folder (created).
        per_cluster: thumbnails per cluster (its most confident images).
        max_clusters: gallery sections for at most this many non-empty clusters, largest first.
        embed_images: ``data:`` URIs (one self-contained file) or PNG files in ``<out>/thumbs/``.
        trained: an already loaded :class:`twist.serving.TrainedModel` (skips loading ``run``).

    Returns ``{'html', 'num_images', 'clusters_used', 'clusters_shown', 'images_shown',
    'metrics' (cluster metrics when labels exist), ...}``.

    Example::

        >>> from twist.report import report
        >>> report("runs/digits", out="runs/digits/report")["html"]      # doctest: +SKIP
        'runs/digits/report/index.html'
    """
    from twist.predict import stream_outputs

    run_dir, ckpt_path, trained, ds = _open_run_and_data(run, data, trained, device=device, trust_pickle=trust_pickle,
                                                         split=split, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    n = len(ds)
    num_clusters = trained.model.num_classes
    pred = np.empty(n, dtype=np.int64)
    conf = np.empty(n, dtype=np.float32)
    for idx, probs, _ in stream_outputs(trained, ds, batch_size=batch_size, num_workers=num_workers,
                                        want_features=False, progress=progress, desc="report"):
        pred[idx] = probs.argmax(1)
        conf[idx] = probs.max(1)
    sizes = np.bincount(pred, minlength=num_clusters)
    labels = np.asarray(ds.labels, dtype=np.int64) if ds.labels is not None else None
    class_names = ds.class_names or trained.class_names

    # which clusters and images to show: the largest clusters, each with its most confident images
    order = [int(c) for c in np.argsort(-sizes, kind="stable") if sizes[c] > 0]
    shown = order[:max_clusters]
    chosen = {c: np.flatnonzero(pred == c)[np.argsort(-conf[pred == c], kind="stable")[:per_cluster]] for c in shown}
    all_idx = np.concatenate([chosen[c] for c in shown]) if shown else np.zeros(0, np.int64)
    thumbs = _thumbnails(ds, all_idx, out, embed_images)
    metrics, confusion_html = _confusion_section(labels, pred, num_clusters, class_names, out, embed_images)
    sections = _gallery(ds, shown, chosen, thumbs, pred, conf, sizes, labels, class_names)
    truncated = ""
    if len(order) > len(shown):
        truncated = (f'<p class="note">Showing the {len(shown)} largest of {len(order)} non-empty clusters '
                     f'(max_clusters={max_clusters}).</p>')
    records = read_metrics(run_dir / "metrics.jsonl")
    summary_rows = _summary_rows(run_dir, ckpt_path, trained, ds, records, sizes, metrics)

    title = f"twist report: {run_dir.name}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body data-images-status="pending" data-clusters="{len(shown)}">
<header><h1>{html.escape(title)}</h1><p>TWIST run report &middot; {n} images &middot; {int((sizes > 0).sum())} of {num_clusters} clusters used</p></header>
<main>
<h2 id="summary">Summary</h2>{_kv_table(summary_rows)}
<h2 id="curves">Training curves</h2>{_curves(records)}
<h2 id="sizes">Cluster sizes</h2>{_size_chart(sizes)}
<h2 id="confusion">Confusion matrix</h2>{confusion_html}
<h2 id="gallery">Cluster gallery</h2>
<p>Each cluster (largest first) with its {per_cluster} most confident images; the number under an image is its probability.</p>
{truncated}<div class="gallery">{"".join(sections)}</div>
</main>
<script>{JS}</script>
</body></html>
"""
    html_path = out / "index.html"
    write_text_atomic(html_path, page)
    summary = {"html": str(html_path), "num_images": int(n), "clusters_used": int((sizes > 0).sum()),
               "clusters_shown": len(shown), "images_shown": int(len(all_idx)), "num_clusters": int(num_clusters),
               "cluster_sizes": sizes.tolist(), "data": display_path(ds.name)}
    if metrics is not None:
        summary["metrics"] = {k: metrics[k] for k in ("acc", "nmi", "ami", "ari", "clusters_used")}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _open_run_and_data(run, data, trained, *, device: str, trust_pickle: bool, split: str, progress: bool):
    """(run folder, checkpoint path, trained model, dataset): the report's data defaults to the
    training data source the checkpoint records."""
    from twist.predict import load_for_prediction
    from twist.serving import load_trained

    run_dir, ckpt_path = _resolve_run(run)
    if trained is None:
        trained = load_trained(ckpt_path, device=device, trust_pickle=trust_pickle)
    info = trained.checkpoint.get("data", {}) or {}
    if data is None:
        data = info.get("source")
        if not data:
            raise DataError(f"{ckpt_path} does not record its training data; give DATA explicitly")
    ds = data if isinstance(data, ImageDataset) else load_for_prediction(str(data), trained, split=split,
                                                                         progress=progress)
    return run_dir, ckpt_path, trained, ds


def _class_name(class_names: Sequence[str] | None, c: int) -> str:
    return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)


def _thumbnails(ds: ImageDataset, indices: np.ndarray, out: Path, embed_images: bool) -> dict[int, str]:
    """Image index -> ``src`` of its thumbnail: a ``data:`` URI, or a file under ``out/thumbs``.
    Images from files (folders, tar shards) are thumbnails of the original photos, not of the
    decoded training-size copy; arrays are thumbnails of the arrays."""
    thumbs: dict[int, str] = {}
    if embed_images is False:
        (out / "thumbs").mkdir(exist_ok=True)
    for s in range(0, len(indices), 256):
        part = indices[s:s + 256]
        originals = {i: _original_thumb(ds, i) for i in part.tolist()} if ds.paths is not None else {}
        missing = [i for i in part.tolist() if originals.get(i) is None]
        copies = dict(zip(missing, ds.get_batch(np.asarray(missing, dtype=np.int64)).numpy())) if missing else {}
        for i in part.tolist():
            data, mime = originals.get(i) or _thumb(_array_image(copies[i]))
            if embed_images:
                thumbs[i] = _data_uri(data, mime)
            else:
                name = f"thumbs/img_{i}.{'jpg' if mime == 'image/jpeg' else 'png'}"
                (out / name).write_bytes(data)
                thumbs[i] = name
    return thumbs


def _confusion_section(labels: np.ndarray | None, pred: np.ndarray, num_clusters: int,
                       class_names: Sequence[str] | None, out: Path, embed_images: bool) -> tuple[dict | None, str]:
    """(cluster metrics or None, the confusion matrix's HTML): confusion.csv and confusion.png
    are written by :func:`twist.evaluate.save_confusion`, the page shows that PNG."""
    from twist.evaluate import cluster_metrics, confusion_matrix, save_confusion

    if labels is None:
        return None, '<p class="muted">The data has no labels: no confusion matrix.</p>'
    metrics = cluster_metrics(labels, pred, num_clusters=num_clusters)
    k = max(int(labels.max()) + 1, len(class_names or ()))
    cm, ids = confusion_matrix(labels, pred, num_classes=k, num_clusters=num_clusters, return_clusters=True)
    save_confusion(out / "confusion", cm, [_class_name(class_names, i) for i in range(k)], ids)
    src = _data_uri((out / "confusion.png").read_bytes()) if embed_images else "confusion.png"
    return metrics, ("<p>Classes (rows) x clusters (columns, in Hungarian-matched order: the diagonal holds "
                     "each class's matched cluster). Colour: fraction of the class, dark blue 0 to yellow 1; "
                     "the counts are in confusion.csv.</p>"
                     f'<img class="confusion" src="{src}" alt="confusion matrix" '
                     f'style="max-width:100%;image-rendering:pixelated">'
                     '<p>Files: <a href="confusion.csv">confusion.csv</a>, <a href="confusion.png">confusion.png</a></p>')


def _gallery(ds: ImageDataset, shown: list[int], chosen: dict[int, np.ndarray], thumbs: dict[int, str],
             pred: np.ndarray, conf: np.ndarray, sizes: np.ndarray, labels: np.ndarray | None,
             class_names: Sequence[str] | None) -> list[str]:
    """One ``<section class="cluster">`` per shown cluster: size, majority label, thumbnails."""
    n = len(pred)
    sections = []
    for c in shown:
        meta = [f"{int(sizes[c])} images ({sizes[c] / n:.1%})"]
        if labels is not None:
            lab = labels[pred == c]
            counts = np.bincount(lab)
            maj = int(counts.argmax())
            meta.append(f"majority label: <b>{html.escape(_class_name(class_names, maj))}</b> "
                        f"({counts[maj] / len(lab):.0%} of the cluster)")
            maj_attr = f' data-majority="{html.escape(_class_name(class_names, maj), quote=True)}"'
        else:
            maj_attr = ""
        figs = []
        photo = ' class="photo"' if ds.paths is not None else ""  # thumbnails of the original files
        for i in chosen[c].tolist():
            where = display_path(ds.paths[i]) if ds.paths is not None else f"#{i}"
            cap = f"{conf[i]:.2f}"
            figs.append(f'<figure><img src="{html.escape(thumbs[i], quote=True)}"{photo} alt="image {i}" loading="eager" '
                        f'title="{html.escape(where, quote=True)} (p={cap})"><figcaption>{cap}</figcaption></figure>')
        sections.append(f'<section class="cluster" id="cluster-{c}" data-cluster="{c}" data-size="{int(sizes[c])}"'
                        f'{maj_attr}><h3>cluster {c}</h3><div class="meta">{" &middot; ".join(meta)}</div>'
                        f'<div class="thumbs">{"".join(figs)}</div></section>')
    return sections


def _size_chart(sizes: np.ndarray) -> str:
    """Images per cluster: by cluster id for up to 60 clusters, else sorted by size."""
    num_clusters = len(sizes)
    if num_clusters <= 60:
        return svg_bar_chart([int(sizes[c]) for c in range(num_clusters)], [str(c) for c in range(num_clusters)],
                             "images per cluster (by cluster id)")
    srt = np.sort(sizes)[::-1]
    return svg_bar_chart([int(v) for v in srt], None, "images per cluster (sorted by size)")


def _summary_rows(run_dir: Path, ckpt_path: Path, trained, ds: ImageDataset, records: list[dict[str, Any]],
                  sizes: np.ndarray, metrics: dict | None) -> list[tuple[str, Any]]:
    """The summary table: run, model, data, cluster use and (with labels) the cluster metrics."""
    cfg = trained.config
    last = records[-1] if records else {}
    rows: list[tuple[str, Any]] = [
        ("run", display_path(run_dir)), ("checkpoint", display_path(ckpt_path)), ("preset", cfg.preset),
        ("backbone", cfg.model.backbone), ("clusters C", len(sizes)), ("epochs (configured)", cfg.train.epochs),
        ("epochs (logged)", last.get("epoch", "-")),
        ("report data", display_path(ds.name) + (f" ({ds.describe()})" if hasattr(ds, "describe") else "")),
        ("images", len(ds)), ("clusters used", int((sizes > 0).sum())),
    ]
    if metrics is not None:
        rows += [("cluster ACC", metrics["acc"]), ("NMI", metrics["nmi"]), ("AMI", metrics["ami"]),
                 ("ARI", metrics["ari"])]
    if ds.skipped:
        rows.append(("files skipped", len(ds.skipped)))
    return rows
