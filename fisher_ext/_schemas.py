"""Schemas of the ``torch.ops.fisher_ext`` operators, read from ``schemas.def``.

That file is the one place they are written: the C++ extension compiles it in
(``csrc/schemas.cpp``), and the pure-PyTorch path declares the ops from what is
read here when ``fisher_ext._C`` is missing.
"""

from __future__ import annotations

import re
from importlib import resources

_LINE = re.compile(r'FISHER_EXT_SCHEMA\("(?P<schema>(?P<name>\w+)\(.*\) -> .*)"\)')


def _read() -> dict[str, str]:
    text = resources.files(__package__).joinpath("schemas.def").read_text()
    schemas = {}
    for line in map(str.strip, text.splitlines()):
        if not line or line.startswith("//"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise RuntimeError(f"fisher_ext/schemas.def: expected FISHER_EXT_SCHEMA(\"...\"), got {line!r}")
        schemas[match["name"]] = match["schema"].replace('\\"', '"')  # a C++ string literal's \" is "
    return schemas


SCHEMAS = _read()

METHODS = ("auto", "ghost", "materialize")
PRECISIONS = ("full", "bf16")  # the norm ops' `precision` (docs/precision.md)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
