"""The real ``finetune`` command, run as a user runs it."""

from __future__ import annotations

import csv
import json
import resource
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner, Result

import finetune
from finetune.cli.commands import cli
from finetune.inference.predict import expand_inputs
from finetune.run.checkpoint import load_checkpoint
from finetune.training.loop import EpochResult, read_metrics

from .conftest import CliRuns, copy_classes

ROOT = Path(__file__).resolve().parents[1]


def run(
    *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("finetune")
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=600,
        check=False,
    )


def invoke(*args: str, stdin: str | None = None) -> Result:
    """A command run in this process: the commands that only read runs, whose seconds in a new
    process would go to importing torch. The process's warning display is left as it was."""
    shown = warnings.showwarning
    try:
        return CliRunner().invoke(cli, list(args), input=stdin)
    finally:
        warnings.showwarning = shown


def test_fit_says_what_auto_chose_why_and_where_the_run_is(cli_runs: CliRuns) -> None:
    fit, out = cli_runs.fits["auto"], cli_runs.auto
    assert fit.returncode == 0, fit.stderr
    assert "best epoch" in fit.stdout and f"finetune predict {out}" in fit.stdout
    # auto (the default) says what it chose and why before it trains.
    assert "auto      little data, different from ImageNet -> stage-probe" in fit.stderr
    assert "BatchNorm shift" in fit.stderr and "cross-validated accuracy" in fit.stderr
    assert "strategy     stage-probe" in fit.stdout
    assert (out / "best.pt").is_file() and (out / "metrics.csv").is_file()


def _table(cli_runs: CliRuns) -> str:
    table = invoke("predict", str(cli_runs.auto), str(cli_runs.data / "bag"))
    assert table.exit_code == 0, table.output
    return table.stdout


def test_predict_gives_one_answer_per_image_in_every_format(cli_runs: CliRuns) -> None:
    out, data = cli_runs.auto, cli_runs.data
    listed = "\n".join(map(str, sorted((data / "bag").glob("*.png")))) + "\n"
    table = _table(cli_runs)
    lines = table.strip().splitlines()
    assert len(lines) == 20 and all(line.split("\t")[1] in {"bag", "sneaker", "trouser"}
                                    for line in lines)  # fmt: skip
    # Paths on stdin (`-`), CSV and JSON give the same answers as the table.
    as_csv = invoke("predict", str(out), "-", "--format", "csv", "--top-k", "5", stdin=listed)
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.reader(as_csv.stdout.splitlines()))
    assert rows[0] == ["path", "label", "probability"] + [
        f"{name}_{i}" for i in range(2, 6) for name in ("label", "probability")
    ]
    assert all(len(r) == len(rows[0]) for r in rows)  # 3 classes: the missing ranks are empty
    assert [(r[0], r[1]) for r in rows[1:]] == [tuple(line.split("\t")[:2]) for line in lines]
    as_json = invoke("predict", str(out), "-", "--format", "json", stdin=listed)
    assert [(p["path"], p["label"]) for p in json.loads(as_json.stdout)] == [
        (r[0], r[1]) for r in rows[1:]]  # fmt: skip
    # Another checkpoint of the run, a whole folder, the top 2 of each.
    from_last = invoke("predict", str(out / "last.pt"), str(data), "--json", "--top-k", "2")
    assert from_last.exit_code == 0, from_last.output
    items = json.loads(from_last.stdout)
    assert len(items) == 60
    assert set(items[0]) == {"path", "label", "probability", "top_k"}
    assert len(items[0]["top_k"]) == 2 and items[0]["top_k"][0]["label"] == items[0]["label"]
    # Test-time augmentation averages over views: other probabilities, the same images.
    flipped = invoke("predict", str(out), str(data / "bag"), "--tta", "flip")
    assert flipped.exit_code == 0 and len(flipped.stdout.strip().splitlines()) == 20
    assert flipped.stdout != table


