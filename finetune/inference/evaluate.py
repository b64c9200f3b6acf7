"""Predictions on a labelled folder -> how good the model is, and where it goes wrong.

:func:`evaluate` classifies every image of a folder-per-class tree and returns an
:class:`Evaluation`: accuracy, top-k accuracy, per-class precision/recall/F1 (scikit-learn), the
confusion matrix and the most confidently wrong images. :meth:`Evaluation.save` writes
``evaluation.json``, ``confusion.png`` and ``mistakes.png`` (matplotlib, headless).

An image that cannot be read is left out of the metrics, with its reason, and the others are
measured: :attr:`Evaluation.skipped` lists them, and so does ``evaluation.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from finetune.data.scan import iter_image_files
from finetune.errors import DataError
from finetune.files import atomic_write
from finetune.inference.inputs import OnSkip, Skipped, UnreadableImage, read_image, report_skip

if TYPE_CHECKING:
    from finetune.inference.predict import BasePredictor

__all__ = ["Evaluation", "Mistake", "evaluate", "evaluate_samples"]


@dataclass(frozen=True)
class Mistake:
    """An image the model got wrong, with how sure it was."""

    path: Path
    true: str
    predicted: str
    probability: float  # of the predicted class


@dataclass(frozen=True)
class Evaluation:
    """A model's predictions on a labelled folder, with the usual metrics derived from them."""

    classes: tuple[str, ...]  # the model's classes; labels and columns use this order
    paths: tuple[Path, ...]
    labels: np.ndarray  # (N,) true class indices
    probabilities: np.ndarray  # (N, num_classes) softmax
    top_k: int
    tta: str = "none"  # test-time augmentation the probabilities were averaged over
    model: dict[str, Any] | None = None  # the model file(s) and checkpoint choice (describe())
    skipped: tuple[Skipped, ...] = ()  # images that could not be read: not in the metrics

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.predicted == self.labels)) if len(self.labels) else 0.0

    @property
    def top_k_accuracy(self) -> float:
        """Share of images whose class is among the ``top_k`` most probable."""
        k = min(self.top_k, len(self.classes))
        ranked = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return float(np.mean((ranked == self.labels[:, None]).any(1))) if len(ranked) else 0.0

    def per_class(self) -> dict[str, dict[str, float]]:
        """Precision, recall, F1 and support per class (classes absent from the folder score 0)."""
        from sklearn.metrics import precision_recall_fscore_support

        labels = list(range(len(self.classes)))
        p, r, f, n = precision_recall_fscore_support(
            self.labels, self.predicted, labels=labels, zero_division=0
        )
        return {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                   "support": int(n[i])}
            for i, name in enumerate(self.classes)
        }  # fmt: skip

    def confusion(self) -> np.ndarray:
        """(true, predicted) counts, rows and columns in ``classes`` order."""
        from sklearn.metrics import confusion_matrix

        return confusion_matrix(self.labels, self.predicted, labels=range(len(self.classes)))

    def mistakes(self, limit: int = 16) -> list[Mistake]:
        """The wrongly classified images, most confident first."""
        wrong = np.flatnonzero(self.predicted != self.labels)
        confidence = self.probabilities[wrong, self.predicted[wrong]]
        order = wrong[np.argsort(-confidence, kind="stable")][:limit]
        return [
            Mistake(
                self.paths[i],
                self.classes[self.labels[i]],
                self.classes[self.predicted[i]],
                float(self.probabilities[i, self.predicted[i]]),
            )
            for i in order
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": len(self.labels),
            "tta": self.tta,
            "model": self.model,
            "accuracy": self.accuracy,
            f"top_{self.top_k}_accuracy": self.top_k_accuracy,
            "per_class": self.per_class(),
            "classes": list(self.classes),
            "confusion": self.confusion().tolist(),
            "most_confident_mistakes": [
                {**m.__dict__, "path": str(m.path)} for m in self.mistakes()
            ],
            "skipped": [s.to_dict() for s in self.skipped],
        }

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write evaluation.json, confusion.png and mistakes.png into ``out``; their paths.

        Only these fixed file names are written, so class names (which may contain anything)
        never become paths.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "json": out / "evaluation.json",
            "confusion": out / "confusion.png",
            "mistakes": out / "mistakes.png",
        }
        atomic_write(files["json"], json.dumps(self.to_dict(), indent=2) + "\n")
        _save_png(_confusion_figure(self), files["confusion"])
        _save_png(_mistakes_figure(self.mistakes()), files["mistakes"])
        return files


def _save_png(figure: Any, path: Path) -> None:  # figure: a matplotlib Figure
    atomic_write(path, lambda f: figure.savefig(f, dpi=120, bbox_inches="tight", format="png"))


