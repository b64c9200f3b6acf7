"""Frozen features: one pass over the images, every stage pooled, cached in memory and on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.data import features
from finetune.data.features import HEAD, extract_features, probe_points
from finetune.data.scan import scan_folder
from finetune.data.transforms import Preprocessing
from finetune.model.backbone import create_backbone


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(folder))
    features._MEMORY.clear()
    return folder / "features"


def test_features_match_the_backbone_and_are_cached_by_content(
    small_folder: Path, cache: Path
) -> None:
    backbone = create_backbone("tf_efficientnet_lite0")
    pre = Preprocessing.from_model(backbone, 32)
    samples = scan_folder(small_folder).train[:10]
    points = probe_points(backbone)
    assert points == ["stage0", "stage1", "stage2", "stage3", "stage4", HEAD]
    cpu = torch.device("cpu")
    first, hit = extract_features(backbone, samples, pre, points, device=cpu, progress=False)
    assert not hit and first[HEAD].shape == (10, 1280) and first["stage2"].shape == (10, 40)
    assert list(first["label"]) == [s.label for s in samples]

    # The head point is exactly the backbone's pooled features of the eval transform.
    from finetune.data.loaders import ImageDataset
    from finetune.data.transforms import eval_transform

    image = ImageDataset(samples[:1], eval_transform(pre))[0][0][None]
    with torch.inference_mode():
        direct = backbone.eval()(image)
    np.testing.assert_allclose(first[HEAD][0], direct[0].numpy(), rtol=1e-4, atol=1e-5)

    again, hit = extract_features(backbone, samples, pre, points, device=cpu, progress=False)
    assert hit and again is first  # memory
    features._MEMORY.clear()
    from_disk, hit = extract_features(backbone, samples, pre, points, device=cpu, progress=False)
    assert hit and len(list(cache.glob("*.safetensors"))) == 1
    np.testing.assert_array_equal(from_disk["stage2"], first["stage2"])

    os.utime(samples[0].path, ns=(0, 0))  # a changed file is a different dataset
    _, hit = extract_features(backbone, samples, pre, points, device=cpu, progress=False)
    assert not hit
    _, hit = extract_features(
        backbone, samples, Preprocessing.from_model(backbone, 64), points, device=cpu,
        progress=False,
    )  # fmt: skip
    assert not hit  # other preprocessing, other features


def test_a_damaged_cache_file_is_recomputed(small_folder: Path, cache: Path) -> None:
    backbone = create_backbone("tf_efficientnet_lite0")
    pre = Preprocessing.from_model(backbone, 32)
    samples = scan_folder(small_folder).train[:4]
    cpu = torch.device("cpu")
    good, _ = extract_features(backbone, samples, pre, [HEAD], device=cpu, progress=False)
    features._MEMORY.clear()
    (file,) = cache.glob("*.safetensors")
    file.write_bytes(b"not a safetensors file")
    again, hit = extract_features(backbone, samples, pre, [HEAD], device=cpu, progress=False)
    assert not hit
    np.testing.assert_allclose(again[HEAD], good[HEAD], rtol=1e-5)


def test_a_cache_file_that_does_not_hold_the_features_asked_for_is_recomputed(
    small_folder: Path, cache: Path
) -> None:
    from safetensors.numpy import save_file

    backbone = create_backbone("tf_efficientnet_lite0")
    pre = Preprocessing.from_model(backbone, 32)
    samples = scan_folder(small_folder).train[:4]
    cpu = torch.device("cpu")
    good, _ = extract_features(backbone, samples, pre, [HEAD], device=cpu, progress=False)
    (file,) = cache.glob("*.safetensors")
    labels = good["label"]
    wrong = [
        {"label": labels},  # the point is missing
        {HEAD: good[HEAD]},  # the labels are missing
        {HEAD: good[HEAD][:2], "label": labels},  # rows do not match
        {HEAD: good[HEAD][0], "label": labels},  # 1-D
        {HEAD: good[HEAD].astype(np.int32), "label": labels},
        {HEAD: np.zeros((9, 1280), np.float32), "label": np.zeros(9, np.int64)},  # > samples
    ]
    for content in wrong:
        features._MEMORY.clear()
        save_file(content, str(file))
        again, hit = extract_features(backbone, samples, pre, [HEAD], device=cpu, progress=False)
        assert not hit
        np.testing.assert_allclose(again[HEAD], good[HEAD], rtol=1e-5)


def test_a_file_rewritten_with_its_mtime_restored_is_not_read_from_the_cache(
    small_folder: Path, cache: Path
) -> None:
    backbone = create_backbone("tf_efficientnet_lite0")
    pre = Preprocessing.from_model(backbone, 32)
    samples = scan_folder(small_folder).train[:4]
    cpu = torch.device("cpu")
    extract_features(backbone, samples, pre, [HEAD], device=cpu, progress=False)
    features._MEMORY.clear()
    victim = samples[0].path
    info = victim.stat()
    victim.write_bytes(samples[1].path.read_bytes()[: info.st_size].ljust(info.st_size, b"\0"))
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))
    _, hit = extract_features(backbone, samples, pre, [HEAD], device=cpu, progress=False)
    assert not hit


def test_a_file_deleted_after_the_scan_is_left_out_with_a_warning(
    small_folder: Path, cache: Path
) -> None:
    backbone = create_backbone("tf_efficientnet_lite0")
    pre = Preprocessing.from_model(backbone, 32)
    samples = scan_folder(small_folder).train[:4]
    samples[0].path.unlink()
    with pytest.warns(UserWarning, match=f"{samples[0].path.name}.*gone since the scan"):
        out, _ = extract_features(
            backbone, samples, pre, [HEAD], device=torch.device("cpu"), progress=False
        )
    assert out[HEAD].shape[0] == 3 and list(out["label"]) == [s.label for s in samples[1:]]


def test_the_channels_last_pass_gives_the_same_features(small_folder: Path, cache: Path) -> None:
    backbone = create_backbone("tf_efficientnet_lite0")
    pre = Preprocessing.from_model(backbone, 32)
    samples = scan_folder(small_folder).train[:8]
    points = ["stage2", HEAD]
    cpu = torch.device("cpu")
    plain, _ = extract_features(
        backbone, samples, pre, points, device=cpu, progress=False, cache=False
    )
    backbone.to(memory_format=torch.channels_last)
    nhwc, _ = extract_features(
        backbone, samples, pre, points, device=cpu, progress=False, cache=False,
        channels_last=True,
    )  # fmt: skip
    for point in points:
        np.testing.assert_allclose(nhwc[point], plain[point], rtol=1e-4, atol=1e-4)
