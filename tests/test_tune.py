"""``finetune.tune``: the search on a stand-in for training, then real tiny tunes."""

from __future__ import annotations

import csv
import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import finetune
from finetune.config import DEFAULT_LR
from finetune.errors import ConfigError, TrainingError
from finetune.recipes import load_recipe
from finetune.tuning import TuneResult
from tests.conftest import FASHION, copy_classes
from tests.test_cli import run

PNG = b"\x89PNG\r\n\x1a\n"


def _stand_in(
    monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None, probe_acc: float = 0.5
) -> list:
    """Replace training by a function of lr: val acc peaks at lr 1e-3, lr > 8e-3 diverges;
    a probe scores ``probe_acc``."""
    configs = []

    def fit(data, config, verbose=True, report=True):
        assert not report  # tune's trials never write a report: the tune table is theirs
        configs.append(config)
        Path(config.out).mkdir(parents=True)
        if config.strategy in ("linear", "stage-probe"):
            return SimpleNamespace(best=SimpleNamespace(val_acc=probe_acc, val_loss=0.3))
        if len(configs) == interrupt_at:
            raise TrainingError(f"Interrupted in epoch 1; finetune fit --resume {config.out}")
        if config.lr > 8e-3:
            raise TrainingError("The loss became NaN or infinite in epoch 1 even after halving")
        acc = 0.9 - 0.2 * abs(math.log10(config.lr / 1e-3)) - 0.01 * config.weight_decay
        return SimpleNamespace(best=SimpleNamespace(val_acc=acc, val_loss=1 - acc))

    monkeypatch.setattr("finetune.pipeline.fit", fit)
    return configs


def _search(result: TuneResult) -> list[tuple[float, float]]:
    return [(t.lr, t.weight_decay) for t in result.trials]


