"""Recipes: TOML files of FitConfig fields; the recipes/ folder; --recipe on the command line."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import finetune
from finetune.config import SETTINGS, FitConfig
from finetune.errors import ConfigError
from finetune.recipes import MAX_RECIPE_BYTES, load_recipe, write_recipe
from tests.test_cli import run, run_many

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def test_every_recipe_in_the_folder_loads_and_explains_itself() -> None:
    files = {p.stem: p for p in RECIPES.glob("*.toml")}
    cells = ("linear", "stage-probe", "finetune-top", "finetune-all")
    assert set(files) >= {*cells, "fast-cpu", "best-accuracy"}
    for name, path in files.items():
        config = load_recipe(path)
        assert isinstance(config, FitConfig), name
        if name in cells:  # one recipe per cell of the strategy matrix
            assert config.strategy == name
        text = path.read_text()
        assert text.startswith(f"# {name}: ") and f"--recipe recipes/{name}.toml" in text
    assert load_recipe(files["fast-cpu"]).image_size == 64
    assert load_recipe(files["best-accuracy"]).ema is True


def test_write_then_load_round_trips_only_the_changed_fields(tmp_path: Path) -> None:
    config = FitConfig(
        strategy="finetune-all",
        model="resnet18",
        epochs=6,
        lr=3e-05,
        warmup_epochs=1,
        weight_decay=0.0002971773959999536,
        schedule="step",
        lr_gamma=0.5,
        ema=True,
        crop_scale=(0.35, 1.0),
        crop_ratio=(0.75, 1.3333333333333333),
        hflip=False,
        rotate90=True,
        hue=0.05,
        tta="10crop",
    )
    path = write_recipe(tmp_path / "sub" / "r.toml", config, "my recipe\nsecond line")
    assert load_recipe(path) == config
    text = path.read_text()
    assert text.startswith("# my recipe\n# second line\n\n")
    changed = {
        f.name
        for f in dataclasses.fields(FitConfig)
        if getattr(config, f.name) != getattr(FitConfig(), f.name)
    }
    keys = {line.split(" = ")[0] for line in text.splitlines() if " = " in line[:30]}
    assert keys == changed  # defaults are not written
    # each line carries its field's help as its comment, a str field's choices spelled out
    assert f'schedule = "step"  # {SETTINGS["schedule"].help} One of: constant, step, exp' in text
    assert "crop_scale = [0.35, 1.0]  # Random resized crop: area range as fractions" in text
    assert "hflip = false  # Mirror left-right" in text
    assert "lr = 3e-05  # Head learning rate [default: per --optimizer: sgd 0.1," in text
    # a mapping works too; None means "default" and is left out
    mapping = write_recipe(tmp_path / "m.toml", {"lr": 1e-3, "image_size": None, "vflip": True})
    assert load_recipe(mapping) == FitConfig(lr=1e-3, vflip=True)
    assert write_recipe(tmp_path / "empty.toml", FitConfig()).read_text() == "\n"
    assert load_recipe(tmp_path / "empty.toml") == FitConfig()


@pytest.mark.parametrize(
    ("content", "messages"),
    [
        ('strategy = "linear"\nlrr = 3e-4\n', ["unknown key 'lrr'", "did you mean 'lr'?",
                                              "finetune/config.py"]),
        ("lr = 3e-4\nepochs = \n", ["not valid TOML", "line 2"]),
        ("epochs = 2.5\n", ["epochs must be a whole number, got 2.5"]),
        ('hflip = "yes"\n', ["hflip must be true or false"]),
        ("crop_scale = [0.35]\n", ["crop_scale must be two numbers in brackets"]),
        ("epochs = 0\n", ["epochs must be between 1 and 100000, got 0 (option --epochs)"]),
        ("lighting = nan\n", ["lighting must be between 0 and 10, got nan (option --lighting)"]),
        ("lr = 1e30\n", ["lr must be in (0, 10], got 1e+30"]),
        ('optimizer = "adamm"\n', ["Unknown optimizer 'adamm'"]),
        ("crop_scale = [0.9, 0.2]\n", ["crop_scale must satisfy"]),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_the_fix(
    tmp_path: Path, content: str, messages: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: ")
    for message in messages:
        assert message in str(info.value)


def test_only_a_small_regular_file_of_flat_values_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opening it to read would block until a writer came
    deep = tmp_path / "deep.toml"
    deep.write_text("lr = " + "[" * 100_000 + "]" * 100_000 + "\n")  # a RecursionError in tomllib
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * MAX_RECIPE_BYTES + "\n")
    link = tmp_path / "zero.toml"
    link.symlink_to("/dev/zero")  # endless: read without a cap, it filled the memory
    for path, message in (
        (fifo, "is not a regular file"),
        (Path("/dev/zero"), "is not a regular file"),
        (link, "is not a regular file"),
        (tmp_path, "is not a regular file"),
        (huge, "is over 1024 KB"),
        (deep, "nest too deep"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            load_recipe(path)
        assert str(path) in str(info.value)


def test_a_recipe_may_not_choose_the_run_folder(tmp_path: Path) -> None:
    path = tmp_path / "shared.toml"
    path.write_text('epochs = 2\nout = "/home/someone/important"\n')
    with pytest.raises(ConfigError, match=r"cannot set out .*--out") as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: ")
    # write_recipe never writes it either, so a written recipe always loads
    written = write_recipe(tmp_path / "w.toml", FitConfig(epochs=2, out=str(tmp_path / "run")))
    assert "out" not in written.read_text() and load_recipe(written) == FitConfig(epochs=2)


def test_a_missing_recipe_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml not found"):
        load_recipe(tmp_path / "nope.toml")


def test_api_options_override_a_recipe() -> None:
    recipe = finetune.load_recipe(RECIPES / "fast-cpu.toml")
    config = FitConfig.from_kwargs(recipe, epochs=1, image_size=None)
    assert config.epochs == 1 and config.image_size == 64 and config.lr == recipe.lr


def test_cli_typed_options_beat_the_recipe_and_defaults_do_not(
    small_folder: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '# a probe\nstrategy = "linear"\nbatch_size = 16\nimage_size = 32\nval_split = 0.25\n'
        "feature_cache = false\n"
    )
    out = tmp_path / "run"
    fit, plan = run_many(
        ("fit", str(small_folder), "--recipe", str(recipe), "--image-size", "40", "--out",
         str(out)),
        ("plan", str(small_folder), "--recipe", str(recipe), "--batch-size", "32"),
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    assert f"recipe    {recipe}, overridden by --image-size 40" in fit.stderr
    used = json.loads((out / "config.json").read_text())
    # recipe values, not the CLI defaults (auto, 32, 0.2, feature cache on) ...
    assert used["strategy"] == "linear" and used["batch_size"] == 16
    assert used["val_split"] == 0.25 and used["feature_cache"] is False
    assert used["image_size"] == 40  # ... except what was typed
    assert plan.returncode == 0, plan.stderr
    assert "strategy   linear: one feature pass at 32 px" in plan.stdout
    rerun = f"finetune fit {small_folder} --recipe {recipe} --batch-size 32"
    assert plan.stdout.rstrip().endswith(rerun)  # typed, even when equal to the default


def test_cli_bad_recipe_is_one_line_naming_the_file(small_folder: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text("batch_sise = 8\n")
    result = run("fit", str(small_folder), "--recipe", str(recipe))
    assert result.returncode == 1
    error = f"Error: {recipe}: unknown key 'batch_sise' (did you mean 'batch_size'?)"
    assert error in result.stderr
    assert "Traceback" not in result.stderr
    resumed = run("fit", "--resume", str(tmp_path), "--recipe", str(recipe))
    assert resumed.returncode == 2 and "give only the run directory" in resumed.stderr
