"""``finetune.load`` and the Predictor on real images."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

import finetune
import finetune.inference.evaluate
import finetune.inference.inputs
from finetune.cli.commands import SKIPPED_EXIT, cli
from finetune.errors import CheckpointError, ConfigError, DataError
from finetune.inference.inputs import Skipped
from finetune.inference.predict import expand_inputs, is_model_path, leading_models
from finetune.run.checkpoint import load_checkpoint

from .conftest import copy_classes


def invoke(*args: str) -> Result:
    """A command run in this process (no seconds spent importing torch again); the
    process's warning display is left as it was."""
    shown = warnings.showwarning
    try:
        return CliRunner().invoke(cli, list(args))
    finally:
        warnings.showwarning = shown


@pytest.fixture(scope="module")
def predictor(linear_run: finetune.FitResult) -> finetune.Predictor:
    return finetune.load(linear_run.dir, device="cpu")


def test_predictions_agree_with_the_validation_metric(
    predictor: finetune.Predictor, linear_run: finetune.FitResult, fashion: Path
) -> None:
    """Predict preprocesses exactly as training evaluated: same accuracy on val/."""
    paths = expand_inputs([fashion / "val"])
    predictions = predictor.predict(paths, tta="none")  # the centre crop, as training scored
    correct = sum(Path(p.path).parent.name == p.label for p in predictions)
    assert len(predictions) == 100
    assert correct / 100 == pytest.approx(linear_run.best_metric)


