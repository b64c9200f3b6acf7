"""A run directory -> what happened, for people: ``report.html``.

:func:`report` writes one self-contained page per run (every picture a base64 data URI, the CSS
inline, nothing fetched): the data, the strategy decision, the augmentation, the learning
curves, an evaluation of the best checkpoint on the validation images and the command that
reproduces the run. Tables and plots of many runs are :mod:`finetune.reporting.runs`.

The validation images are found again exactly as ``fit`` (and ``resume``) found them:
``scan_folder(data, val_split, seed)`` over the run's data folder with its recorded split and
seed, which gives the ``val/`` folder of a train/val tree and the same seeded random split
otherwise; they are then classified with :func:`finetune.load` and measured as
``finetune evaluate`` measures a folder.

Module named ``reports``, not ``report``: ``finetune.report`` is the function, and a submodule
of that name would replace it on the package once imported.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import shlex
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune import __version__
from finetune.config import DEFAULT_MAX_IMAGES  # torch-free there: the CLI's default
from finetune.errors import CheckpointError, DataError, FinetuneError
from finetune.files import atomic_write
from finetune.reporting.runs import REPORT_NAME, RunSummary, _shown, duration, read_run
from finetune.run.layout import RunDir

if TYPE_CHECKING:
    from torch import nn

    from finetune.data.scan import DatasetSplit, Sample
    from finetune.data.transforms import Lighting
    from finetune.inference.evaluate import Evaluation

__all__ = ["DEFAULT_MAX_IMAGES", "REPORT_NAME", "SECTIONS", "report"]

# The report's sections, in page order; each is a <section id=...> (tests look for them).
SECTIONS = ("summary", "dataset", "decision", "augmentation", "curves", "evaluation", "files",
            "reproduce")  # fmt: skip


def report(
    run_dir: str | Path,
    *,
    head: nn.Module | None = None,
    max_images: int | None = DEFAULT_MAX_IMAGES,
    device: str | None = None,
    progress: bool = False,
    split: DatasetSplit | None = None,
) -> Path:
    """Write ``RUN/report.html``: one self-contained page about a run (see the module doc).

    Beside it go the pictures it embeds (``curves.png``, ``augment-preview.png``,
    ``eval-val/`` with evaluation.json, confusion.png, per-class.png and mistakes.png) and
    ``recipe.toml``, the run's configuration as a recipe for the reproduce command.

    Args:
        run_dir: A run directory written by ``finetune fit``.
        head: An instance of the custom head the run trained, if any (to load ``best.pt``).
        max_images: Classify at most this many validation images (a stratified sample beyond);
            ``None``: all of them.
        device: Where to classify them [default: the run's device when it is available].
        progress: Show a progress bar while classifying (when stderr is a terminal).
        split: The run's split, when the caller has it (``fit`` does): the data folder is
            then not scanned again [default: scanned as the run scanned it].

    Returns:
        The path of ``report.html``. A part it cannot build (the data folder is gone, best.pt
        cannot be evaluated) is left out, saying why on the page and in a warning.

    Raises:
        CheckpointError: ``run_dir`` is not a run directory, or no epoch of it finished.
    """
    run = read_run(run_dir)
    page = _Page(run, head, max_images, device, progress, split)
    written = atomic_write(RunDir(run.dir).report, page.html())
    for why in dict.fromkeys(page.problems.values()):  # the page says it too, in its section
        warnings.warn(f"{written}: {why}", stacklevel=2)
    return written


# --- the page -----------------------------------------------------------------------------


class _Page:
    """Gathers what the report shows (reading the run, re-scanning the data, evaluating) and
    renders it; one method per section."""

    def __init__(
        self,
        run: RunSummary,
        head: nn.Module | None,
        max_images: int | None,
        device: str | None,
        progress: bool,
        split: DatasetSplit | None = None,
    ) -> None:
        from finetune.strategies import get_strategy

        self.run, self.dir, self.config = run, run.dir, run.config
        self.files = RunDir(run.dir)
        self.trains_backbone = get_strategy(self.config["strategy"]).trains_backbone
        self.scan = _read_json(self.files.scan)
        self.decision = _read_json(self.files.decision)
        self.probe = _read_json(self.files.probe)
        self.tta = _read_json(self.files.tta)
        self.classes = _read_json(self.files.classes) or []
        self.data = self._data_folder()
        self.split: DatasetSplit | None = split
        self.problems: dict[str, str] = {}  # section -> why part of it is missing
        if split is None:
            try:
                self.split = _rescan(self.data, self.config)
            except DataError as exc:
                self.problems["data"] = f"The data folder cannot be read again: {exc}"
        self.evaluation: Evaluation | None = None
        self.evaluated_of = 0  # validation images in the split
        if self.split is not None:
            try:
                self.evaluation = _evaluate_val(
                    self.dir, self.split, head, max_images, device or self._device(), progress
                )
                self.evaluated_of = len(self.split.val)
            except FinetuneError as exc:
                self.problems["evaluation"] = f"best.pt could not be evaluated: {exc}"

    def _data_folder(self) -> Path | None:
        """The run's data folder: as its checkpoint records it (absolute), else scan.json's."""
        from finetune.run.checkpoint import find_checkpoint, load_checkpoint

        try:
            return Path(load_checkpoint(find_checkpoint(self.dir))["data"])
        except (FinetuneError, KeyError):
            root = (self.scan or {}).get("root")
            return Path(root) if root else None

    def _pca_lighting(self) -> Lighting | None:
        """The PCA of the training images' colours the run measured (in its checkpoint)."""
        from finetune.data.transforms import Lighting
        from finetune.run.checkpoint import find_checkpoint, load_checkpoint

        try:
            saved = load_checkpoint(find_checkpoint(self.dir)).get("augmentation") or {}
        except FinetuneError:
            return None
        pca = saved.get("pca_lighting")
        return Lighting.from_dict(pca) if pca else None

    def _device(self) -> str:
        import torch

        wanted = str(self.config.get("device") or "cpu")
        return wanted if wanted == "cpu" or torch.cuda.is_available() else "cpu"

    def html(self) -> str:
        best = self.run.best
        title = f"finetune report: {self.dir.name}"
        cards = [
            ("best val acc", f"{best.val_acc:.3f}"),
            ("strategy", self.run.strategy),
            ("best epoch", f"{best.epoch}/{len(self.run.history)}"),
            ("training time", duration(self.run.seconds)),
            ("classes", str(len(self.classes))),
        ]
        nav = " · ".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS)
        body = "\n".join(
            [
                self._summary(cards),
                self._dataset(),
                self._decision(),
                self._augmentation(),
                self._curves(),
                self._evaluation(),
                self._files(),
                self._reproduce(),
            ]
        )
        return _TEMPLATE.format(
            title=_e(title), css=_CSS, nav=nav, body=body, version=_e(__version__),
            date=_e(datetime.now().strftime("%Y-%m-%d %H:%M")),
        )  # fmt: skip

    def _summary(self, cards: list[tuple[str, str]]) -> str:
        run, config = self.run, self.config
        best, ema = run.best, [r for r in run.history if r.ema_best]
        rows = [
            ("run", _e(self.dir)),
            ("data", _e(_shown(self.data)) if self.data else "unknown"),
            ("strategy", _e(run.strategy) + (
                f" (auto: {_e(self.decision['cell'])})" if self.decision else " (chosen by you)")),
            ("model", f"{_e(run.model)} at {_e(config.get('image_size'))} px"),
            ("epochs", f"{len(run.history)} of {run.planned_epochs}"
             + (" (stopped early)" if len(run.history) < run.planned_epochs else "")),
            ("best epoch", f"{best.epoch}: val acc {best.val_acc:.3f}, val loss "
             f"{best.val_loss:.3f}, train acc {best.train_acc:.3f} (gap {best.gap:+.3f})"),
            *([("auto kept", _e(_kept_line(self.decision["kept"])))]
              if self.decision and self.decision.get("kept") else []),
            *([("EMA weights", f"best val acc {ema[-1].ema_val_acc:.3f} at epoch "
                f"{ema[-1].epoch} (ema.pt)")] if ema else []),
            *([("test-time aug.", _e(_tta_line(self.tta, self.files.tta)))]
              if self.tta else []),
            ("training time", f"{duration(run.seconds)} (the epochs; data scan and model "
             "load not counted)"),
            ("finished", run.date.strftime("%Y-%m-%d %H:%M")),
        ]  # fmt: skip
        card_html = "".join(
            f'<div class="card"><div class="value">{_e(v)}</div><div>{_e(k)}</div></div>'
            for k, v in cards
        )
        return _section(
            "summary", "Summary", f'<div class="cards">{card_html}</div>' + _pairs(rows)
        )

    def _dataset(self) -> str:
        parts = []
        if self.split is not None:
            split = self.split
            train, val = split.counts("train"), split.counts("val")
            how = f"{split.layout}, seed {self.config.get('seed')}"
            if "random" in split.layout:
                how += f", val split {self.config.get('val_split')}"
            parts.append(
                f"<p>{_e(_shown(split.root))}: {len(split.classes)} classes, "
                f"{len(split.train)} training and {len(split.val)} validation images "
                f"({_e(how)}); median image side {split.median_side} px.</p>"
            )
            rows = [[name, train[name], val[name]] for name in split.classes]
            rows.append(["total", len(split.train), len(split.val)])
            parts.append(_table(["class", "train", "val"], rows, right={1, 2}))
        else:
            parts.append(f'<p class="warn">{_e(self.problems.get("data", ""))}</p>')
            parts.append(f"<p>Classes ({len(self.classes)}): {_e(', '.join(self.classes))}</p>")
        if self.scan:
            scan = self.scan
            parts.append(
                f"<p>Checked {scan['files']} files: {scan['images']} usable images, "
                f"{len(scan['skipped'])} skipped, {len(scan['notes'])} noted, "
                f"{len(scan['leaks'])} identical-file groups; largest class / smallest "
                f"{scan['imbalance']:.1f}x.</p>"
            )
            parts.append("<h3>Skipped files</h3>")
            parts.append(_listing([(s["path"], s["reason"]) for s in scan["skipped"]], "none"))
            if scan["notes"]:
                parts.append("<h3>Noted (used)</h3>")
                parts.append(_listing([(n["path"], n["note"]) for n in scan["notes"]], "none"))
            if scan["leaks"]:
                parts.append("<h3>Identical files (leakage)</h3>")
                parts.append(
                    _listing([(", ".join(k["paths"]), k["what"]) for k in scan["leaks"]], "none")
                )
        return _section("dataset", "Dataset", "\n".join(parts))

    def _decision(self) -> str:
        parts = []
        d = self.decision
        if d:
            size = d["size"]
            shift = d.get("batchnorm_shift")
            limits = d.get("thresholds", {})
            parts.append(
                f"<p><code>--strategy auto</code> measured the data and chose "
                f"<b>{_e(d['strategy'])}</b>: <b>{_e(d['cell'])}</b>.</p>"
            )
            parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in d["reasons"]) + "</ul>")
            measured = [
                ("training images per class", f"median {size['per_class_median']:g}, min "
                 f"{size['per_class_min']}, max {size['per_class_max']}"),
                ("BatchNorm shift", "not measured" if shift is None else f"{shift:.3f}"),
                *((name.replace("_", " "), f"{value:g}") for name, value in limits.items()),
                ("estimated training time", duration(d.get("estimate_seconds", 0.0))),
            ]  # fmt: skip
            parts.append("<h3>Measurements</h3>" + _pairs([(k, _e(v)) for k, v in measured]))
            if d.get("hyperparameters"):
                chosen = [(k, _e(_value(v))) for k, v in d["hyperparameters"].items()]
                parts.append("<h3>Settings</h3>" + _pairs(chosen))
        else:
            parts.append(
                f"<p>You chose <code>--strategy {_e(self.run.strategy)}</code>; auto did not "
                "run, so nothing was measured. <code>finetune plan DATA</code> shows what auto "
                "would choose.</p>"
            )
            keys = ("model", "image_size", "epochs", "batch_size", "optimizer", "lr",
                    "schedule", "weight_decay", "unfreeze", "balance", "ema")  # fmt: skip
            parts.append(_pairs([(k, _e(_value(self.config.get(k)))) for k in keys]))
        if self.probe:
            chosen = self.probe["chosen"]
            rows = [
                [point + (" (chosen)" if point == chosen else ""), f"{p['cv_accuracy']:.3f}",
                 f"{p['C']:g}"]
                for point, p in self.probe["points"].items()
            ]  # fmt: skip
            parts.append(
                "<h3>Probe points</h3><p>Cross-validated accuracy of a logistic regression on "
                "each point's features (probe.json); the best point's network is kept.</p>"
                + _table(["features at", "cv accuracy", "C"], rows, right={1, 2})
            )
        return _section("decision", "Strategy decision", "\n".join(parts))

    def _augmentation(self) -> str:
        if not self.trains_backbone:
            text = (
                f"<p>None: {_e(self.run.strategy)} is a probe. It runs the frozen backbone once "
                "over un-augmented images and fits a logistic regression on those features, so "
                "training images are never augmented.</p>"
            )
            return _section("augmentation", "Augmentation", text)
        from finetune.config import FitConfig
        from finetune.data.transforms import augmentation_of
        from finetune.reporting.preview import augment_preview

        config = FitConfig.from_kwargs(**self.config)
        parts = [f"<p>{_e(augmentation_of(config).describe())}</p>"]
        if self.split is None:
            parts.append(f'<p class="warn">No preview: {_e(self.problems["data"])}</p>')
        else:
            out = self.files.augment_preview
            augment_preview(self.split.root, out, config, pca=self._pca_lighting())
            parts.append(
                "<p>Left: a training image of a class; right: augmented versions of it, as the "
                "model saw them in training (the same options, a fresh random draw).</p>"
                + _img(out, "training images and augmented versions of them", width=640)
            )
        return _section("augmentation", "Augmentation", "\n".join(parts))

    def _curves(self) -> str:
        from finetune.reporting.figures import learning_curves, save_png

        history = self.run.history
        out = save_png(learning_curves(history, self.dir.name), self.files.curves)
        ema = any(not math.isnan(r.ema_val_acc) for r in history)
        header = ["epoch", "train loss", "train acc", "val loss", "val acc", "gap", "lr", "time"]
        header += ["ema val acc"] if ema else []
        rows = [
            [str(r.epoch) + (" *" if r.best else ""), f"{r.train_loss:.3f}", f"{r.train_acc:.3f}",
             f"{r.val_loss:.3f}", f"{r.val_acc:.3f}", f"{r.gap:+.3f}",
             f"{r.lr:.2e}" if r.lr > 0 else "-", f"{r.seconds:.1f}s",
             *([f"{r.ema_val_acc:.3f}"] if ema else [])]
            for r in history
        ]  # fmt: skip
        if self.trains_backbone:
            how = (
                "The shaded band is the train/val accuracy gap (train accuracy is measured on "
                "augmented images with dropout on); * marks the epochs that improved the val "
                "accuracy, the last of them is in best.pt."
            )
        else:
            how = (
                "A probe has one pass, not epochs: its train and val scores are those of the "
                "fitted logistic regression on the un-augmented features."
            )
        text = (
            f"<p>From metrics.csv. {how}</p>"
            + _img(out, "learning curves: loss and accuracy per epoch")
            + _table(header, rows, right=set(range(1, len(header))))
        )
        return _section("curves", "Learning curves", text)

    def _evaluation(self) -> str:
        parts = []
        ev = self.evaluation
        if ev is None:
            why = self.problems.get("evaluation") or self.problems.get("data", "")
            parts.append(f'<p class="warn">{_e(why)}</p>')
        else:
            from finetune.reporting.figures import per_class_figure, save_png

            folder = self.files.evaluation("val")
            files = ev.save(folder)
            per_class = save_png(per_class_figure(ev), folder / "per-class.png")
            sample = (
                f" (a stratified sample of the {self.evaluated_of}; --max-images to change)"
                if len(ev.labels) < self.evaluated_of
                else ""
            )
            correct = int((ev.predicted == ev.labels).sum())
            parts.append(
                f"<p>best.pt on {len(ev.labels)} validation images{sample}: accuracy "
                f"<b>{ev.accuracy:.3f}</b> ({correct}/{len(ev.labels)}), top-{ev.top_k} "
                f"{ev.top_k_accuracy:.3f}. Written to {_e(_shown(folder))}.</p>"
            )
            rows = [
                [name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                 m["support"]]
                for name, m in ev.per_class().items()
            ]  # fmt: skip
            parts.append('<div class="row">')
            parts.append(_img(files["confusion"], "confusion matrix on the validation images"))
            parts.append(_img(per_class, "accuracy per class on the validation images"))
            parts.append("</div>")
            parts.append(
                _table(["class", "precision", "recall", "f1", "support"], rows, right={1, 2, 3, 4})
            )
            parts.append("<h3>Most confidently wrong</h3>")
            parts.append(
                _img(files["mistakes"], "the most confidently wrong validation images", 860)
            )
        others = [
            folder / "evaluation.json"
            for folder in self.files.evaluations()
            if folder != self.files.evaluation("val") and (folder / "evaluation.json").is_file()
        ]
        if others:
            rows = []
            for path in others:
                other = json.loads(path.read_text())
                rows.append([path.parent.name, f"{other['accuracy']:.3f}", other["images"],
                             other.get("tta", "none")])  # fmt: skip
            parts.append(
                "<h3>Other evaluations (finetune evaluate)</h3>"
                + _table(["folder", "accuracy", "images", "tta"], rows, right={1, 2})
            )
        return _section("evaluation", "Evaluation", "\n".join(parts))

    def _files(self) -> str:
        checkpoints = self.files.checkpoints()
        exports = self.files.exports()
        rows = [(_e(p.name), _e(_size(p))) for p in checkpoints]
        text = "<h3>Checkpoints</h3>" + _pairs(rows)
        text += "<h3>Exports</h3>" + (
            _pairs([(_e(p.name), _e(_size(p))) for p in exports])
            if exports
            else f"<p>None yet: <code>{_e(_cmd('export', self.dir))}</code></p>"
        )
        records = [p.name for p in self.files.records() if p.is_file() or p == self.files.recipe]
        text += f"<h3>Records</h3><p>{_e(', '.join(records))} in {_e(_shown(self.dir))}</p>"
        return _section("files", "Files", text)

    def _reproduce(self) -> str:
        from finetune.config import FitConfig
        from finetune.recipes import write_recipe

        config = FitConfig.from_kwargs(**{**self.config, "out": None})
        recipe = write_recipe(
            self.files.recipe,
            config,
            f"The configuration of run {self.dir.name}: every setting that differs from the "
            "defaults,\nauto's choices included. Reproduce it with "
            f"`finetune fit DATA --recipe {self.files.recipe}`.",
        )
        data = _shown(self.data) if self.data else "DATA"
        command = _cmd("fit", data, "--recipe", recipe)
        test = self.data / "test" if self.data is not None else None
        folder = test if test is not None and test.is_dir() else Path("LABELLED_FOLDER")
        text = (
            "<p>The same data, split, seed and every setting, from the recipe written beside "
            "this page (recipe.toml, from config.json):</p>"
            f"<pre>{_e(command)}</pre><pre>{_e(recipe.read_text())}</pre>"
            "<h3>Next</h3>"
            f"<pre>{_e(_cmd('predict', self.dir, 'IMAGES_OR_FOLDERS...'))}\n"
            f"{_e(_cmd('evaluate', self.dir, _shown(folder)))}\n"
            f"{_e(_cmd('export', self.dir))}\n"
            f"{_e(_cmd('report', self.dir))}</pre>"
        )
        return _section("reproduce", "Reproduce", text)


