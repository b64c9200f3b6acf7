"""The run folder has one owner: RunDir names every file; nothing else in finetune spells them."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from finetune.errors import ConfigError
from finetune.run.layout import RunDir, TuneDir

PACKAGE = Path(finetune.__file__).parent

# The names runs have always been written with: changing one breaks reading older runs.
RUN_FILES = {
    "best": "best.pt",
    "last": "last.pt",
    "ema": "ema.pt",
    "config": "config.json",
    "classes": "classes.json",
    "scan": "scan.json",
    "decision": "decision.json",
    "probe": "probe.json",
    "tta": "tta.json",
    "metrics": "metrics.csv",
    "report": "report.html",
    "recipe": "recipe.toml",
    "curves": "curves.png",
    "augment_preview": "augment-preview.png",
    "bundle": "bundle",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "split": "split.json",
    "lock_file": "run.lock",
}
TUNE_FILES = {"trials": "trials.csv", "plot": "tune.png", "best_recipe": "best.toml"}


@pytest.mark.parametrize(("attribute", "name"), RUN_FILES.items())
def test_run_files_keep_their_names(tmp_path: Path, attribute: str, name: str) -> None:
    assert getattr(RunDir(tmp_path), attribute) == tmp_path / name


def test_checkpoints_by_name_and_snapshots_by_cycle(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.checkpoint("ema") == run.ema and run.checkpoint("best") == run.best
    with pytest.raises(ConfigError, match="best, last, ema"):
        run.checkpoint("snapshot")
    assert run.snapshot(3) == tmp_path / "snapshot-3.pt"
    assert run.snapshots() == [] and run.checkpoints() == [] and not run.is_run()
    for name in ("snapshot-10.pt", "snapshot-2.pt", "snapshot-x.pt", "last.pt", "ema.pt"):
        (tmp_path / name).write_bytes(b"")
    assert run.snapshots() == [run.snapshot(2), run.snapshot(10)]  # by cycle, not by text
    assert run.checkpoints() == [run.last, run.ema, run.snapshot(2), run.snapshot(10)]
    assert run.is_run()
    assert run.evaluation("val") == tmp_path / "eval-val"


def test_records_and_exports_in_report_order(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert [p.name for p in run.records()] == [
        "config.json", "classes.json", "scan.json", "decision.json", "metrics.csv",
        "probe.json", "tta.json", "recipe.toml",
    ]  # fmt: skip
    run.onnx.write_bytes(b"")
    run.bundle.mkdir()
    assert run.exports() == [run.bundle, run.onnx]


def test_a_new_run_never_reuses_a_started_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir.create(tmp_path / "out", "ignored")
    assert run.path == tmp_path / "out" and run.path.is_dir() and run.lock_file.is_file()
    run.unlock()
    assert not run.lock_file.exists()
    RunDir.create(tmp_path / "out", "ignored").unlock()  # still empty: reused
    run.last.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"already holds a run \(last\.pt\).*--resume"):
        RunDir.create(tmp_path / "out", "ignored")
    monkeypatch.chdir(tmp_path)
    first, second = RunDir.create(None, "flowers-linear"), RunDir.create(None, "flowers-linear")
    assert first.path.parent == second.path.parent == Path("runs")
    assert first.path.name.startswith("flowers-linear-") and first.path != second.path


def test_a_new_run_never_writes_into_a_folder_that_holds_files(tmp_path: Path) -> None:
    """--out a folder of the user's, a file, or a path below a file: refused, named, and
    nothing in it touched or left behind."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my settings")
    with pytest.raises(ConfigError, match=r"mine is not empty \(it holds config\.json\)"):
        RunDir.create(mine, "ignored")
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]
    assert (mine / "config.json").read_text() == "my settings"
    with pytest.raises(ConfigError, match=r"config\.json is a file; give a folder"):
        RunDir.create(mine / "config.json", "ignored")
    with pytest.raises(ConfigError, match=r"lies below .*config\.json, which is a file"):
        RunDir.create(mine / "config.json" / "run", "ignored")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="is not writable"):
            RunDir.create(locked / "run", "ignored")


def _lock(run: RunDir, pid: int, host: str | None = None) -> None:
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}
    run.lock_file.write_text(json.dumps(record))


def test_one_process_at_a_time_holds_a_run_folder(tmp_path: Path) -> None:
    """run.lock is created exclusively: a second claim is refused with the holder's pid; a lock
    whose process is gone is taken over; another host's is refused with how to remove it."""
    first = RunDir.create(tmp_path / "out", "ignored")
    with pytest.raises(ConfigError, match=rf"in use by another finetune fit .*pid {os.getpid()}"):
        RunDir.create(tmp_path / "out", "ignored")
    with pytest.raises(ConfigError, match="in use"):
        first.lock()  # resume takes the same lock
    first.unlock()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            _lock(first, alive.pid)
            with pytest.raises(ConfigError, match=rf"pid {alive.pid} .*remove .*run\.lock"):
                RunDir.create(tmp_path / "out", "ignored")
            first.unlock()  # not this process's lock: left alone
            assert json.loads(first.lock_file.read_text())["pid"] == alive.pid
        finally:
            alive.kill()
    alive.wait()
    dead = RunDir.create(tmp_path / "out", "ignored")  # its holder is gone: taken over
    assert json.loads(dead.lock_file.read_text())["pid"] == os.getpid()
    dead.unlock()
    _lock(first, 1, host="another-host")
    with pytest.raises(ConfigError, match=r"on another-host.*remove"):
        first.lock()
    first.lock_file.write_text("")  # damaged, or its writer still between open and write
    with pytest.raises(ConfigError, match="cannot be read"):
        first.lock()


def test_tune_folders(tmp_path: Path) -> None:
    tune = TuneDir.create(tmp_path / "tune", "flowers-tune")
    for attribute, name in TUNE_FILES.items():
        assert getattr(tune, attribute) == tune.path / name
    assert tune.trial(3, of=8).path == tune.path / "trial-03"
    assert tune.trial(7, of=120).path == tune.path / "trial-007"
    tune.trials.write_text("trial\n")
    with pytest.raises(ConfigError, match="already holds a tune"):
        TuneDir.create(tune.path, "flowers-tune")


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module's code (f-string parts included), docstrings not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_only_the_run_package_spells_run_file_names() -> None:
    """A path built from a run file's name outside finetune/run/ is a second owner of the
    layout. (Prose that mentions a file, in messages and help, is fine: it is not a path.)"""
    # Not "bundle" (also a format's name) nor "augment-preview.png" (also `finetune augment`'s
    # default output, in the working directory): names that mean something besides a run file.
    shared = {"bundle", "augment-preview.png"}
    names = {*RUN_FILES.values(), *TUNE_FILES.values(), "eval-val"} - shared
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "run" and path.parent.parent == PACKAGE:
            continue
        for line, value in _string_literals(path):
            pattern = value.startswith(("snapshot-", "trial-", "eval-")) or value.endswith("*.pt")
            if value in names or pattern:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r}")
    assert not found, "use finetune.run.layout.RunDir / TuneDir instead:\n" + "\n".join(found)