def _confusion_figure(evaluation: Evaluation):  # -> matplotlib Figure
    from matplotlib.figure import Figure

    matrix = evaluation.confusion()
    n = len(evaluation.classes)
    fig = Figure(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), evaluation.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), evaluation.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {evaluation.accuracy:.3f} on {len(evaluation.labels)} images")
    top = matrix.max() or 1
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if count > top / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    return fig


def _mistakes_figure(mistakes: list[Mistake]):  # -> matplotlib Figure
    from matplotlib.figure import Figure

    columns = 4
    rows = max(1, -(-len(mistakes) // columns))
    fig = Figure(figsize=(2.4 * columns, 2.6 * rows))
    if not mistakes:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center")
        return fig
    for index, mistake in enumerate(mistakes):
        ax = fig.add_subplot(rows, columns, index + 1)
        try:  # read a moment ago to be classified; it may have changed since
            ax.imshow(read_image(mistake.path))
        except UnreadableImage as exc:
            ax.text(0.5, 0.5, f"cannot show it:\n{exc.reason}", ha="center", va="center",
                    fontsize=6, wrap=True)  # fmt: skip
        ax.set_title(
            f"true {mistake.true}\npredicted {mistake.predicted} {mistake.probability:.2f}",
            fontsize=8,
        )
        ax.axis("off")
    fig.suptitle("most confidently wrong")
    return fig


def evaluate(
    predictor: BasePredictor,
    folder: str | Path,
    top_k: int = 5,
    batch_size: int = 32,
    tta: str = "auto",
    on_skip: OnSkip | None = None,
) -> Evaluation:
    """Classify every image of ``folder`` (one sub-folder per class, named as the model's
    classes) and measure the result; ``tta`` and ``on_skip`` as in
    :meth:`Predictor.iter_proba` (an image that cannot be read is left out, and listed in
    :attr:`Evaluation.skipped`). ``predictor`` may be an
    :class:`~finetune.inference.predict.Ensemble`: its averaged probabilities are measured.

    Raises:
        DataError: ``folder`` has no class folders with images, or classes the model lacks.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder. Give a folder with one sub-folder per class.")
    class_dirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    samples = [(path, d.name) for d in class_dirs for path in iter_image_files(d)]
    if not samples:
        raise DataError(f"{folder} holds no class sub-folders with images.")
    unknown = sorted({name for _, name in samples} - set(predictor.classes))
    if unknown:
        raise DataError(
            f"{folder} has classes the model does not know: {', '.join(unknown)}. The model's "
            f"classes are: {', '.join(predictor.classes)}."
        )
    return evaluate_samples(
        predictor, samples, top_k, batch_size, tta, where=f"the images in {folder}",
        on_skip=on_skip,
    )  # fmt: skip


def evaluate_samples(
    predictor: BasePredictor,
    samples: Sequence[tuple[Path, str]],
    top_k: int = 5,
    batch_size: int = 32,
    tta: str = "auto",
    where: str = "the images",
    progress: bool = True,
    desc: str = "evaluating",
    on_skip: OnSkip | None = None,
) -> Evaluation:
    """Classify labelled images and measure the result: what :func:`evaluate` does once it has
    found a folder's images, and what the report does with a run's validation images.

    Args:
        predictor: The model (or :class:`~finetune.inference.predict.Ensemble`) to measure.
        samples: (image file, true class name) pairs; every name must be one of the
            predictor's classes.
        top_k: The k of the top-k accuracy.
        batch_size: Images per batch.
        tta: Test-time augmentation, as in :meth:`Predictor.iter_proba`.
        where: The images, as the error names them ("the images in FOLDER").
        progress: Show a progress bar (on a terminal only).
        desc: The progress bar's label.
        on_skip: Told of each image that cannot be read, which is left out (see
            :meth:`Predictor.iter_proba`) [default: a warning per image]; the
            :class:`Evaluation` lists them too.

    Raises:
        DataError: None of the images could be read (the message gives the first reasons).
    """
    index = {name: i for i, name in enumerate(predictor.classes)}
    truth = dict(samples)
    paths, labels, rows = [], [], []
    skipped: list[Skipped] = []

    def note(skip: Skipped) -> None:
        skipped.append(skip)
        report_skip(skip, on_skip)
        bar.update()

    # disable=None: the bar shows on a terminal only, never in logs or captured output
    with tqdm(total=len(samples), desc=desc, unit="image", leave=False,
              disable=None if progress else True) as bar:  # fmt: skip
        for path, probs in predictor.iter_proba([p for p, _ in samples], batch_size, tta, note):
            paths.append(Path(path))
            labels.append(index[truth[path]])
            rows.append(probs)
            bar.update()
    if not rows:
        reasons = "".join(f"; {s.path}: {s.reason}" for s in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise DataError(f"None of {where} could be read{reasons}{more}.")
    return Evaluation(
        predictor.classes,
        tuple(paths),
        np.array(labels),
        np.stack(rows),
        max(1, top_k),
        predictor.resolve_tta(tta),
        predictor.describe(),
        tuple(skipped),
    )