# --- gathering ------------------------------------------------------------------------------


def _rescan(data: Path | None, config: dict[str, Any]) -> DatasetSplit:
    """The run's split, found again as fit found it (same folder, val_split and seed)."""
    from finetune.data.scan import scan_folder

    if data is None:
        raise DataError("neither best.pt nor scan.json records the data folder.")
    return scan_folder(data, val_split=config.get("val_split", 0.2), seed=config.get("seed", 0))


def _sample(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` samples, each class keeping its share (at least one image)."""
    if limit is None or len(samples) <= limit:
        return list(samples)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = np.random.default_rng(0)
    picked = []
    for members in by_class.values():
        k = max(1, round(limit * len(members) / len(samples)))
        picked += [members[i] for i in sorted(rng.choice(len(members), k, replace=False))]
    return picked


def _evaluate_val(
    run_dir: Path,
    split: DatasetSplit,
    head: nn.Module | None,
    max_images: int | None,
    device: str,
    progress: bool,
) -> Evaluation:
    """best.pt on the run's validation images, measured by finetune evaluate's own code."""
    from finetune.inference.evaluate import evaluate_samples
    from finetune.inference.predict import load

    predictor = load(run_dir, head=copy.deepcopy(head), device=device)
    samples = [(s.path, split.classes[s.label]) for s in _sample(split.val, max_images)]
    batch = int(json.loads(RunDir(run_dir).config.read_text()).get("batch_size") or 32)
    top_k = min(5, len(predictor.classes))
    where = f"the {len(samples)} validation images"
    # The centre crop, as the epochs scored val (the TTA modes' scores have a row of their
    # own): asked for by name, so the warning that none lost to the run's choice is dropped.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*--tta none scored", category=UserWarning)
        return evaluate_samples(
            predictor, samples, top_k, batch, tta="none", where=where, progress=progress,
            desc="evaluating (val)",
        )  # fmt: skip


def _kept_line(record: dict[str, Any]) -> str:
    """decision.json's comparison of auto's probe baseline and its fine-tune, in one line."""
    from finetune.strategies.auto import Comparison

    try:
        return Comparison(**record).describe()
    except TypeError as exc:  # fields missing or unknown: an edited file
        return f"the comparison in the decision record cannot be read ({exc})"


def _tta_line(record: dict[str, Any], path: Path) -> str:
    """tta.json in one line: the modes scored and the choice (runs before the modes were
    compared recorded one mode and its val accuracy)."""
    from finetune.inference.tta import TTAChoice

    if "chosen" not in record:
        return f"{record['tta']}: val acc {record['val_acc']:.3f}"
    try:
        choice = TTAChoice.from_dict(record, str(path))
    except CheckpointError as exc:
        return str(exc)
    return f"{choice.describe()}; predict and evaluate use {choice.chosen} by default"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# --- formatting -----------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value))


def _section(id_: str, title: str, body: str) -> str:
    return f'<section id="{id_}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _img(path: Path, alt: str, width: int | None = None) -> str:
    """``path`` (a PNG) embedded as a data URI, the page needing no other file; shown at most
    ``width`` CSS pixels wide (default: the page's width)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    style = f' style="max-width: {width}px"' if width else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"{style}></figure>'


def _pairs(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column key/value table; values are HTML already."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="pairs">{body}</table>'


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], right: set[int]) -> str:
    def cell(tag: str, i: int, value: object) -> str:
        align = ' class="num"' if i in right else ""
        return f"<{tag}{align}>{_e(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _listing(items: Sequence[tuple[str, str]], empty: str, limit: int = 50) -> str:
    if not items:
        return f"<p>{_e(empty)}</p>"
    shown = "".join(f"<li><code>{_e(p)}</code> ({_e(why)})</li>" for p, why in items[:limit])
    more = f"<li>and {len(items) - limit} more (scan.json)</li>" if len(items) > limit else ""
    return f"<ul>{shown}{more}</ul>"


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


def _size(path: Path) -> str:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return f"{sum(p.stat().st_size for p in files) / 1e6:.1f} MB"


def _cmd(*words: object) -> str:
    return shlex.join(["finetune", *(_shown(w) if isinstance(w, Path) else str(w) for w in words)])


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       max-width: 1100px; margin: 0 auto; padding: 24px 28px 60px; background: #fafbfc; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; border-bottom: 2px solid #d7dde6; padding-bottom: 4px; margin-top: 34px; }
h3 { font-size: 15px; margin: 18px 0 6px; color: #3b4658; }
nav { color: #6b7688; margin-bottom: 12px; } nav a { color: #2456a6; text-decoration: none; }
.meta { color: #6b7688; font-size: 13px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 14px 0; }
.card { background: white; border: 1px solid #d7dde6; border-radius: 8px; padding: 10px 16px;
        min-width: 120px; color: #6b7688; font-size: 13px; }
.card .value { font-size: 22px; font-weight: 600; color: #1d2330; }
table { border-collapse: collapse; margin: 8px 0; background: white; font-size: 13.5px; }
th, td { border: 1px solid #e1e6ee; padding: 3px 10px; text-align: left; vertical-align: top; }
thead th { background: #eef2f7; } .num { text-align: right; font-variant-numeric: tabular-nums; }
table.pairs th { background: #f3f5f9; font-weight: 600; white-space: nowrap; }
figure { margin: 10px 0; } img { max-width: 100%; height: auto; border: 1px solid #e1e6ee;
        background: white; }
.row { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.row figure { flex: 1 1 400px; }
pre { background: #1d2330; color: #e8edf5; padding: 10px 14px; border-radius: 6px;
      overflow-x: auto; font-size: 12.5px; }
code { background: #eef2f7; padding: 0 3px; border-radius: 3px; }
.warn { color: #9a3b00; }
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1>{title}</h1>
<p class="meta">written by finetune {version} on {date}; regenerate with finetune report</p>
<nav>{nav}</nav>
{body}
</body>
</html>
"""
