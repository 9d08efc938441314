"""The instruction mix of the CUDA kernels' loops, from their machine code (no GPU needed).

    python tools/sass_mix.py OBJECT_OR_SO [--kernel SUBSTRING] [--cuobjdump PATH]

Disassembles with cuobjdump (the CUDA toolkit's, or the one Triton's package carries) and, per
kernel whose mangled name contains SUBSTRING (default: program_kernel), prints the static
instruction counts of the whole kernel and of each loop (a backward branch and its body): FMA and
tensor-core instructions against the index arithmetic, loads, stores and calls (a CALL in a loop
is a subroutine, e.g. a 64-bit division). Static counts: a loop's count is one pass of its body,
both sides of its branches included.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

SHOWN = ("FFMA", "DFMA", "HMMA", "LDS", "LDG", "STS", "IMAD", "IADD3", "ISETP", "MUFU", "CALL", "BAR")


def find_cuobjdump(given: str | None) -> str:
    candidates = [given, shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    candidates += glob.glob("/usr/local/cuda*/bin/cuobjdump")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("sass_mix.py: no cuobjdump found (PATH, $CUDA_HOME/bin, Triton's package); pass --cuobjdump")


def opcode(text: str) -> str:
    words = text.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def kernels(sass: str, key: str):
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name = body.split("\n", 1)[0].strip()
        if key not in name:
            continue
        code = [(int(m.group(1), 16), m.group(2).strip())
                for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", body)]
        yield name, code


def loops(code: list):
    at = {addr: i for i, (addr, _) in enumerate(code)}
    for i, (addr, text) in enumerate(code):
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in at:
            yield code[at[int(target.group(1), 16)]:i + 1]


def line(label: str, code: list) -> str:
    c = collections.Counter(opcode(t) for _, t in code)
    return f"  {label}: {len(code)} instructions; " + " ".join(f"{k} {c[k]}" for k in SHOWN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("--kernel", default="program_kernel")
    parser.add_argument("--cuobjdump")
    args = parser.parse_args()
    sass = subprocess.run([find_cuobjdump(args.cuobjdump), "-sass", args.binary], capture_output=True, text=True,
                          check=True).stdout
    found = False
    for name, code in kernels(sass, args.kernel):
        found = True
        print(name)
        print(line("whole kernel", code))
        for k, body in enumerate(loops(code)):
            print(line(f"loop {k}", body))
    if not found:
        sys.exit(f"sass_mix.py: no kernel matching {args.kernel!r} in {args.binary}")


if __name__ == "__main__":
    main()
