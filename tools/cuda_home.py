"""Finds the CUDA toolkit folder for setup.py and CMake (python tools/cuda_home.py prints it).

`which nvcc` may find a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the toolkit's
nvcc), in which case torch and CMake would look for headers under /usr/local. nvcc's dry
run of a compile prints TOP=<toolkit>/bin/.., which names the real toolkit.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the folder of the nvcc that runs, else /usr/local/cuda*; None if none."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "fisher_ext_probe.cu", "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    top = line.split("TOP=", 1)[1].strip().strip('"')
                    if os.path.exists(os.path.join(top, "bin", "nvcc")):
                        return os.path.realpath(top)
        except (OSError, subprocess.SubprocessError):
            pass
    for cand in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


if __name__ == "__main__":
    print(find_cuda_home() or "")