def test_predict_runs_channels_last_like_training_and_agrees_with_nchw(
    predictor: finetune.Predictor, linear_run: finetune.FitResult, fashion: Path
) -> None:
    paths = expand_inputs([fashion / "test"])[:40]
    assert predictor.channels_last  # the CPU default, as fit trains
    conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = finetune.load(linear_run.dir, device="cpu")
    model = nchw.model.to(memory_format=torch.contiguous_format)
    nchw = finetune.Predictor(
        model, nchw.classes, nchw.preprocessing, "cpu", channels_last=False, tta=nchw.tta
    )
    conv = next(m for m in nchw.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert not nchw.channels_last and conv.weight.is_contiguous()
    np.testing.assert_allclose(
        predictor.predict_proba(paths), nchw.predict_proba(paths), rtol=0, atol=1e-5
    )


def test_held_out_test_images_are_mostly_right(predictor: finetune.Predictor, fashion: Path):
    predictions = predictor.predict(expand_inputs([fashion / "test"]))
    accuracy = np.mean([Path(p.path).parent.name == p.label for p in predictions])
    assert accuracy > 0.5  # chance is 0.1


def test_paths_pil_images_and_arrays_give_the_same_answer(
    predictor: finetune.Predictor, fashion: Path
) -> None:
    path = sorted((fashion / "test" / "trouser").glob("*.png"))[0]
    grey = Image.open(path)
    from_path, from_pil, from_array, from_grey_array = (
        predictor.predict(x)[0] for x in (path, grey, np.array(grey.convert("RGB")), np.array(grey))
    )
    assert from_path.path == str(path) and from_pil.path is None
    assert from_path.label == from_pil.label == from_array.label == from_grey_array.label
    assert from_path.probability == pytest.approx(from_array.probability, abs=1e-6)


def test_top_k_is_sorted_and_bounded(predictor: finetune.Predictor, fashion: Path) -> None:
    path = next((fashion / "test" / "bag").glob("*.png"))
    (prediction,) = predictor.predict(path, top_k=50)
    probs = [p for _, p in prediction.top_k]
    assert len(prediction.top_k) == 10 and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert (prediction.label, prediction.probability) == prediction.top_k[0]
    assert prediction.to_dict()["top_k"][0] == {"label": prediction.label, "probability": probs[0]}


def test_inputs_expand_recursively_and_missing_paths_fail(tmp_path: Path, fashion: Path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    source = next((fashion / "test" / "coat").glob("*.png"))
    (nested / "x.png").write_bytes(source.read_bytes())
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.png").write_bytes(source.read_bytes())
    (tmp_path / "notes.txt").write_text("no")
    assert expand_inputs([tmp_path]) == [nested / "x.png"]
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([tmp_path / "nope.png"])


def bomb_png(path: Path, pixels: int) -> Path:
    """A real PNG of at least ``pixels`` pixels, all black, 1 bit per pixel: 22 KB on disk for
    Pillow's error limit (2 x ``Image.MAX_IMAGE_PIXELS``), as zlib squeezes its zero rows;
    written row by row, so making it costs no memory."""
    side = math.isqrt(pixels - 1) + 1

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    rows = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return path


def unreadable_images(folder: Path, fashion: Path) -> dict[str, Path]:
    """One file of each kind that is not a usable image, all named as PNGs, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    real = next((fashion / "test" / "bag").glob("*.png")).read_bytes()
    files = {name: folder / name for name in ("truncated.png", "text.png", "empty.png")}
    files["truncated.png"].write_bytes(real[: len(real) // 2])
    files["text.png"].write_text("not a png, whatever its name says")
    files["empty.png"].write_bytes(b"")
    files["bomb.png"] = bomb_png(folder / "bomb.png", 2 * Image.MAX_IMAGE_PIXELS + 1)
    # over the warning limit only: refused as fit's scan refuses it (gigabytes to decode)
    files["huge.png"] = bomb_png(folder / "huge.png", Image.MAX_IMAGE_PIXELS + 1)
    return files


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory: pytest.TempPathFactory, fashion: Path) -> dict[str, Path]:
    return unreadable_images(tmp_path_factory.mktemp("unreadable"), fashion)


def test_every_kind_of_unreadable_image_is_skipped_with_why_and_the_others_classified(
    predictor: finetune.Predictor, unreadable: dict[str, Path], tmp_path: Path, fashion: Path
) -> None:
    folder = tmp_path / "folder.png"  # a folder, named as an image
    folder.mkdir()
    first, last = sorted((fashion / "test" / "coat").glob("*.png"))[:2]
    inputs = [first, *unreadable.values(), folder, last]
    skipped: list[Skipped] = []
    predictions = predictor.predict(inputs, on_skip=skipped.append)
    assert [p.path for p in predictions] == [str(first), str(last)]
    assert [s.index for s in skipped] == list(range(1, len(inputs) - 1))
    reasons = {Path(s.path or "").name: s.reason for s in skipped}
    assert reasons["bomb.png"].startswith("decompression bomb: Image size (")
    assert reasons["huge.png"].startswith("decompression bomb: Image size (")
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["text.png"] == "not an image (Pillow does not recognise its content)"
    assert "truncated" in reasons["truncated.png"]
    assert "a folder" in reasons["folder.png"]
    # Probabilities stay aligned with the inputs: a row of NaN for each one left out.
    probs = predictor.predict_proba(inputs, on_skip=[].append)
    assert probs.shape == (len(inputs), len(predictor.classes))
    assert np.isnan(probs[1:-1]).all() and np.isfinite(probs[[0, -1]]).all()
    # Nobody asked: a warning per input left out.
    with pytest.warns(UserWarning, match="bomb.png: decompression bomb"):
        assert len(predictor.predict([unreadable["bomb.png"], first])) == 1


def test_predict_command_names_each_image_it_skips_and_exits_3(
    linear_run: finetune.FitResult, unreadable: dict[str, Path], fashion: Path
) -> None:
    """The good images are all predicted, in every format; the bad ones are named on stderr
    with the reason, and the exit status says that some are missing."""
    first, last = sorted((fashion / "test" / "coat").glob("*.png"))[:2]
    args = [str(linear_run.dir), str(first), *map(str, unreadable.values()), str(last)]
    table = invoke("predict", *args)
    assert table.exit_code == SKIPPED_EXIT, table.output
    assert [line.split("\t")[0] for line in table.stdout.splitlines()] == [str(first), str(last)]
    for name, path in unreadable.items():
        assert f"skipped {path}: " in table.stderr, name
    assert f"{len(unreadable)} image files could not be read" in table.stderr
    listed = invoke("predict", *args, "--format", "json")
    assert listed.exit_code == SKIPPED_EXIT and "Traceback" not in listed.output
    assert [p["path"] for p in json.loads(listed.stdout)] == [str(first), str(last)]


def test_check_and_augment_preview_name_unreadable_images_and_exit_3(
    fashion: Path, tmp_path: Path
) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "sneaker"], 6)
    bad = unreadable_images(data / "bag", fashion)
    (data / "bag" / "notes.txt").write_text("not an image by name: no image to read")
    checked = invoke("check", str(data))
    assert checked.exit_code == SKIPPED_EXIT, checked.output
    assert f"{len(bad)} image files could not be read" in checked.stderr
    preview = tmp_path / "preview.png"
    shown = invoke("augment-preview", str(data), "-o", str(preview), "--image-size", "32")
    assert shown.exit_code == SKIPPED_EXIT, shown.output
    assert shown.stdout.strip() == str(preview) and Image.open(preview).size[0] > 0
    for path in bad.values():
        assert f"skipped {path}: " in shown.stderr
    # A folder with nothing wrong exits 0.
    clean = copy_classes(tmp_path / "clean", ["bag", "sneaker"], 6)
    assert invoke("check", str(clean)).exit_code == 0


def test_the_table_prints_one_line_per_image_whatever_its_name(
    linear_run: finetune.FitResult, tmp_path: Path, fashion: Path
) -> None:
    """Names with a tab or a newline are escaped (Python repr) in the table, so one image is
    one line; printable names, accents included, are shown as they are; JSON and CSV keep
    every name exact."""
    source = next((fashion / "test" / "coat").glob("*.png"))
    odd = tmp_path / "tab\tand\nnewline.png"
    plain = tmp_path / "manteau d'été.png"
    for path in (odd, plain):
        shutil.copy(source, path)
    table = invoke("predict", str(linear_run.dir), str(odd), str(plain))
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(repr(str(odd)) + "\t") and lines[1].startswith(f"{plain}\t")
    listed = invoke("predict", str(linear_run.dir), str(odd), str(plain), "--format", "json")
    assert [p["path"] for p in json.loads(listed.stdout)] == [str(odd), str(plain)]
    rows = invoke("predict", str(linear_run.dir), str(odd), str(plain), "--format", "csv")
    assert [r[0] for r in csv.reader(io.StringIO(rows.stdout))][1:] == [str(odd), str(plain)]


def test_tta_averages_the_softmax_of_the_views(predictor: finetune.Predictor, fashion: Path):
    paths = sorted((fashion / "test" / "sandal").glob("*.png"))[:6]
    # 76 x 73: the short side is already the evaluation resize (64 / 0.875), and the centre
    # crop leaves 6 columns on each side, so cropping and mirroring commute exactly.
    arrays = [np.array(Image.open(p).convert("RGB").resize((76, 73))) for p in paths]
    plain = predictor.predict_proba(arrays, tta="none")
    mirrored = predictor.predict_proba([a[:, ::-1].copy() for a in arrays], tta="none")
    flip = predictor.predict_proba(arrays, tta="flip")
    assert flip == pytest.approx((plain + mirrored) / 2, abs=1e-5)
    # 10 crops: the average of the ten views, each classified on its own.
    views = predictor.views("10crop")
    crops = [np.ascontiguousarray(c) for c in views.crops(arrays[0])]
    model = predictor.model
    with torch.inference_mode():
        each = model(torch.stack([views.to_tensor(c) for c in crops])).softmax(1).numpy()
    ten = predictor.predict_proba(arrays[:1], tta="10crop")[0]
    assert ten == pytest.approx(each.mean(0), abs=1e-5)
    assert not np.allclose(ten, plain[0], atol=1e-3)  # the views really differ
    # batch_size counts images, whatever the number of views.
    assert predictor.predict_proba(paths, batch_size=4, tta="10crop") == pytest.approx(
        predictor.predict_proba(paths, batch_size=32, tta="10crop"), abs=1e-5
    )
    labels = [p.label for p in predictor.predict(paths, tta="10crop")]
    assert len(labels) == 6


# --- ensembles and --checkpoint ---------------------------------------------------------------

THREE = ("bag", "sneaker", "trouser")  # the classes of the tiny_runs fixture


def _test_images(fashion: Path, per_class: int = 3) -> list[Path]:
    return [p for c in THREE for p in sorted((fashion / "test" / c).glob("*.png"))[:per_class]]


def _mean_of(members: list[finetune.Predictor], images: list, **kwargs) -> np.ndarray:
    return np.mean([m.predict_proba(images, **kwargs) for m in members], axis=0)


def test_ensemble_averages_its_members_decoding_each_image_once(
    tiny_runs: list[Path], tmp_path: Path, fashion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = finetune.export(tiny_runs[1], out=tmp_path / "bundle")  # an exported member
    ensemble = finetune.load_ensemble([tiny_runs[0], bundle, tiny_runs[2]], device="cpu")
    assert isinstance(ensemble, finetune.Ensemble) and ensemble.classes == THREE
    members = list(ensemble.members)
    files = [str(tiny_runs[0] / "best.pt"), str(bundle), str(tiny_runs[2] / "best.pt")]
    assert [m.source for m in members] == files
    assert [m.preprocessing.input_size for m in members] == [32, 32, 48]
    images = _test_images(fashion)

    decoded = []
    real_load_image = finetune.inference.inputs.load_image
    monkeypatch.setattr(
        finetune.inference.inputs, "load_image", lambda p: decoded.append(p) or real_load_image(p)
    )
    probs = ensemble.predict_proba(images, batch_size=4)
    assert decoded == images  # once per image, whatever the number of members
    monkeypatch.undo()

    expected = _mean_of(members, images)
    assert probs == pytest.approx(expected, abs=1e-6)
    assert probs.sum(1) == pytest.approx(1.0, abs=1e-5)
    assert all(not np.allclose(probs, m.predict_proba(images), atol=1e-4) for m in members)
    flip = ensemble.predict_proba(images, tta="flip")  # tta applies to every member
    assert flip == pytest.approx(_mean_of(members, images, tta="flip"), abs=1e-6)
    assert not np.allclose(flip, probs, atol=1e-4)
    predictions = ensemble.predict(images, top_k=3)
    assert [p.label for p in predictions] == [THREE[i] for i in expected.argmax(1)]
    assert [p.probability for p in predictions] == pytest.approx(expected.max(1), abs=1e-6)

    # evaluate() measures the averaged probabilities and records the members.
    folder = copy_classes(tmp_path / "test", list(THREE), 3, split="test")
    result = finetune.inference.evaluate.evaluate(ensemble, folder)
    truth = np.array([THREE.index(Path(p).parent.name) for p in result.paths])
    assert result.accuracy == pytest.approx(np.mean(expected.argmax(1) == truth))
    model = result.to_dict()["model"]
    assert [m["file"] for m in model["ensemble"]] == files
    assert model["checkpoint"] == "best"


def _reordered(run: Path, out: Path, classes: tuple[str, ...]) -> Path:
    """A copy of run's best.pt whose classes (and head rows) are permuted and/or renamed."""
    from finetune.run.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run)
    order = [state["classes"].index(c) if c in state["classes"] else i
             for i, c in enumerate(classes)]  # fmt: skip
    weights = dict(state["state_dict"])
    weights["head.weight"] = weights["head.weight"][order]
    weights["head.bias"] = weights["head.bias"][order]
    save_checkpoint(out, {**state, "classes": list(classes), "state_dict": weights})
    return out


def test_ensemble_maps_reordered_classes_by_name_and_refuses_other_classes(
    tiny_runs: list[Path], tmp_path: Path, fashion: Path
) -> None:
    images = _test_images(fashion, per_class=2)
    backwards = _reordered(tiny_runs[0], tmp_path / "backwards.pt", THREE[::-1])
    pants = _reordered(tiny_runs[0], tmp_path / "pants.pt", ("bag", "pants", "sneaker"))
    model, reversed_model, other, odd = (
        finetune.load(m, device="cpu") for m in (tiny_runs[0], backwards, tiny_runs[1], pants)
    )
    original = model.predict_proba(images)
    assert reversed_model.classes == THREE[::-1]
    assert reversed_model.predict_proba(images)[:, ::-1] == pytest.approx(original, abs=1e-6)
    # The same model twice, columns in different orders: the ensemble is the model itself.
    same = finetune.Ensemble([model, reversed_model])
    assert same.classes == THREE
    assert same.predict_proba(images) == pytest.approx(original, abs=1e-6)
    # The first member's order wins.
    flipped = finetune.Ensemble([reversed_model, other])
    assert flipped.classes == THREE[::-1]
    expected = (original + other.predict_proba(images))[:, ::-1] / 2
    assert flipped.predict_proba(images) == pytest.approx(expected, abs=1e-6)

    with pytest.raises(CheckpointError) as raised:
        finetune.Ensemble([other, odd])
    message = str(raised.value)
    assert str(tiny_runs[1] / "best.pt") in message and str(pants) in message
    assert "only the first has trouser" in message and "only the second has pants" in message


def _with_custom_head(run: Path, out: Path) -> Path:
    """run's best.pt as if trained with head=nn.Sequential(nn.Linear(...))."""
    from finetune.run.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run)
    weights = {
        ("head.0." + k[5:] if k.startswith("head.") else k): v
        for k, v in state["state_dict"].items()
    }
    model = {**state["model"], "head": "custom:Sequential"}
    save_checkpoint(out, {**state, "model": model, "state_dict": weights})
    return out


