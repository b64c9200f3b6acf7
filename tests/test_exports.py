"""Exports (safetensors bundle, TorchScript, ONNX): the run's answers; bundles never unpickle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
from finetune.data.images import load_image
from finetune.data.transforms import eval_transform
from finetune.errors import CheckpointError, NotAvailableError
from finetune.files import file_mode
from finetune.inference.export import export, read_bundle
from finetune.inference.formats import Format, detect_format, is_bundle, is_torchscript
from finetune.inference.predict import expand_inputs, is_model_path


def _logits(predictor: finetune.Predictor, paths: list[Path]) -> torch.Tensor:
    transform = eval_transform(predictor.preprocessing)
    x = torch.stack([transform(image=load_image(p))["image"] for p in paths])
    with torch.inference_mode():
        return predictor.model(x)


def test_bundle_gives_the_runs_answers(
    linear_run: finetune.FitResult, fashion: Path, tmp_path: Path
) -> None:
    bundle = export(linear_run.dir, out=tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == ["model.json", "model.safetensors"]
    assert all(p.stat().st_mode & 0o777 == file_mode() for p in bundle.iterdir())
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["model"]["name"] == "tf_efficientnet_lite0"
    assert meta["classes"] == list(linear_run.classes)
    assert meta["preprocessing"]["input_size"] == linear_run.config.image_size
    assert meta["strategy"] == "linear" and meta["metrics"]["val_acc"] == linear_run.best_metric
    assert {"finetune", "torch", "timm"} <= set(meta["versions"])

    run_predictor = finetune.load(linear_run.dir, device="cpu")
    bundle_predictor = finetune.load(bundle, device="cpu")
    assert bundle_predictor.classes == run_predictor.classes
    assert bundle_predictor.preprocessing == run_predictor.preprocessing
    images = expand_inputs([fashion / "test"])
    diff = (_logits(bundle_predictor, images) - _logits(run_predictor, images)).abs().max()
    assert diff < 1e-4
    top1 = [p.label for p in run_predictor.predict(images)]
    assert [p.label for p in bundle_predictor.predict(images)] == top1
    # the weights file itself works as a path too
    same = finetune.load(bundle / "model.safetensors", device="cpu").predict(images[:3])
    assert [p.label for p in same] == top1[:3]


def test_stage_probe_bundle_keeps_only_its_stages(small_folder: Path, tmp_path: Path) -> None:
    run = finetune.fit(
        small_folder, strategy="stage-probe", image_size=32, out=str(tmp_path / "r"), verbose=False
    )
    stage = torch.load(run.best_checkpoint, weights_only=True)["model"]["stage"]
    bundle = export(run.dir)  # default: next to the checkpoint
    assert bundle == run.dir / "bundle" and is_bundle(bundle)
    described = read_bundle(bundle)
    assert described["model"]["stage"] == stage
    assert not any(k.startswith("backbone.conv_head") for k in described["state_dict"])
    images = sorted(small_folder.rglob("*.png"))
    a = finetune.load(run.dir, device="cpu").predict_proba(images)
    b = finetune.load(bundle, device="cpu").predict_proba(images)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert export(run.dir) == bundle  # exporting again replaces the bundle


class _Payload:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_in_place_of_the_weights_is_refused_not_executed(
    linear_run: finetune.FitResult, tmp_path: Path
) -> None:
    bundle = export(linear_run.dir, out=tmp_path / "bundle")
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, bundle / "model.safetensors")
    with pytest.raises(CheckpointError, match="Cannot read the bundle"):
        finetune.load(bundle)
    assert not marker.exists()


def test_export_refuses_what_it_cannot_do(linear_run: finetune.FitResult, tmp_path: Path) -> None:
    with pytest.raises(NotAvailableError, match="Unknown format 'coreml'"):
        export(linear_run.dir, format="coreml")
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a finetune bundle"):
        export(linear_run.dir, out=occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_torchscript_runs_with_plain_torch_jit_load_and_gives_the_runs_answers(
    linear_run: finetune.FitResult, fashion: Path, tmp_path: Path
) -> None:
    target = export(linear_run.dir, format="torchscript", out=tmp_path / "model.pt")
    assert is_torchscript(target) and not is_torchscript(linear_run.best_checkpoint)
    run_predictor = finetune.load(linear_run.dir, device="cpu")
    images = expand_inputs([fashion / "test"])
    transform = eval_transform(run_predictor.preprocessing)
    x = torch.stack([transform(image=load_image(p))["image"] for p in images])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript
        plain = torch.jit.load(str(target))  # no finetune involved
    with torch.inference_mode():
        assert (plain(x) - run_predictor.model(x)).abs().max() < 1e-4  # any batch size
    scripted = finetune.load(target, device="cpu")
    assert scripted.classes == run_predictor.classes
    assert scripted.preprocessing == run_predictor.preprocessing
    top1 = [p.label for p in run_predictor.predict(images)]
    assert [p.label for p in scripted.predict(images)] == top1
    # A checkpoint is never overwritten by an export.
    with pytest.raises(CheckpointError, match="not a TorchScript export"):
        export(linear_run.dir, format="torchscript", out=linear_run.best_checkpoint)
    assert not is_torchscript(linear_run.best_checkpoint)


def test_a_torchscript_file_without_our_description_is_explained(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(foreign))
    with pytest.raises(CheckpointError, match="--format torchscript"):
        finetune.load(foreign)


def test_onnx_passes_the_checker_runs_in_onnxruntime_and_gives_the_runs_answers(
    linear_run: finetune.FitResult, fashion: Path, tmp_path: Path
) -> None:
    import onnx
    import onnxruntime

    target = export(linear_run.dir, format="onnx", out=tmp_path / "model.onnx")
    proto = onnx.load(str(target))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["finetune"])
    assert meta["classes"] == list(linear_run.classes)
    assert meta["preprocessing"]["input_size"] == linear_run.config.image_size

    run_predictor = finetune.load(linear_run.dir, device="cpu")
    images = expand_inputs([fashion / "test"])
    transform = eval_transform(run_predictor.preprocessing)
    x = torch.stack([transform(image=load_image(p))["image"] for p in images])
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        eager = run_predictor.model(x).numpy()
    for batch in (1, 7, len(x)):  # the batch dimension is dynamic
        logits = session.run(None, {"image": x[:batch].numpy()})[0]
        assert np.abs(logits - eager[:batch]).max() < 1e-4
    from_onnx = finetune.load(target, device="cpu")
    assert from_onnx.classes == run_predictor.classes
    top1 = [p.label for p in run_predictor.predict(images)]
    assert [p.label for p in from_onnx.predict(images)] == top1


def test_class_names_that_look_like_paths_never_become_paths(
    linear_run: finetune.FitResult, fashion: Path, tmp_path: Path
) -> None:
    """A checkpoint whose class names are crafted paths: export, predict and evaluate write only
    their fixed file names inside their output folders."""
    crafted = ["../../escaped", "/tmp/finetune-absolute", "back\\slash", "..", "a/../../b"]
    crafted += [f"c{i}" for i in range(len(linear_run.classes) - len(crafted))]
    run = tmp_path / "work" / "run"
    run.mkdir(parents=True)
    payload = torch.load(linear_run.best_checkpoint, weights_only=True)
    payload["classes"] = crafted
    torch.save(payload, run / "best.pt")
    labelled = tmp_path / "work" / "labelled" / "back\\slash"  # a legal folder name on POSIX
    labelled.mkdir(parents=True)
    images = sorted((fashion / "test" / "bag").glob("*.png"))[:3]
    for path in images:
        (labelled / path.name).write_bytes(path.read_bytes())
    before = set(tmp_path.rglob("*"))

    outputs = [export(run, fmt) for fmt in ("safetensors", "torchscript", "onnx")]
    for exported in [run, *outputs]:
        predictor = finetune.load(exported)
        assert predictor.classes == tuple(crafted)
        predictor.predict(images)
        predictor.evaluate(labelled.parent).save(run / "eval")

    created = set(tmp_path.rglob("*")) - before
    assert created and all(p.is_relative_to(run) for p in created), sorted(created)
    names = {p.name for p in created}
    assert names <= {
        "bundle",
        "model.json",
        "model.safetensors",
        "model.torchscript.pt",
        "model.onnx",
        "eval",
        "evaluation.json",
        "confusion.png",
        "mistakes.png",
    }
    assert not Path("/tmp/finetune-absolute").exists()
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_finetune_export_is_the_function_whatever_was_imported_first() -> None:
    """The module is ``finetune.inference.export``: importing it (``finetune.load`` does) must
    not turn ``finetune.export`` into a module (a top-level submodule named ``export`` did)."""
    import finetune.inference.predict  # imports the exports module

    assert callable(finetune.load) and callable(finetune.export)
    assert finetune.export is export


# --- the format comes from the content, not the name -----------------------------------------

_KINDS = {"torchscript": Format.TORCHSCRIPT, "onnx": Format.ONNX, "safetensors": Format.BUNDLE}


def _finetune_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command, in a fresh process."""
    command = [sys.executable, "-m", "finetune", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def unsuffixed(tiny_runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``finetune export RUN --format F -o .../F/mymodel`` for each format: names without a
    suffix, through the real command."""
    root = tmp_path_factory.mktemp("unsuffixed")
    targets = {fmt: root / fmt / "mymodel" for fmt in _KINDS}
    with ThreadPoolExecutor(len(targets)) as pool:
        results = pool.map(
            lambda fmt: _finetune_cli(
                "export", str(tiny_runs[0]), "--format", fmt, "-o", str(targets[fmt])
            ),
            targets,
        )
        for fmt, result in zip(targets, results, strict=True):
            assert result.returncode == 0, (fmt, result.stderr[-2000:])
            assert result.stdout.strip() == str(targets[fmt])  # the name as given
    return targets


def test_exports_without_a_suffix_predict_through_the_cli(
    unsuffixed: dict[str, Path], tiny_runs: list[Path], fashion: Path
) -> None:
    images = sorted((fashion / "test" / "sneaker").glob("*.png"))[:2]
    expected = finetune.load(tiny_runs[0], device="cpu").predict_proba(images)
    for fmt, model in unsuffixed.items():
        assert detect_format(model) is _KINDS[fmt]
    commands = [("predict", str(m), *map(str, images), "--json", "--top-k", "3")
                for m in unsuffixed.values()]  # fmt: skip
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(lambda c: _finetune_cli(*c), commands))
    for fmt, result in zip(unsuffixed, results, strict=True):
        assert result.returncode == 0, (fmt, result.stderr[-2000:])
        rows = json.loads(result.stdout)
        assert [r["path"] for r in rows] == list(map(str, images))
        got = [{t["label"]: t["probability"] for t in r["top_k"]} for r in rows]
        classes = finetune.load(tiny_runs[0], device="cpu").classes
        probs = [[row[c] for c in classes] for row in got]
        np.testing.assert_allclose(probs, expected, atol=1e-4, err_msg=fmt)


def test_any_name_loads_by_content_and_unknown_files_list_the_kinds(
    unsuffixed: dict[str, Path], tiny_runs: list[Path], fashion: Path, tmp_path: Path
) -> None:
    image = next((fashion / "test" / "bag").glob("*.png"))
    expected = finetune.load(tiny_runs[0], device="cpu").predict_proba([image])
    # Misleading suffixes: each file is read as what it holds.
    renamed = {
        "checkpoint.onnx": (tiny_runs[0] / "best.pt", Format.CHECKPOINT),
        "scripted.onnx": (unsuffixed["torchscript"], Format.TORCHSCRIPT),
        "graph.pt": (unsuffixed["onnx"], Format.ONNX),
    }
    for name, (source, kind) in renamed.items():
        shutil.copy(source, tmp_path / name)
        assert detect_format(tmp_path / name) is kind and is_model_path(tmp_path / name)
        probs = finetune.load(tmp_path / name, device="cpu").predict_proba([image])
        np.testing.assert_allclose(probs, expected, atol=1e-4, err_msg=name)
    assert not is_torchscript(unsuffixed["onnx"]) and not is_bundle(unsuffixed["torchscript"])
    # Files of no known kind: the error names the file and every kind finetune reads.
    shutil.copy(image, tmp_path / "picture.pt")
    (tmp_path / "notes").write_text("not a model\n")
    for path in (tmp_path / "picture.pt", tmp_path / "notes", fashion / "test"):
        with pytest.raises(CheckpointError, match="is not a model finetune reads") as raised:
            finetune.load(path)
        message = str(raised.value)
        assert str(path) in message
        assert all(k in message for k in ("run folder", "checkpoint", "bundle", "TorchScript",
                                          "ONNX"))  # fmt: skip
    assert not is_model_path(tmp_path / "notes") and not is_model_path(image)
    with pytest.raises(CheckpointError, match="does not exist"):
        finetune.load(tmp_path / "missing")


def test_export_never_removes_or_overwrites_what_it_did_not_write(
    linear_run: finetune.FitResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle replaces its own two files alone; a folder or file it did not write is refused
    (named), and --force writes the export's files without removing anything else."""
    shared = tmp_path / "shared"
    export(linear_run.dir, out=shared)
    (shared / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"shared is a finetune bundle that also holds notes"):
        export(linear_run.dir, out=shared)
    assert export(linear_run.dir, out=shared, force=True) == shared
    assert sorted(p.name for p in shared.iterdir()) == ["model.json", "model.safetensors",
                                                        "notes.txt"]  # fmt: skip
    assert (shared / "notes.txt").read_text() == "keep me" and is_bundle(shared)
    # `-o .` inside a bundle folder: the working directory keeps its files and stays itself.
    monkeypatch.chdir(shared)
    result = _finetune_cli("export", str(linear_run.dir), "-o", ".")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds notes.txt" in result.stderr and "--force" in result.stderr
    assert (shared / "notes.txt").read_text() == "keep me" and is_bundle(shared)
    # One-file exports: an earlier export of the kind is replaced, a user's file is not.
    mine = tmp_path / "model.pt"
    mine.write_text("my notes")
    with pytest.raises(CheckpointError, match=r"model\.pt exists and is not a TorchScript export"):
        export(linear_run.dir, format="torchscript", out=mine)
    assert mine.read_text() == "my notes"
    assert export(linear_run.dir, format="torchscript", out=mine, force=True) == mine
    assert export(linear_run.dir, format="torchscript", out=mine) == mine  # ours: replaced
    for bad in (shared, mine / "below"):  # a folder for a file; a path below a file
        with pytest.raises(CheckpointError, match=r"is a folder|lies below .*model\.pt"):
            export(linear_run.dir, format="torchscript", out=bad, force=True)
    assert (shared / "notes.txt").read_text() == "keep me" and is_torchscript(mine)
