"""Self-describing checkpoints: atomic writes, safe loading, rebuilding the model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import finetune
from finetune.errors import CheckpointError
from finetune.files import file_mode
from finetune.run.checkpoint import (
    CheckpointMeta,
    find_checkpoint,
    load_checkpoint,
    rebuild_model,
    save_checkpoint,
)


class _Payload:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoints_describe_themselves(linear_run: finetune.FitResult) -> None:
    best = load_checkpoint(linear_run.dir)
    last = load_checkpoint(linear_run.last_checkpoint)
    assert find_checkpoint(linear_run.dir).name == "best.pt"
    assert best["model"] == {
        "name": "tf_efficientnet_lite0",
        "num_features": 1280,
        "head": "linear",
        "stage": None,
    }
    assert best["classes"] == list(linear_run.classes)
    assert best["preprocessing"]["input_size"] == 64 and best["preprocessing"]["mean"] == [0.5] * 3
    assert best["config"]["strategy"] == "linear" and best["strategy"] == "linear"
    assert best["epoch"] == linear_run.best.epoch and best["best_metric"] == linear_run.best_metric
    assert last["epoch"] == 1 and "optimizer" not in best
    assert best["finetune_version"] == finetune.__version__


def test_rebuilt_model_reproduces_the_trained_weights(linear_run: finetune.FitResult) -> None:
    checkpoint = load_checkpoint(linear_run.best_checkpoint)
    model = rebuild_model(checkpoint)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][key]), key


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "ck" / "last.pt"
    save_checkpoint(target, {"state_dict": {"w": torch.ones(2)}})
    save_checkpoint(target, {"state_dict": {"w": torch.zeros(2)}})
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.zeros(2))
    assert target.stat().st_mode & 0o777 == file_mode()  # not mkstemp's private 0600

    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises, nothing is left
        save_checkpoint(target, {"state_dict": {"w": torch.ones(2)}, "bad": lambda: None})
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.zeros(2))


def test_a_malicious_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "state_dict": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError):
        finetune.load(evil)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a finetune checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"no best\.pt or last\.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


# --- the description: CheckpointMeta -------------------------------------------------------

# What fit wrote before the description became a dataclass (a finetune-top run whose frozen
# layers were computed once, and a stage-probe's model): every key, as the old dict held it.
_OLD_DESCRIPTION = {
    "model": {"name": "resnet18", "num_features": 256, "head": "linear", "stage": 3},
    "data": "/data/flowers",
    "classes": ["daisy", "rose"],
    "preprocessing": {
        "input_size": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "crop_pct": 0.875,
        "interpolation": "bilinear",
    },
    "config": {"strategy": "finetune-top", "epochs": 3, "lr": 0.001},
    "strategy": "finetune-top",
    "decision": None,
    "augmentation": {"preset": "default", "pca_lighting": None},
    "frozen": {"skipped": ["conv1", "bn1"], "views": 2},
}


def test_an_old_description_round_trips_key_for_key() -> None:
    meta = CheckpointMeta.from_dict(_OLD_DESCRIPTION)
    assert meta.model.stage == 3 and meta.classes == ("daisy", "rose")
    assert meta.frozen is not None and meta.frozen.views == 2
    assert meta.to_dict() == _OLD_DESCRIPTION
    assert list(meta.to_dict()) == list(_OLD_DESCRIPTION)  # the same keys, in the same order
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.strategy = "linear"  # type: ignore[misc]


def test_a_description_without_the_optional_keys_loads() -> None:
    minimal = {k: _OLD_DESCRIPTION[k] for k in ("classes", "preprocessing")}
    meta = CheckpointMeta.from_dict({**minimal, "model": {"name": "resnet18"}})
    assert meta.model.head == "linear" and meta.model.stage is None
    assert meta.data is None and meta.decision is None and meta.frozen is None
    assert "frozen" not in meta.to_dict()  # written only when the frozen layers were cached
    with pytest.raises(CheckpointError, match="not written by finetune fit"):
        CheckpointMeta.from_dict({"classes": ["a"]})


def test_a_saved_description_loads_back_with_weights_only(tmp_path: Path) -> None:
    meta = CheckpointMeta.from_dict(_OLD_DESCRIPTION)
    save_checkpoint(tmp_path / "best.pt", {**meta.to_dict(), "state_dict": {}})
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    assert {k: payload[k] for k in _OLD_DESCRIPTION} == _OLD_DESCRIPTION
    assert CheckpointMeta.from_dict(load_checkpoint(tmp_path)) == meta


def test_a_fit_checkpoint_is_its_description_plus_training_state(
    linear_run: finetune.FitResult,
) -> None:
    best = load_checkpoint(linear_run.dir)
    meta = CheckpointMeta.from_dict(best)
    assert meta.to_dict() == {k: best[k] for k in meta.to_dict()}
    assert meta.strategy == "linear" and meta.augmentation is None  # a probe: no augmentation
    assert meta.data == str(Path(best["data"])) and meta.classes == linear_run.classes
