"""What fit, resume, lr-find, augment-preview and runs write: never a user's file, never a
folder another process is writing, and a resumed run on the split it started with."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import finetune
from finetune.cli.commands import cli
from finetune.data.scan import scan_folder
from finetune.errors import CheckpointError, ConfigError, TrainingError
from finetune.recipes import load_recipe
from finetune.reporting.runs import list_runs
from finetune.run.layout import RunDir

from .conftest import copy_classes


def test_fit_refuses_an_out_it_may_not_write_before_reading_any_data(tmp_path: Path) -> None:
    """A folder holding the user's files is refused at once (the data folder is not even
    read: it does not exist here), and a recipe may not choose the run folder."""
    data = tmp_path / "data"
    data.mkdir()
    mine = data / "mine"  # inside the data folder: said too
    mine.mkdir()
    (mine / "config.json").write_text("my settings")
    with (
        pytest.warns(UserWarning, match=r"mine is inside the data folder"),
        pytest.raises(ConfigError, match=r"mine is not empty \(it holds config\.json\)"),
    ):
        finetune.fit(data, out=str(mine), verbose=False)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]
    with pytest.raises(ConfigError, match=r"is a file"):
        finetune.fit(tmp_path / "nowhere", out=str(mine / "config.json"), verbose=False)
    recipe = tmp_path / "shared.toml"
    recipe.write_text('epochs = 2\nout = "/somewhere/else"\n')
    with pytest.raises(ConfigError, match=r"shared\.toml: a recipe cannot set out"):
        load_recipe(recipe)


class _InterruptedHead(nn.Linear):
    """A linear head whose ``stop_at``-th training call of 4 images raises KeyboardInterrupt
    (Ctrl-C outside the loop's handler): a run stopped in epoch 2 with epoch 1 saved."""

    calls = 0

    def __init__(self, stop_at: int = 0) -> None:
        torch.manual_seed(0)
        super().__init__(1280, 3)
        self.stop_at = stop_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(x) == 4:
            type(self).calls += 1
            if type(self).calls == self.stop_at:
                raise KeyboardInterrupt
        return super().forward(x)


def _resume(run: Path) -> list[str]:
    """Resume ``run``; the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune.resume(run, head=_InterruptedHead(), verbose=False, report=False)
    return [str(w.message) for w in caught]


def test_a_resumed_run_keeps_its_split_and_its_lock_is_released(tmp_path: Path) -> None:
    """Images added after the run started stay out (a training image never becomes a
    validation image), a deleted one is dropped, each named; runs without split.json (older
    versions) draw it again as before; another model's last.pt and a damaged config.json are clean
    errors; fit's lock is gone after an interrupt."""
    from finetune.pipeline import _recorded_split  # the split resume trains on

    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 10)
    run = tmp_path / "run"
    _InterruptedHead.calls = 0
    with pytest.raises((KeyboardInterrupt, TrainingError)):
        finetune.fit(
            data, strategy="finetune-top", epochs=2, image_size=32, augment="none", batch_size=4,
            out=str(run), head=_InterruptedHead(stop_at=7), verbose=False, report=False,
        )  # fmt: skip
    assert RunDir(run).last.is_file() and not RunDir(run).lock_file.exists()
    record = json.loads(RunDir(run).split.read_text())
    assert (len(record["train"]), len(record["val"])) == (24, 6)
    for name in ("old", "other"):
        shutil.copytree(run, tmp_path / name)
    RunDir(tmp_path / "old").split.unlink()  # as finetune before split.json wrote runs

    gone = record["val"][0][0]
    (data / gone).unlink()
    shutil.copy(data / record["train"][0][0], data / "bag" / "added.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said by the resume below
        split = _recorded_split(RunDir(run), scan_folder(data, seed=0))
    rel = {side: [s.path.relative_to(data).as_posix() for s in getattr(split, side)]
           for side in ("train", "val")}  # fmt: skip
    assert rel == {"train": [r[0] for r in record["train"]],
                   "val": [r[0] for r in record["val"][1:]]}  # fmt: skip
    said = _resume(run)
    assert any("1 file (bag/added.png) added since the run started, left out" in m for m in said)
    assert any(f"1 file ({gone}) of the run's split are gone" in m for m in said)
    assert not RunDir(run).lock_file.exists()
    scanned = scan_folder(data, seed=0)
    assert _recorded_split(RunDir(tmp_path / "old"), scanned) is scanned  # drawn again, as ever

    other = RunDir(tmp_path / "other")
    config = json.loads(other.config.read_text())
    other.config.write_text(json.dumps({**config, "model": "resnet18"}))
    with pytest.raises(CheckpointError, match=r"holds a tf_efficientnet_lite0 model but"):
        finetune.resume(other.path, head=_InterruptedHead(), verbose=False, report=False)
    other.config.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json holds a JSON list"):
        finetune.resume(other.path, head=_InterruptedHead(), verbose=False, report=False)
    assert not other.lock_file.exists()
    # `finetune runs` lists the good runs and names the damaged one.
    with pytest.warns(UserWarning, match=r"skipped .*other: .*JSON list"):
        found = list_runs(tmp_path)
    assert {r.dir.name for r in found} == {"run", "old"}


def test_augment_preview_into_a_folder_says_the_file_it_wrote(
    small_folder: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "previews"
    folder.mkdir()
    options = ["--images", "1", "--versions", "1", "--image-size", "32"]
    for out, written in ((str(folder), folder), (f"{tmp_path / 'new'}/", tmp_path / "new")):
        result = CliRunner().invoke(
            cli, ["augment-preview", str(small_folder), "-o", out, *options]
        )
        assert result.exit_code == 0, result.output
        assert result.output.strip() == str(written / "augment-preview.png")
        assert (written / "augment-preview.png").is_file()


def test_a_time_budget_bounds_the_whole_fit_whatever_the_strategy(tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 20)
    start = time.perf_counter()
    run = finetune.fit(
        data, strategy="finetune-top", epochs=500, image_size=32, time_budget=0.15,
        out=str(tmp_path / "run"), verbose=False, report=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert 1 <= len(run.history) < 500 and run.config.epochs == 500  # planned, then cut
    assert seconds < 1.2 * 9, seconds  # 0.15 min, TTA scoring included
    assert RunDir(run.dir).best.is_file() and run.tta is not None