def test_every_member_gets_its_own_copy_of_a_custom_head(
    tiny_runs: list[Path], tmp_path: Path, fashion: Path
) -> None:
    files = [_with_custom_head(r, tmp_path / f"{i}.pt") for i, r in enumerate(tiny_runs[:2])]
    head = torch.nn.Sequential(torch.nn.Linear(1280, 3))
    ensemble = finetune.load_ensemble(files, head=head, device="cpu")
    images = _test_images(fashion, per_class=1)
    singles = [finetune.load(r, device="cpu") for r in tiny_runs[:2]]  # the same weights
    assert ensemble.predict_proba(images) == pytest.approx(_mean_of(singles, images), abs=1e-6)


def test_snapshots_checkpoint_averages_every_snapshot_in_numeric_order(
    tiny_runs: list[Path], tmp_path: Path, fashion: Path
) -> None:
    run = tmp_path / "restarts"
    run.mkdir()
    for name, source in [("best.pt", 0), ("last.pt", 0), ("snapshot-1.pt", 0),
                         ("snapshot-2.pt", 1), ("snapshot-10.pt", 2)]:  # fmt: skip
        shutil.copy(tiny_runs[source] / "best.pt", run / name)
    ensemble = finetune.load(run, checkpoint="snapshots", device="cpu")
    assert isinstance(ensemble, finetune.Ensemble)
    files = [run / f"snapshot-{k}.pt" for k in (1, 2, 10)]  # 10 after 2, not after 1
    assert [m.source for m in ensemble.members] == list(map(str, files))
    images = _test_images(fashion, per_class=2)
    singles = [finetune.load(f, device="cpu") for f in files]
    assert ensemble.predict_proba(images) == pytest.approx(_mean_of(singles, images), abs=1e-6)
    described = ensemble.describe()
    assert described["source"] == str(run) and described["checkpoint"] == "snapshots"

    with pytest.raises(CheckpointError, match="--schedule restarts") as raised:
        finetune.load_ensemble([tiny_runs[1], run], checkpoint="snapshots")
    assert f"{tiny_runs[1]} holds no snapshot-K.pt files" in str(raised.value)