def test_every_export_answers_exactly_as_the_run_does(cli_runs: CliRuns) -> None:
    out, bags = cli_runs.auto, str(cli_runs.data / "bag")
    table = _table(cli_runs)
    exports = {
        (): "bundle",  # the default format: safetensors
        ("--format", "torchscript"): "model.torchscript.pt",
        ("--format", "onnx"): "model.onnx",
    }
    for options, name in exports.items():
        exported, path = invoke("export", str(out), *options), out / name
        assert exported.exit_code == 0, exported.output
        assert exported.stdout.strip() == str(path)
        predicted = invoke("predict", str(path), bags)
        assert predicted.exit_code == 0 and predicted.stdout == table, (path, predicted.output)


def test_evaluate_writes_its_report_and_figures(cli_runs: CliRuns) -> None:
    out, data = cli_runs.auto, cli_runs.data
    evaluated = invoke("evaluate", str(out), str(data), "-o", str(out / "eval-cli"))
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.stdout.startswith("accuracy     ") and "confusion" in evaluated.stdout
    for figure in ("confusion.png", "mistakes.png"):
        assert (out / "eval-cli" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    with_tta = invoke("evaluate", str(out), str(data), "--tta", "10crop", "--json", "-o",
                      str(out / "eval-tta"))  # fmt: skip
    assert with_tta.exit_code == 0, with_tta.output
    assert json.loads(with_tta.stdout)["tta"] == "10crop"


def test_augment_preview_writes_a_png(small_folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "preview.png"
    preview = invoke("augment-preview", str(small_folder), "-o", str(target), "--augment",
                     "strong", "--rotate90")  # fmt: skip
    assert preview.exit_code == 0, preview.output
    assert preview.stdout.strip() == str(target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_many(*commands: tuple[str, ...], stdin: dict[int, str] | None = None, jobs: int = 3
             ) -> list[subprocess.CompletedProcess]:  # fmt: skip
    """Run independent commands side by side, ``jobs`` at a time; their results in order.

    Each command spends most of its seconds importing torch and timm on one core, so two or
    three at once take little longer than one. ``stdin`` maps a command's index to its input.
    """
    stdin = stdin or {}
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda i: run(*commands[i], stdin=stdin.get(i)), range(len(commands))))


_ERRORS = [
    (["fit", "no/such/folder"], "is not a folder"),
    (["fit", "{data}", "--strategy", "nope"], "auto, finetune-all, finetune-top, linear"),
    (["fit", "{data}", "--unfreeze", "-1"], "unfreeze must be >= 0"),
    (["plan", "{data}", "--warmup-epochs", "12"], "warmup_epochs must be"),
    (["fit", "{data}", "--val-split", "1.5"], "val_split"),
    (["fit", "{data}", "--crop-scale", "0.8", "0.2"], "crop_scale must satisfy"),
    (["fit", "{data}", "--hue", "0.9"], "hue must be between 0 and 0.5"),
    (["fit", "{data}", "--model", "resnt18"], "Did you mean resnet18"),
    (["predict", "no/such/run", "x.png"], "does not exist"),
    (["report", "{data}"], "is not a run directory of `finetune fit`"),
    (["runs", "no/such/folder"], "is not a folder"),
    (["fit", "{data}", "--log-format", "xml"], "'xml' is not one of 'text', 'json'"),
]


def test_errors_are_one_clean_line_and_a_failing_exit(small_folder: Path) -> None:
    commands = [tuple(a.format(data=small_folder) for a in args) for args, _ in _ERRORS]
    for (args, message), result in zip(_ERRORS, run_many(*commands), strict=True):
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args


def test_a_json_log_is_one_event_per_line_and_the_summary_says_what_next(
    cli_runs: CliRuns,
) -> None:
    fit, out = cli_runs.fits["json"], cli_runs.json
    assert fit.returncode == 0, fit.stderr
    events = [json.loads(line) for line in fit.stderr.splitlines()]  # every line is JSON
    names = [e["event"] for e in events]
    assert names[:2] == ["data", "decision"] and names[-1] == "summary"
    assert events[0]["layout"] == "random split" and events[0]["skipped"] == 0
    per_class = {c: events[0]["train"][c] + events[0]["val"][c] for c in events[0]["classes"]}
    assert per_class == {"bag": 20, "sneaker": 20, "trouser": 20}
    assert events[1]["strategy"] == "finetune-top" and events[1]["auto"] is None
    epochs = [e for e in events if e["event"] == "epoch"]
    assert set(epochs[0]) == {"event", "epochs", *(f.name for f in fields(EpochResult))}
    recorded = read_metrics(out / "metrics.csv")
    assert [(e["epoch"], e["val_acc"], e["best"]) for e in epochs] == [
        (r.epoch, r.val_acc, r.best) for r in recorded]  # fmt: skip
    assert len(epochs) == 2 and epochs[0]["ema_val_acc"] is None  # nan (no EMA): strict JSON
    assert events[-1]["report"] == str(out / "report.html") and events[-1]["best_epoch"] >= 1
    # The summary on stdout says what ran, why, where everything is and what to do next.
    for expected in (
        "strategy     finetune-top (chosen with --strategy)",
        f"checkpoints  {out / 'best.pt'} (best)",
        f"report       {out / 'report.html'}",
        f"finetune evaluate {out} LABELLED_FOLDER",
        f"finetune export {out}",
        f"finetune report {out}",
    ):
        assert expected in fit.stdout, expected


def test_a_quiet_fit_prints_only_its_summary(cli_runs: CliRuns) -> None:
    quiet = cli_runs.fits["quiet"]
    assert quiet.returncode == 0 and quiet.stderr == "" and "best epoch" in quiet.stdout


def test_report_writes_the_runs_report_again(cli_runs: CliRuns) -> None:
    target = cli_runs.json / "report.html"
    target.unlink()  # fit wrote one; the command writes it again, as it was
    again = invoke("report", str(cli_runs.json), "--max-images", "3")
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == str(target) and target.is_file()
    evaluation = cli_runs.json / "eval-val" / "evaluation.json"
    assert json.loads(evaluation.read_text())["images"] == 3


def test_runs_lists_every_run_with_its_strategy_and_epochs(cli_runs: CliRuns) -> None:
    listed = invoke("runs", str(cli_runs.runs))
    assert listed.exit_code == 0, listed.output
    rows = listed.stdout.splitlines()
    assert rows[0].split()[:3] == ["run", "strategy", "val"] and len(rows) == 4
    by_name = sorted(rows[1:])  # the runs ran side by side: any may have started first
    assert by_name[0].split()[:2] == ["auto", "stage-probe"] and "1/1" in by_name[0]
    assert by_name[1].split()[:2] == ["json", "finetune-top"] and "2/2" in by_name[1]
    assert by_name[2].split()[:2] == ["quiet", "linear"] and "1/1" in by_name[2]


def test_compare_tabulates_and_plots_runs(
    cli_runs: CliRuns, report_run: finetune.FitResult, tmp_path: Path
) -> None:
    compared = invoke("compare", str(cli_runs.json), str(report_run.dir), "-o",
                      str(tmp_path / "cmp.png"))  # fmt: skip
    assert compared.exit_code == 0, compared.output
    table = compared.stdout.splitlines()
    assert table[0].split()[:4] == ["run", "strategy", "model", "px"]
    assert table[1].split()[:4] == ["json", "finetune-top", "tf_efficientnet_lite0", "32"]
    assert table[2].startswith("top ") and table[-1] == f"plot  {tmp_path / 'cmp.png'}"
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_shows_the_decision_without_training(small_folder: Path) -> None:
    plan = ("plan", str(small_folder), "--image-size", "32")
    result, as_json = run_many(plan, (*plan, "--json"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cell       little data, different from ImageNet" in out
    assert "median 16 training images per class" in out
    assert "strategy   stage-probe" in out and "estimate   about" in out
    assert not (small_folder / "runs").exists() and not list(small_folder.glob("*.pt"))
    # The command it suggests is the fit with the same options.
    assert out.rstrip().endswith(f"finetune fit {small_folder} --image-size 32")
    as_json = json.loads(as_json.stdout)
    assert as_json["strategy"] == "stage-probe"
    assert as_json["decision"]["size"]["images"] == 48


def test_running_out_of_memory_before_training_names_the_options(small_folder: Path) -> None:
    # plan times a training pass of 16 images at 8192 px (12 GiB of input alone): under an 8 GiB
    # address-space limit the allocation fails in auto's measurement, not in a training step.
    limit = 8 * 2**30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    exe = Path(sys.executable).with_name("finetune")
    args = ["plan", str(small_folder), "--strategy", "finetune-all", "--image-size", "8192"]
    result = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, preexec_fn=cap, timeout=600, check=False
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "Out of memory" in result.stderr and "--image-size" in result.stderr
    assert "--batch-size" in result.stderr


def test_the_speed_options_are_in_the_help_and_reach_the_config(small_folder: Path) -> None:
    helped = CliRunner().invoke(cli, ["fit", "--help"])
    assert helped.exit_code == 0
    for option in ("--precision [auto|fp32|bf16|fp16]", "--channels-last / --no-channels-last",
                   "--compile", "--auto-batch-size"):  # fmt: skip
        assert option in helped.output, option
    speed = ["--precision", "bf16", "--no-channels-last", "--compile", "--auto-batch-size"]
    plan = ("plan", str(small_folder), "--strategy", "linear", "--image-size", "32", *speed)
    result, as_json = run_many(plan, (*plan, "--json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(" ".join(speed))  # the fit it suggests keeps them
    config = json.loads(as_json.stdout)["config"]
    assert (config["precision"], config["channels_last"], config["compile"],
            config["auto_batch_size"]) == ("bf16", False, True, True)  # fmt: skip
    bad = CliRunner().invoke(cli, ["plan", str(small_folder), "--precision", "fp8"])
    assert bad.exit_code == 2 and "'fp8' is not one of 'auto', 'fp32', 'bf16', 'fp16'" in bad.output


def test_python_dash_m_and_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "fit" in result.stdout and "predict" in result.stdout


def test_every_command_has_help_with_an_example_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        assert command.help and "Example" in command.help, name
        assert f"finetune {name}" in readme, name


def test_check_lists_bad_files_and_leaks_without_touching_anything(small_folder: Path) -> None:
    (small_folder / "bag" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    first_bag = sorted((small_folder / "bag").glob("*.png"))[0]
    (small_folder / "trouser" / "copy.png").write_bytes(first_bag.read_bytes())
    before = sorted(p.name for p in small_folder.rglob("*"))
    result, as_json = run_many(("check", str(small_folder)), ("check", str(small_folder), "--json"))
    assert result.returncode == as_json.returncode == 3, result.stderr  # an unreadable image
    assert result.stdout.startswith("checked 62 files: 61 images, 1 skipped")
    assert "broken.jpg" in result.stdout and "truncated or corrupt" in result.stdout
    assert "the same image in classes bag and trouser" in result.stdout
    as_json = json.loads(as_json.stdout)
    assert [s["reason"][:9] for s in as_json["skipped"]] == ["truncated"]
    assert sorted(p.name for p in small_folder.rglob("*")) == before


def _start_fit(small_folder: Path, out: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("finetune")
    return subprocess.Popen(
        [str(exe), "fit", str(small_folder), *_RESUMABLE, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# Cosine restarts (a snapshot per epoch) and EMA: resume must carry the scheduler and the average.
_RESUMABLE = ["--strategy", "finetune-all", "--epochs", "3", "--image-size", "32",
              "--batch-size", "8", "--schedule", "restarts", "--ema"]  # fmt: skip


def _wait_for_epoch_1(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 300
    while not (out / "last.pt").is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    time.sleep(0.5)  # into epoch 2


def _metrics(run_dir: Path) -> list[tuple[str, ...]]:
    rows = list(csv.reader((run_dir / "metrics.csv").open()))
    return [tuple(r[:6] + r[7:]) for r in rows]  # all but seconds


def test_killed_then_resumed_ends_like_an_uninterrupted_run(
    small_folder: Path, tmp_path: Path
) -> None:
    whole = run("fit", str(small_folder), *_RESUMABLE, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    process = _start_fit(small_folder, tmp_path / "killed")
    _wait_for_epoch_1(process, tmp_path / "killed")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert len(_metrics(tmp_path / "killed")) < 4  # header + fewer than 3 epochs
    resumed = run("fit", "--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resume    " in resumed.stderr and "continuing" in resumed.stderr
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "whole")
    for name in ("last.pt", "ema.pt", "snapshot-3.pt"):
        resumed_state = load_checkpoint(tmp_path / "killed" / name)
        whole_state = load_checkpoint(tmp_path / "whole" / name)
        assert torch.equal(resumed_state["state_dict"]["head.weight"],
                           whole_state["state_dict"]["head.weight"]), name  # fmt: skip
    again = run("fit", "--resume", str(tmp_path / "killed"))
    assert again.returncode != 0 and "is complete (3/3 epochs)" in again.stderr
    mixed = run("fit", str(small_folder), "--resume", str(tmp_path / "killed"))
    assert mixed.returncode != 0 and "give only the run directory" in mixed.stderr


def test_ctrl_c_leaves_a_loadable_last_checkpoint_and_says_how_to_resume(
    small_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stopped"
    process = _start_fit(small_folder, out)
    _wait_for_epoch_1(process, out)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert f"finetune fit --resume {out}" in stderr and "Traceback" not in stderr
    assert finetune.load(out / "last.pt").classes == ("bag", "sneaker", "trouser")
    assert not list(out.glob(".*.tmp"))  # no half-written checkpoint left behind


def test_predict_and_evaluate_an_ensemble(tiny_runs: list[Path], tmp_path: Path) -> None:
    folder = copy_classes(tmp_path / "test", ["bag", "sneaker", "trouser"], 3, split="test")
    bundle = finetune.export(tiny_runs[1], out=tmp_path / "bundle")
    models = [str(tiny_runs[0]), str(bundle), str(tiny_runs[2] / "best.pt")]  # 32, 32, 48 px
    images = [folder / "bag", next((folder / "trouser").glob("*.png"))]
    table, evaluated = run_many(
        ("predict", "--ensemble", *models, *map(str, images), "--top-k", "2", "--device", "cpu"),
        ("evaluate", "--ensemble", str(tiny_runs[0]), str(tiny_runs[2]), str(folder),
         "--checkpoint", "last", "--device", "cpu"),
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    ensemble = finetune.load_ensemble(models, device="cpu")
    expected = ensemble.predict(expand_inputs(images), top_k=2)
    assert table.stdout.splitlines() == [
        f"{p.path}\t" + ", ".join(f"{label} {prob:.3f}" for label, prob in p.top_k)
        for p in expected
    ]
    assert len(expected) == 4

    assert evaluated.returncode == 0, evaluated.stderr
    lasts = [str(tiny_runs[0] / "last.pt"), str(tiny_runs[2] / "last.pt")]
    assert evaluated.stdout.startswith("accuracy     ")
    assert f"ensemble     2 models, checkpoint last: {', '.join(lasts)}\n" in evaluated.stdout
    out = tiny_runs[0] / "eval-test-last-ensemble"  # the default: beside the first model
    assert f"report       {out / 'evaluation.json'}" in evaluated.stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert report["model"] == {
        "ensemble": [{"file": f, "checkpoint": "last"} for f in lasts],
        "source": None,
        "checkpoint": "last",
    }
    reference = finetune.load_ensemble(tiny_runs[::2], device="cpu", checkpoint="last")
    assert report["images"] == 9
    assert report["accuracy"] == pytest.approx(reference.evaluate(folder).accuracy)


def test_ensemble_and_checkpoint_mistakes_are_clean_errors(tiny_runs: list[Path]) -> None:
    image = next((ROOT / "sample_data" / "fashion" / "test" / "bag").glob("*.png"))
    run0, run1 = map(str, tiny_runs[:2])
    cases = [
        (["evaluate", run0, run1, str(image.parent)], "add --ensemble to average them"),
        (["predict", "--ensemble", run0, str(image), "--checkpoint", "snapshots"],
         f"{run0} holds no snapshot-K.pt files: the run was trained without --schedule restarts"),
    ]  # fmt: skip
    for args, message in cases:
        result = run(*args)
        assert result.returncode != 0, args
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_every_fit_config_field_is_one_generated_option_with_help() -> None:
    from finetune.config import SETTINGS

    for name in ("fit", "plan", "tune", "lr-find"):
        params = [p for p in cli.commands[name].params if isinstance(p, click.Option)]
        assert all(p.help and p.help.strip() for p in params), name
        # generated: the field's own help (tune's --out is the tune folder, lr-find's the plot)
        found = [p.name for p in params if p.name in SETTINGS and p.help == SETTINGS[p.name].help]
        assert len(found) == len(set(found)), name  # exactly one option per field
        expected = [f.name for f in fields(finetune.FitConfig)]
        if name != "fit":  # their --out is their own or absent
            expected.remove("out")
        assert found == expected, name  # ... in declaration order
    fit = {p.name: p for p in cli.commands["fit"].params}
    assert fit["num_workers"].opts == ["--workers"]
    assert fit["feature_cache"].opts == ["--no-feature-cache"]
    assert fit["feature_cache"].flag_value is False
    assert fit["hflip"].secondary_opts == ["--no-hflip"] and fit["hflip"].default is None
    assert fit["crop_scale"].type.arity == 2 and fit["time_budget"].metavar == "MINUTES"


def test_lr_help_lists_each_optimizer_s_real_default() -> None:
    from finetune.config import DEFAULT_LR

    lr = next(p for p in cli.commands["fit"].params if p.name == "lr")
    for optimizer, default in DEFAULT_LR.items():
        assert f"{optimizer} {default:g}" in lr.help, optimizer
    assert "sgd 0.1" in lr.help  # the value it drifted from ("sgd 1e-2")


def test_help_does_not_import_torch() -> None:
    code = "import sys; import finetune.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_cache_shows_and_clears_what_runs_keep(
    photo_folder_for_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))  # the command inherits it
    from finetune.data.decoded import DecodedCache
    from finetune.data.scan import scan_folder
    from finetune.data.transforms import Preprocessing

    samples = scan_folder(photo_folder_for_cache).train
    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic")
    DecodedCache.for_preprocessing(pre).fill(samples)
    result = run("cache")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(tmp_path / "cache"))
    decoded = next(line for line in lines if line.split()[0] == "decoded")
    assert f"{len(samples)} files" in decoded and "scan" in result.stdout

    result = run("cache", "--clear", "decoded")
    assert result.returncode == 0 and result.stdout.startswith("freed ")
    assert not (tmp_path / "cache" / "decoded").exists()
    assert "decoded         0 files" in result.stdout
    assert run("cache", "--clear", "everything").returncode == 2


@pytest.fixture()
def photo_folder_for_cache(tmp_path: Path) -> Path:
    from .conftest import photo_crops

    return photo_crops(tmp_path / "photos", per_class=3, size=64)
