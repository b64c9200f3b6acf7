"""Which test-time augmentation helps a model, measured on its validation images.

A model that never saw crops in training (a probe) can be hurt by corner crops: on data whose
signal sits near the edges, 10crop cost a probe 31 points of accuracy (issue 20). So ``fit``
does not assume TTA helps; it measures. One pass over the ten views of ``10crop`` (the four
corner crops and the centre crop, each also mirrored: :class:`~finetune.data.transforms.
TestTimeViews`) gives all three modes at once: ``none`` is the centre view, ``flip`` the centre
view and its mirror, ``10crop`` all ten. The most accurate mode is chosen, a tie going to the
one with fewer views (cheaper at predict time); the reason given compares it with the centre
crop image by image, with the p-value of a one-sided exact sign test (McNemar's test), so that
a gain of a few images is not taken for more than it may be. (Choosing a mode with more views
only when that test passes gave up more test accuracy in ``benchmarks/tta_choice.py``: 10crop
helped the fine-tunes there by more than small validation sets can prove; docs/augmentation.md
has the numbers.) The choice is stored in
``best.pt`` (and every export of it), ``predict`` and ``evaluate`` use it under ``--tta auto``
(their default), and an explicit ``--tta`` that scored below it on val gets a warning with the
numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune.config import TTA_MODES
from finetune.errors import CheckpointError
from finetune.inference.inputs import UnreadableImage, read_image

if TYPE_CHECKING:
    from finetune.inference.predict import BasePredictor

__all__ = [
    "CHANCE",
    "MODE_VIEWS",
    "SCORE_IMAGES",
    "VIEW_NAMES",
    "TTAChoice",
    "choose",
    "correct_by_mode",
    "score_tta",
    "sign_test",
    "ten_views",
]

# The ten views of 10crop, in the order TestTimeViews.crops makes them.
VIEW_NAMES = (
    "top-left",
    "top-right",
    "bottom-left",
    "bottom-right",
    "centre",
    "top-left mirrored",
    "top-right mirrored",
    "bottom-left mirrored",
    "bottom-right mirrored",
    "centre mirrored",
)
MODE_VIEWS = {"none": (4,), "flip": (4, 9), "10crop": tuple(range(10))}  # views each averages
# Validation images scored, at most (a seeded sample beyond): ten views each, so on 2 CPU cores
# at 224 px about a minute for a small model; the modes' differences that matter (the 31
# points above) show on far fewer.
SCORE_IMAGES = 500
CHANCE = 0.1  # a sign-test p-value above this: the gain may be chance (said, not acted on)


@dataclass(frozen=True)
class TTAChoice:
    """The test-time augmentation a model's predictions use by default, and why."""

    chosen: str  # "none", "flip" or "10crop"
    why: str  # how the scores led to it, for people
    accuracy: dict[str, float]  # val accuracy of each of the three modes
    views: dict[str, float]  # val accuracy of each single view of 10crop
    images: int  # validation images scored
    of: int  # validation images in all (more than ``images``: a seeded sample was scored)
    fixed: bool = False  # the user fixed the mode (fit --tta MODE) instead of letting val choose

    def to_dict(self) -> dict[str, Any]:
        """The plain form stored in checkpoints, exports and tta.json."""
        return {
            "chosen": self.chosen,
            "why": self.why,
            "accuracy": dict(self.accuracy),
            "views": dict(self.views),
            "images": self.images,
            "of": self.of,
            "fixed": self.fixed,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "the checkpoint") -> TTAChoice | None:
        """The choice recorded in ``data`` (None: no record, as in checkpoints and exports of
        versions before it).

        Raises:
            CheckpointError: The record is malformed (``where`` names its file).
        """
        if data is None:
            return None
        try:
            choice = cls(
                chosen=str(data["chosen"]),
                why=str(data.get("why", "")),
                accuracy={str(k): float(v) for k, v in data.get("accuracy", {}).items()},
                views={str(k): float(v) for k, v in data.get("views", {}).items()},
                images=int(data.get("images", 0)),
                of=int(data.get("of", 0)),
                fixed=bool(data.get("fixed", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"The test-time augmentation record in {where} is malformed ({exc!r}); was it "
                "edited?"
            ) from exc
        if choice.chosen not in TTA_MODES:
            raise CheckpointError(
                f"{where} records the test-time augmentation {choice.chosen!r}, not one of "
                f"{', '.join(TTA_MODES)}; was it edited?"
            )
        return choice

    def describe(self) -> str:
        """One line for people: the modes' val accuracies and the choice."""
        sample = f" on {self.images} of {self.of} val images" if self.images < self.of else ""
        scores = ", ".join(f"{m} {self.accuracy[m]:.3f}" for m in TTA_MODES if m in self.accuracy)
        return f"{scores}{sample} -> {self.chosen} ({self.why})"

    def hurts(self, mode: str) -> str | None:
        """Why ``mode``, asked for explicitly, is a poor choice for this model: it scored below
        the recorded choice on val (None: it did not, or it was not scored)."""
        if mode not in self.accuracy or self.chosen not in self.accuracy:
            return None
        if self.fixed:  # below the best mode: the user's own choice may have cost accuracy
            top = max(TTA_MODES, key=lambda m: self.accuracy.get(m, -1.0))
            kept = f"the run keeps {self.chosen}, as fit --tta {self.chosen} fixed it"
        else:
            top, kept = self.chosen, f"--tta auto uses {self.chosen}"
        if self.accuracy[mode] >= self.accuracy[top]:
            return None
        return (
            f"--tta {mode} scored {self.accuracy[mode]:.3f} on the validation images against "
            f"{self.accuracy[top]:.3f} with {top} (accuracy on {self.images} images when fit "
            f"scored the modes); {kept}"
        )


def choose(correct: dict[str, np.ndarray]) -> tuple[str, str]:
    """The mode to predict with, and why, from which images each mode got right (boolean
    arrays over the same images): the most accurate, a tie going to fewer views. The reason
    compares it with the centre crop image by image and gives the one-sided exact sign test's
    p-value, so a gain of one or two images is seen for what it may be: chance."""
    accuracy = {mode: float(np.mean(right)) for mode, right in correct.items()}
    chosen = max(TTA_MODES, key=lambda m: (accuracy[m], -len(MODE_VIEWS[m])))
    if chosen == "none":
        return chosen, "the most accurate, or as accurate with fewer views"
    wins = int(np.sum(correct[chosen] & ~correct["none"]))
    losses = int(np.sum(~correct[chosen] & correct["none"]))
    p = sign_test(wins, losses)
    doubt = ": could be chance" if p > CHANCE else ""
    return chosen, (
        f"the most accurate: right on {_images(wins)} where none was wrong, wrong on "
        f"{_images(losses)} where none was right; sign test p = {p:.2f}{doubt}"
    )


def _images(count: int) -> str:
    return f"{count} val image" + ("" if count == 1 else "s")


def sign_test(wins: int, losses: int) -> float:
    """P(at least ``wins`` of ``wins + losses`` fair coin flips): the one-sided exact sign
    test (scipy.stats.binomtest gives the same; this needs no import)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def score_tta(
    predictor: BasePredictor,
    samples: Sequence[tuple[Path, int]],
    *,
    batch_size: int = 32,
    limit: int = SCORE_IMAGES,
    seed: int = 0,
    fixed: str | None = None,
    progress: Callable[[int], None] | None = None,
    deadline: float | None = None,
) -> TTAChoice:
    """Score none, flip and 10crop on labelled images from one pass over their ten views.

    Args:
        predictor: The model (or ensemble) to score.
        samples: (image path, label index in ``predictor.classes``) pairs: the val images.
        batch_size: Images per forward pass (each of ten views).
        limit: At most this many images are scored, a sample drawn with ``seed`` beyond.
        fixed: The mode the user fixed (``fit --tta MODE``): it is the choice whatever the
            scores, which are still measured and recorded.
        progress: Called with the number of images done after each batch.
        deadline: A ``time.perf_counter()`` value (the time budget's end): no batch starts
            after it, though the first always runs; the record says how many were scored.

    Raises:
        CheckpointError: None of the images could be read (nothing to score).
    """
    probs, truth = ten_views(predictor, samples, batch_size, limit, seed, progress, deadline)
    correct = correct_by_mode(probs, truth)
    chosen, why = choose(correct) if fixed is None else (fixed, "fixed by fit --tta")
    return TTAChoice(
        chosen=chosen,
        why=why,
        accuracy={mode: float(np.mean(right)) for mode, right in correct.items()},
        views={
            name: float(np.mean(probs[:, i].argmax(1) == truth))
            for i, name in enumerate(VIEW_NAMES)
        },
        images=len(truth),
        of=len(samples),
        fixed=fixed is not None,
    )


def correct_by_mode(probs: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Which images each mode gets right, from the ten views' probabilities (N, 10, C)."""
    return {
        mode: probs[:, list(picked)].mean(1).argmax(1) == truth
        for mode, picked in MODE_VIEWS.items()
    }


def ten_views(
    predictor: BasePredictor,
    samples: Sequence[tuple[Path, int]],
    batch_size: int = 32,
    limit: int = SCORE_IMAGES,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    deadline: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The softmax of each of the ten views of (a sample of) labelled images, shape
    (N, 10, classes) in :data:`VIEW_NAMES` order, and their labels (N,); arguments as in
    :func:`score_tta`. An image that cannot be read any more is left out.

    Raises:
        CheckpointError: None of the images could be read.
    """
    chosen = np.arange(len(samples))
    if len(samples) > limit:
        chosen = np.sort(np.random.default_rng(seed).choice(len(samples), limit, replace=False))
    views: list[np.ndarray] = []  # (batch, 10, classes) probabilities
    labels: list[int] = []
    arrays: list[np.ndarray] = []
    batch_labels: list[int] = []

    def flush() -> None:
        views.append(predictor.views_proba(arrays, "10crop"))
        labels.extend(batch_labels)
        arrays.clear()
        batch_labels.clear()
        if progress is not None:
            progress(len(labels))

    for index in chosen:
        path, label = samples[index]
        try:
            arrays.append(read_image(path))
        except UnreadableImage:  # read when the scan checked it; gone or changed since
            continue
        batch_labels.append(label)
        if len(arrays) == batch_size:
            flush()
            if deadline is not None and time.perf_counter() > deadline:
                break
    if arrays:
        flush()
    if not labels:
        raise CheckpointError("None of the validation images could be read to score TTA.")
    return np.concatenate(views).astype(np.float64), np.asarray(labels)
