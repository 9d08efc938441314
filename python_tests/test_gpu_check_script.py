"""bench/gpu_check.sh cannot rot between GPU runs: its dry run executes every step here, the GPU
parts on the CPU (collect-only CUDA tests, the sanitizer case and the benchmark harness on CPU
tensors), from a scratch folder, so a step that cannot import the package or whose commands broke
fails this test."""

from __future__ import annotations

import os
import pathlib
import subprocess
import tarfile

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
                 "compute-sanitizer initcheck", "compute-sanitizer synccheck", "bench/ops_gpu.py", "bench/penalty.py",
                 "bench/programs_gpu.py", "ncu C2", "ncu C5"):
        assert f"| {step} | ok (dry run: GPU parts on the CPU) |" in report, step
    assert report.count("sanitize case done on cpu") == 0  # logs stay in their files
    out = tmp_path / "out"
    with tarfile.open(out / "logs.tgz") as logs:  # the logs in one file: a GPU machine returns 8 at most
        sanitizer = logs.extractfile("logs/sanitizer.log").read().decode()
        assert {"logs/build.log", "logs/tests.log", "logs/bench.log", "logs/ncu.log"} <= set(logs.getnames())
    assert sanitizer.count("sanitize case done on cpu") == 4
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.md", "logs.tgz", "ops_gpu.json", "ops_gpu.md",
                                                      "penalty.json", "penalty.md", "programs_gpu.md"]