def test_ema_checkpoint_loads_ema_pt_and_missing_choices_say_how_to_get_them(
    tiny_runs: list[Path], tmp_path: Path, fashion: Path
) -> None:
    run = tmp_path / "with-ema"
    shutil.copytree(tiny_runs[0], run)
    shutil.copy(tiny_runs[1] / "best.pt", run / "ema.pt")  # other weights than best.pt
    images = _test_images(fashion, per_class=2)
    ema = finetune.load(run, checkpoint="ema", device="cpu")
    assert ema.source == str(run / "ema.pt") and ema.checkpoint == "ema"
    expected = finetune.load(tiny_runs[1] / "best.pt", device="cpu").predict_proba(images)
    assert ema.predict_proba(images) == pytest.approx(expected, abs=1e-6)
    best = finetune.load(run, device="cpu").predict_proba(images)
    assert not np.allclose(best, expected, atol=1e-4)
    assert finetune.load(run, checkpoint="last").source == str(run / "last.pt")

    with pytest.raises(CheckpointError, match="--ema") as raised:
        finetune.load(tiny_runs[0], checkpoint="ema")
    assert f"{tiny_runs[0]} holds no ema.pt" in str(raised.value)
    with pytest.raises(ConfigError, match="best, last, ema, snapshots"):
        finetune.load(run, checkpoint="newest")
    with pytest.raises(ConfigError, match="Give the run directory"):
        finetune.load(run / "best.pt", checkpoint="ema")