def test_coarse_then_fine_narrowed_around_the_best_coarse_trial(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    configs = _stand_in(monkeypatch)
    result = finetune.tune(FASHION, strategy="finetune-top", epochs=6, trials=8, seed=1,
                           out=tmp_path / "a", verbose=False)  # fmt: skip
    assert [t.stage for t in result.trials] == ["coarse"] * 5 + ["fine"] * 3
    assert [t.epochs for t in result.trials] == [2] * 5 + [6] * 3  # a third, then all
    assert [c.epochs for c in configs] == [2] * 5 + [6] * 3
    assert all(c.strategy == "finetune-top" for c in configs)
    coarse, fine = result.stages
    assert coarse.lr == pytest.approx((1e-4, 1e-2))  # adamw's 1e-3 / 10 .. x 10
    for t in result.trials[:5]:
        assert 1e-4 <= t.lr <= 1e-2 and 1e-5 <= t.weight_decay <= 1e-1
    best_coarse = max(result.trials[:5], key=lambda t: (t.val_acc, -t.val_loss))
    assert fine.around == best_coarse.trial
    for t in result.trials[5:]:
        assert best_coarse.lr / 3 <= t.lr <= best_coarse.lr * 3
        assert best_coarse.weight_decay / 3 <= t.weight_decay <= best_coarse.weight_decay * 3
    # best: compared among the trials of full epochs (the fine ones)
    assert result.best is max(result.trials[5:], key=lambda t: t.val_acc)
    recipe = load_recipe(result.recipe)
    assert (recipe.lr, recipe.weight_decay) == (result.best.lr, result.best.weight_decay)
    assert recipe.epochs == 6 and recipe.strategy == "finetune-top" and recipe.out is None

    # Seeded: the same seed searches the same points, another seed others.
    again = finetune.tune(FASHION, strategy="finetune-top", epochs=6, trials=8, seed=1,
                          out=tmp_path / "b", verbose=False)  # fmt: skip
    assert _search(again) == _search(result)
    other = finetune.tune(FASHION, strategy="finetune-top", epochs=6, trials=8, seed=2,
                          out=tmp_path / "c", verbose=False)  # fmt: skip
    assert _search(other)[0] != _search(result)[0]


def test_the_coarse_range_centres_on_the_lr_and_optimizer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _stand_in(monkeypatch)
    given = finetune.tune(FASHION, strategy="finetune-all", lr=1e-4, epochs=3, trials=2,
                          out=tmp_path / "a", verbose=False)  # fmt: skip
    assert given.stages[0].lr == pytest.approx((1e-5, 1e-3))
    sgd = finetune.tune(FASHION, strategy="finetune-all", optimizer="sgd", epochs=3, trials=1,
                        out=tmp_path / "b", verbose=False)  # fmt: skip
    assert sgd.stages[0].lr == pytest.approx((DEFAULT_LR["sgd"] / 10, DEFAULT_LR["sgd"] * 10))
    # finetune-all's head-only warm-up must stay below the coarse epochs: 6 // 3 = 2 -> 3
    warm = finetune.tune(FASHION, strategy="finetune-all", warmup_epochs=2, epochs=6, trials=1,
                         out=tmp_path / "c", verbose=False)  # fmt: skip
    assert warm.trials[0].epochs == 3


def test_diverged_trials_are_recorded_and_never_best(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _stand_in(monkeypatch)
    result = finetune.tune(FASHION, strategy="finetune-top", lr=1e-2, epochs=3, trials=6,
                           seed=3, out=tmp_path / "t", verbose=False)  # fmt: skip
    diverged = [t for t in result.trials if t.diverged]
    assert diverged and all(t.lr > 8e-3 for t in diverged)
    assert not result.best.diverged
    rows = list(csv.DictReader((tmp_path / "t" / "trials.csv").open()))
    assert [r["val_acc"] for r in rows if float(r["lr"]) > 8e-3] == ["nan"] * len(diverged)


def test_an_interrupted_tune_keeps_the_finished_trials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _stand_in(monkeypatch, interrupt_at=3)
    with pytest.raises(TrainingError, match="tune stopped in trial 3: Interrupted") as info:
        finetune.tune(FASHION, strategy="finetune-top", epochs=3, trials=6,
                      out=tmp_path / "t", verbose=False)  # fmt: skip
    assert "2 finished trial(s)" in str(info.value)
    assert len(list(csv.DictReader((tmp_path / "t" / "trials.csv").open()))) == 2
    assert load_recipe(tmp_path / "t" / "best.toml").strategy == "finetune-top"
    with pytest.raises(ConfigError, match="already holds a tune"):
        finetune.tune(FASHION, strategy="finetune-top", out=tmp_path / "t")


def test_module_import_leaves_finetune_tune_the_function() -> None:
    code = "import finetune.tuning, finetune; print(callable(finetune.tune))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_auto_is_decided_once_and_searches_the_probe_of_its_row_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="--strategy finetune-top or --strategy finetune-all"):
        finetune.tune(FASHION, strategy="linear", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # auto: one plan before the trials (finetune.plan's own tests cover its measurements)
    plans = []

    def plan(data, config, verbose=False):
        plans.append(config)
        decided = dataclasses.replace(config, strategy=chosen, epochs=4, image_size=64)
        cell = SimpleNamespace(cell="little data, different from ImageNet", baseline_image_size=96)
        return SimpleNamespace(strategy=chosen, config=decided, decision=cell,
                               trains_backbone=chosen.startswith("finetune"))  # fmt: skip

    monkeypatch.setattr("finetune.pipeline.plan", plan)
    # auto chose a probe: it is trial 0, and its row's fine-tune is searched beside it.
    configs = _stand_in(monkeypatch, probe_acc=0.95)
    chosen = "stage-probe"
    result = finetune.tune(FASHION, trials=3, epochs=6, out=tmp_path / "b", verbose=False)
    assert [(c.strategy, c.epochs, c.image_size) for c in configs] == [
        ("stage-probe", None, 64),
        ("finetune-all", 2, 64),
        ("finetune-all", 2, 64),
        ("finetune-all", 6, 64),
    ]
    assert [t.stage for t in result.trials] == ["probe", "coarse", "coarse", "fine"]
    assert result.trials[0].trial == 0 and result.trials[0].run_dir.name == "trial-00"
    assert result.best.stage == "probe" and result.best_strategy == "stage-probe"
    recipe = load_recipe(tmp_path / "b" / "best.toml")
    assert (recipe.strategy, recipe.image_size, recipe.lr) == ("stage-probe", 64, None)
    assert (
        "Best: trial 0 (probe), the stage-probe probe -> val acc 0.950"
        in (tmp_path / "b" / "best.toml").read_text()
    )
    assert "    0  probe        1         -             -    0.950" in result.table()
    # auto chose a fine-tune: its probe (at auto's probe size) first, then the search, whose
    # best full-length trial beats a weak probe.
    configs = _stand_in(monkeypatch, probe_acc=0.2)
    chosen = "finetune-all"
    result = finetune.tune(FASHION, trials=3, out=tmp_path / "c", verbose=False)
    assert len(plans) == 2 and result.strategy == "finetune-all"
    assert [(c.strategy, c.epochs, c.image_size) for c in configs] == [
        ("stage-probe", None, 96),
        ("finetune-all", 1, 64),
        ("finetune-all", 1, 64),
        ("finetune-all", 4, 64),  # auto's epochs and image size hold for every trial
    ]
    assert result.best.stage == "fine" and result.best_strategy == "finetune-all"
    assert load_recipe(tmp_path / "c" / "best.toml").strategy == "finetune-all"


@pytest.fixture()
def fashion_subset(tmp_path: Path) -> Path:
    """4 classes of the sample data, 16 train / 8 val images each: 2 steps per epoch."""
    classes = ["bag", "sneaker", "trouser", "dress"]
    copy_classes(tmp_path / "fashion" / "train", classes, 16, "train")
    copy_classes(tmp_path / "fashion" / "val", classes, 8, "val")
    return tmp_path / "fashion"


def test_a_real_tiny_tune_on_the_sample_data(fashion_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    result = finetune.tune(fashion_subset, strategy="finetune-top", image_size=32, epochs=2,
                           trials=3, out=out, verbose=False)  # fmt: skip
    assert [(t.stage, t.epochs) for t in result.trials] == [("coarse", 1)] * 2 + [("fine", 2)]
    best_coarse = max(result.trials[:2], key=lambda t: (t.val_acc, -t.val_loss))
    fine = result.trials[2]
    assert result.stages[1].around == best_coarse.trial
    assert best_coarse.lr / 3 <= fine.lr <= best_coarse.lr * 3
    assert result.best is fine  # the only trial of the full 2 epochs
    for t in result.trials:
        assert 0 <= t.val_acc <= 1 and (t.run_dir / "best.pt").is_file()
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert list(rows[0]) == ["trial", "stage", "lr", "weight_decay", "epochs", "val_acc",
                             "val_loss", "seconds", "run_dir"]  # fmt: skip
    assert [(r["stage"], float(r["lr"]), float(r["val_acc"])) for r in rows] == [
        (t.stage, t.lr, t.val_acc) for t in result.trials
    ]
    assert (out / "tune.png").read_bytes()[:8] == PNG
    recipe = load_recipe(out / "best.toml")
    assert (recipe.lr, recipe.weight_decay) == (fine.lr, fine.weight_decay)
    assert (recipe.strategy, recipe.epochs, recipe.image_size) == ("finetune-top", 2, 32)
    assert f"Best: trial 3 (fine), lr {fine.lr:.3g}" in (out / "best.toml").read_text()


def test_cli_tune_with_a_recipe_stops_at_the_budget(small_folder: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "base.toml"
    recipe.write_text('strategy = "finetune-top"\nepochs = 2\nimage_size = 32\nbatch_size = 16\n')
    out = tmp_path / "tune"
    result = run("tune", str(small_folder), "--recipe", str(recipe), "--trials", "3",
                 "--budget", "0.01", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tune      finetune-top" in result.stderr and "trial 1/3  coarse" in result.stderr
    assert "budget    stopped after 1 trial(s)" in result.stderr  # 0.6 s: only the first runs
    assert "trial 2/3" not in result.stderr
    assert "1 of 3 trials" in result.stdout and "budget       stopped after 1" in result.stdout
    assert result.stdout.rstrip().endswith(
        f"finetune fit {small_folder} --recipe {out / 'best.toml'}"
    )
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 1
    best = load_recipe(out / "best.toml")
    assert (best.epochs, best.batch_size, best.image_size) == (2, 16, 32)  # the recipe's
    assert (
        "Trial 1 trained 1 epoch(s); this recipe trains the full 2."
        in (out / "best.toml").read_text()
    )
    searched = run("tune", str(small_folder), "--weight-decay", "0.1")
    assert searched.returncode == 2 and "tune searches the weight decay" in searched.stderr


def test_a_real_tiny_tune_with_auto_on_little_data_compares_the_probe(
    fashion_subset: Path, tmp_path: Path
) -> None:
    """The issue's case: on little data auto picks a probe, and tune used to refuse it."""
    out = tmp_path / "tune"
    result = finetune.tune(fashion_subset, image_size=32, epochs=2, trials=2, out=out,
                           verbose=False)  # fmt: skip
    assert result.probe is not None and result.probe.strategy == "stage-probe"
    assert result.strategy == "finetune-all"  # the fine-tune of the probe's row
    assert [(t.stage, t.epochs) for t in result.trials] == [
        ("probe", 1), ("coarse", 1), ("fine", 2)
    ]  # fmt: skip
    probe = result.trials[0]
    saved = torch.load(probe.run_dir / "best.pt", weights_only=True)
    assert saved["strategy"] == "stage-probe" and saved["metrics"]["val_acc"] == probe.val_acc
    kept = result.best
    assert kept in (probe, result.trials[2])  # the probe or the full-length fine-tune
    assert kept.val_acc == max(probe.val_acc, result.trials[2].val_acc)
    recipe = load_recipe(out / "best.toml")
    assert recipe.strategy == result.best_strategy
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["stage"] for r in rows] == ["probe", "coarse", "fine"]
