"""benchmarks/gpu_check.py, the GPU acceptance check, keeps working where no GPU is: with
``--cpu-only`` its rows run on the CPU, each path it cannot run here is a row that says why, and
a failure is a row with its error, never a traceback that ends the check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check


def test_cpu_only_runs_the_rows_and_writes_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))  # restored afterwards
    rows_asked = ["predict", "export safetensors", "fp16", "compile", "NCCL"]
    code = gpu_check.main(["--cpu-only", "--only", *rows_asked, "--out", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "rows.json").read_text())
    rows = {row["path"]: row for row in record["rows"]}
    assert code == 0, [row for row in rows.values() if row["status"] == "FAIL"]
    assert record["ceiling"] > 0
    ran = ["ceiling: eager fp32 step", "fit finetune-all (defaults)", "predict"]
    ran += ["predict --tta 10crop", "export safetensors + load"]
    for path in ran:
        assert rows[path]["status"] == "ok", rows[path]
        assert rows[path]["rate"] > 0
    assert "val acc" in rows["fit finetune-all (defaults)"]["note"]
    assert "max |p - checkpoint's p|" in rows["export safetensors + load"]["note"]
    # What cannot run here is listed as such, with the reason.
    assert rows["fit --compile"]["status"] == "skipped"
    assert rows["torchrun NCCL"]["status"] == "skipped"
    assert "2+ GPUs" in rows["torchrun NCCL"]["note"]
    assert rows["fit --precision fp16"]["status"] == "skipped"  # emulated on CPUs: slow
    assert "emulate float16" in rows["fit --precision fp16"]["note"]
    # Rows left out by --only are not in the table; the table file lists the rows that ran.
    assert "fit linear" not in rows
    table = (tmp_path / "out" / "table.txt").read_text()
    assert all(path in table for path in rows)


def test_a_failing_row_is_reported_with_its_error_and_the_check_fails() -> None:
    def broken() -> tuple[float, str]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    row = gpu_check.run_row("fit --compile", broken)
    assert row.status == "FAIL" and row.rate is None
    assert row.note.startswith("RuntimeError: CUDA error: an illegal memory access")
    assert "more" not in row.note  # the first line, and where it was raised
    assert "test_gpu_check.py" in row.note
    text = gpu_check.table([row], ceiling=100.0)
    assert "FAIL" in text and "illegal memory access" in text
