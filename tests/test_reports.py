"""report.html, list_runs and compare on real runs; the page rendered in a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.config import FitConfig
from finetune.errors import CheckpointError
from finetune.reporting.html import SECTIONS
from finetune.reporting.runs import list_runs, read_run, runs_table

from .conftest import copy_classes

# Browsers that can screenshot a page headless, most specific first.
CHROMIUM = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")


class _Page(HTMLParser):
    """The parts of a page the tests look at: section ids, img sources, every link."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section":
            self.sections.append(values.get("id") or "")
        if tag == "img":
            self.images.append(values.get("src") or "")
        self.links += [v or "" for k, v in attrs if k in ("href", "src", "action")]


def _decoded_png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
    image.load()
    assert image.format == "PNG" and image.width >= 200 and image.height >= 150, image.size
    return image


def test_fit_writes_a_self_contained_report(report_run: finetune.FitResult) -> None:
    path = report_run.dir / "report.html"
    assert report_run.report == path and path.is_file()
    text = path.read_text()
    page = _Page(text)
    assert page.sections == list(SECTIONS)
    # pictures: learning curves, augmentation preview, confusion, per-class bars, mistakes
    assert len(page.images) == 5
    for src in page.images:
        _decoded_png(src)
    # Nothing is fetched: no link leaves the page, no stylesheet or script file.
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in page.links)
    assert not re.search(r"https?://|<link|<script|url\(", text)


def test_the_report_says_what_the_run_did(report_run: finetune.FitResult) -> None:
    text = (report_run.dir / "report.html").read_text()
    best = report_run.best
    assert f"{best.val_acc:.3f}" in text and "finetune-top (chosen by you)" in text
    # The dataset: 4 classes, a random split of 8 + 2 images each, no files skipped.
    assert "4 classes, 32 training and 8 validation images (random split, seed 0" in text
    assert '<td>bag</td><td class="num">8</td><td class="num">2</td>' in text
    assert "Skipped files</h3>\n<p>none</p>" in text
    assert "strong: crop 15%-100% of the area" in text  # the augmentation the run used

    # The evaluation is best.pt on the split's validation images, re-found from config.json:
    # it scores exactly the val accuracy that training recorded for the best epoch.
    evaluation = json.loads((report_run.dir / "eval-val" / "evaluation.json").read_text())
    assert evaluation["images"] == 8
    assert evaluation["accuracy"] == pytest.approx(best.val_acc)
    for name in ("confusion.png", "mistakes.png", "per-class.png"):
        assert (report_run.dir / "eval-val" / name).is_file()

    # The reproduce command's recipe holds exactly the configuration the run used.
    recipe = finetune.load_recipe(report_run.dir / "recipe.toml")
    config = json.loads((report_run.dir / "config.json").read_text())
    assert recipe == FitConfig.from_kwargs(**{**config, "out": None})
    assert f"--recipe {report_run.dir / 'recipe.toml'}" in text


def test_a_probe_report_without_its_data(tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 6)
    run = finetune.fit(data, strategy="linear", image_size=32, out=str(tmp_path / "lin"),
                       verbose=False)  # fmt: skip
    text = run.report.read_text()
    assert "None: linear is a probe" in text and "Probe points" in text
    shutil.rmtree(data)
    small = finetune.report(run.dir, max_images=2)  # the data folder is gone: still a page
    text = small.read_text()
    assert _Page(text).sections == list(SECTIONS)
    assert "The data folder cannot be read again" in text and "is not a folder" in text


def test_max_images_takes_a_stratified_sample(report_run: finetune.FitResult) -> None:
    copy = report_run.dir.parent / "sampled"
    shutil.copytree(report_run.dir, copy, ignore=shutil.ignore_patterns("eval-*", "*.html"))
    text = finetune.report(copy, max_images=4).read_text()
    evaluation = json.loads((copy / "eval-val" / "evaluation.json").read_text())
    assert evaluation["images"] == 4
    assert sorted(evaluation["per_class"][c]["support"] for c in evaluation["classes"]) == [1] * 4
    assert "on 4 validation images (a stratified sample of the 8" in text


def test_list_runs_and_compare(report_run: finetune.FitResult, tmp_path: Path) -> None:
    root = report_run.dir.parent
    (root / "killed").mkdir(exist_ok=True)  # stopped before its first epoch: not listed
    (root / "killed" / "config.json").write_text(json.dumps({"strategy": "finetune-all"}))
    (root / "killed" / "metrics.csv").write_text("epoch,train_loss\n")
    runs = list_runs(root)
    top = next(r for r in runs if r.dir == report_run.dir)
    assert "killed" not in [r.dir.name for r in runs]
    assert (top.strategy, top.best.val_acc, len(top.history)) == (
        "finetune-top", report_run.best_metric, 2)  # fmt: skip
    table = runs_table(runs, root).splitlines()
    assert table[0].split() == ["run", "strategy", "val", "acc", "epochs", "train", "time",
                                "date", "report"]  # fmt: skip
    row = next(line for line in table if line.startswith("top "))
    assert f"{report_run.best_metric:.3f}" in row and "2/2" in row and row.endswith("yes")

    comparison = finetune.compare([report_run.dir, report_run.dir], tmp_path / "c.png")
    lines = comparison.table().splitlines()
    assert len(lines) == 3 and "tf_efficientnet_lite0" in lines[1] and " 32 " in lines[1]
    with Image.open(comparison.plot) as image:
        assert image.format == "PNG" and image.width > 800

    with pytest.raises(CheckpointError, match=r"not a run directory.*finetune runs"):
        read_run(tmp_path)
    with pytest.raises(CheckpointError, match="no epoch finished"):
        read_run(root / "killed")
    with pytest.raises(CheckpointError, match="is not a folder"):
        list_runs(tmp_path / "nothing")


def _chromium() -> str:
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        f"no headless browser found (looked for {', '.join(CHROMIUM)} on PATH); install one "
        "to render the report, e.g. `apt-get install chromium`"
    )


def test_the_report_renders_in_a_real_browser(
    report_run: finetune.FitResult, tmp_path: Path
) -> None:
    browser = _chromium()
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,3000", (report_run.dir / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1200, 3000)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 20  # not a blank page: text, tables and plots
    # The pictures were drawn: a good share of the page is not the near-white background.
    assert (pixels < 200).mean() > 0.05