def test_leading_arguments_that_are_models(tiny_runs: list[Path], tmp_path: Path, fashion: Path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    images = [fashion / "test" / "bag", next((fashion / "test" / "bag").glob("*.png"))]
    models = [tiny_runs[0], tiny_runs[1] / "last.pt", onnx]
    assert all(map(is_model_path, models))
    assert not any(map(is_model_path, [*images, tmp_path / "missing.pt", fashion / "test"]))
    assert leading_models([*models, *images]) == (models, images)
    assert leading_models(images) == ([], images)
    with pytest.raises(DataError, match=f"{onnx} is a model but comes after the image"):
        leading_models([tiny_runs[0], *images, onnx])


# --- a run folder's checkpoints are weights, never programs ----------------------------------


class _WritesAFile(torch.nn.Module):
    """A TorchScript program in place of a checkpoint: running its forward creates ``marker``
    (``torch.from_file(shared=True)`` opens it for writing), proof that its code ran."""

    def __init__(self, marker: str, classes: int) -> None:
        super().__init__()
        self.marker = marker
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.marker, shared=True, size=4)
        return x.mean((2, 3))[:, : self.classes] + written.sum() * 0


def _finetune_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command, in a fresh process."""
    command = [sys.executable, "-m", "finetune", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_a_torchscript_checkpoint_in_a_run_folder_is_refused_never_run(
    tiny_runs: list[Path], tmp_path: Path, fashion: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_runs[0], run)
    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript
        program = torch.jit.script(_WritesAFile(str(marker), len(THREE)))
        for name in ("best.pt", "last.pt", "ema.pt", "snapshot-1.pt"):
            torch.jit.save(program, str(run / name))
    images = _test_images(fashion, per_class=1)
    folder = copy_classes(tmp_path / "test", list(THREE), 1, split="test")

    def refused(call: Callable[[], object]) -> None:
        with pytest.raises(CheckpointError, match="is a TorchScript archive") as raised:
            call()
        assert "never runs code" in str(raised.value)

    for checkpoint in ("best", "last", "ema", "snapshots"):
        refused(lambda c=checkpoint: finetune.load(run, checkpoint=c, device="cpu"))
    refused(lambda: finetune.load(run / "best.pt", device="cpu"))  # named, but a run's name
    refused(lambda: finetune.load_ensemble([tiny_runs[1], run], device="cpu"))
    refused(lambda: finetune.export(run, format="onnx", out=tmp_path / "model.onnx"))
    for name in ("best.pt", "last.pt", "ema.pt", "snapshot-1.pt"):  # the reader every path uses
        refused(lambda n=name: load_checkpoint(run / n))
    # report writes the page from the run's records and says why best.pt is not evaluated; torch
    # never gets the archive (it would warn that it is "dispatching to torch.jit.load").
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune.report(run, device="cpu")
    said = [str(w.message) for w in caught]
    assert any("best.pt is a TorchScript archive" in m for m in said), said
    assert not any("jit.load" in m for m in said), said
    for args in (["predict", str(run), str(images[0])], ["evaluate", str(run), str(folder)]):
        result = _finetune_cli(*args)
        assert result.returncode != 0 and "is a TorchScript archive" in result.stderr, args
        assert "Traceback" not in result.stderr, result.stderr
    assert not marker.exists()

    # The same program under a name of its own, given as the model, is an export the user
    # chose to run (here it lacks finetune's description, so it is refused for that reason).
    shutil.copy(run / "best.pt", tmp_path / "program.pt")
    with pytest.raises(CheckpointError, match="without finetune's description"):
        finetune.load(tmp_path / "program.pt", device="cpu")
    assert not marker.exists()
