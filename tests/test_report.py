"""Tests of twist.report / `twist report`: page content, no network references, and the page
opened in headless Chromium (every image decodes, one section per shown cluster; a screenshot
is kept in test-artifacts/).

Chromium is required: the README's test command (scripts/test.sh, which .ci/run calls) installs
it when missing (.ci/install-chromium.sh). Without it the browser tests
FAIL with a message; set TWIST_SKIP_BROWSER=1 to skip them (reported as skipped) locally.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twist.cli import main
from twist.report import read_metrics, report, svg_bar_chart, svg_line_chart

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--virtual-time-budget=5000"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("TWIST_SKIP_BROWSER") == "1":
        pytest.skip("chromium not installed and TWIST_SKIP_BROWSER=1: browser check skipped")
    pytest.fail("chromium is not installed: the report page test needs headless Chromium. Install it with "
                "`bash .ci/install-chromium.sh` (apt-get install -y chromium), or set TWIST_SKIP_BROWSER=1 "
                "to skip this test locally")


def _browser(exe: str, page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chrome-profile'}", *extra,
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)


def _external_refs(page: str) -> list[str]:
    """src / href / url(...) values that would need the network (namespaces are not loaded)."""
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    return [r for r in refs if re.match(r"\s*(https?:)?//", r)]


@pytest.fixture(scope="module")
def built(trained_digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    res = report(trained_digits_run, out=out, progress=False)  # data: the run's own source (digits)
    return res, out


def test_report_page_content(built, trained_digits_run):
    res, out = built
    page = (out / "index.html").read_text(encoding="utf-8")
    assert res["num_images"] == 1797 and sum(res["cluster_sizes"]) == 1797
    assert res["clusters_shown"] == res["clusters_used"] >= 1
    assert page.count('<section class="cluster"') == res["clusters_shown"]
    assert page.count("<figure><img ") == res["images_shown"]
    assert page.count('<img class="confusion"') == 1  # labelled data: the one confusion-matrix picture
    assert res["images_shown"] == sum(min(12, s) for s in res["cluster_sizes"] if s > 0)
    assert "majority label" in page and 'id="confusion"' in page and "<svg" in page
    assert (out / "confusion.csv").is_file() and (out / "confusion.png").is_file()
    # curves from metrics.jsonl: one chart per group that has data
    epochs = [r["epoch"] for r in read_metrics(trained_digits_run / "metrics.jsonl")]
    assert epochs == [1, 2]
    for title in ("loss terms", "learning rate", "evaluation (fractions)"):
        assert f">{title}</text>" in page
    # self-contained: no script/style/image from elsewhere
    assert _external_refs(page) == []
    assert "<script src" not in page and "<link" not in page
    assert all(u.startswith("data:image/png;base64,") for u in re.findall(r'<img src="([^"]+)"', page))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["acc"] == res["metrics"]["acc"]


def test_report_in_headless_chromium(built, tmp_path):
    exe = _chromium()
    res, out = built
    page = out / "index.html"
    dom = _browser(exe, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    n = res["images_shown"] + 1  # the gallery's thumbnails and the confusion-matrix picture
    assert 'data-images-status="ok"' in body, body
    assert f'data-images-loaded="{n}"' in body and f'data-images-total="{n}"' in body
    assert f'data-clusters-shown="{res["clusters_shown"]}"' in body
    assert "[images ok]" in dom.stdout  # the title the page's script sets
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_digits.png"
    if shot.exists():
        shot.unlink()
    r = _browser(exe, page, tmp_path, "--window-size=1400,3000", f"--screenshot={shot}")
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1400, 3000)
        assert np.asarray(im.convert("L")).std() > 5  # not a blank page


def test_report_cli_thumbs_as_files_unlabelled_folder(trained_digits_run, tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(folder / f"{i:02d}.png")
    out = tmp_path / "rep"
    rc = main(["report", str(trained_digits_run / "checkpoint.pt"), str(folder), "--out", str(out),
               "--thumbs-as-files", "--per-cluster", "4", "--no-progress"])
    assert rc == 0
    assert "cluster sections" in capsys.readouterr().out
    page = (out / "index.html").read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all(s.startswith("thumbs/") and (out / s).is_file() for s in srcs)
    assert "no labels" in page and "majority label" not in page
    if os.environ.get("TWIST_SKIP_BROWSER") == "1" and not shutil.which("chromium"):
        return
    dom = _browser(_chromium(), out / "index.html", tmp_path, "--dump-dom")
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-images-status="ok"' in body and f'data-images-total="{len(srcs)}"' in body


def test_svg_charts_are_well_formed():
    charts = [
        svg_line_chart([("loss", [1, 2, 3], [0.5, float("nan"), 0.2]), ("lr", [1], [1e-3])], "a <title> & more"),
        svg_line_chart([], "empty"),
        svg_bar_chart([3, 0, 5], ["x", "y", "z"], "sizes"),
        svg_bar_chart(list(range(200)), None, "many"),
    ]
    for svg in charts:
        ET.fromstring(svg)  # parses as XML


def test_read_metrics_skips_broken_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1, "loss": 1.0}\nnot json\n\n[1, 2]\n{"epoch": 2, "loss": 0.5}\n{"epoch": 3, "lo')
    assert [r["epoch"] for r in read_metrics(p)] == [1, 2]
    assert read_metrics(tmp_path / "missing.jsonl") == []
