"""bench/gpu_check.sh cannot rot between GPU runs: its dry run executes every step here, the GPU
parts on the CPU (collect-only CUDA tests, the sanitizer case and the benchmark harness on CPU
tensors), from a scratch folder, so a step that cannot import the package or whose commands broke
fails this test."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("FISHER_EXT_DISABLE_EXT", "0") not in ("", "0"),
                    reason="the script is checked once, in the compiled run")
def test_dry_run_executes_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    env.pop("PYTHONPATH", None)  # the script must find the package itself
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert done.returncode == 0, report + done.stdout[-2000:] + done.stderr[-2000:]
    assert "**Dry run**" in report
    for step in ("build", "pytest -k cuda", "compute-sanitizer memcheck", "compute-sanitizer racecheck",
                 "compute-sanitizer initcheck", "compute-sanitizer synccheck", "bench/ops_gpu.py", "bench/penalty.py"):
        assert f"| {step} | ok (dry run: GPU parts on the CPU) |" in report, step
    assert report.count("sanitize case done on cpu") == 0  # logs stay in their files
    assert (tmp_path / "out" / "sanitizer.log").read_text().count("sanitize case done on cpu") == 4
    assert (tmp_path / "out" / "ops_gpu.md").is_file()
    assert (tmp_path / "out" / "penalty.md").is_file()
