"""ONNX names for torch parameters and graph values.

The ONNX IR asks for C90 identifiers, so ``layer1.0.conv1.weight`` becomes
``layer1_0_conv1_weight``. The mapping is a pure function of the ordered name list, so
anyone holding the torch model can rebuild it (``onnx_names``) and map ``weights.bin``
back onto a state_dict without a side file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

INPUT, LABEL = "x", "y"
OUTPUTS = ("loss", "correct")
RESERVED = frozenset({INPUT, LABEL, *OUTPUTS})
BATCH = "batch"  # the dynamic batch dimension's name in every exported graph

_BAD = re.compile(r"[^A-Za-z0-9_]")


def sanitize(name: str) -> str:
    """A C identifier close to ``name``: other characters become ``_``, no leading digit."""
    out = _BAD.sub("_", name) or "p"
    return f"p_{out}" if out[0].isdigit() else out


def onnx_names(names: Sequence[str], taken: Iterable[str] = ()) -> list[str]:
    """Sanitized, unique names for ``names`` in order, avoiding ``taken`` and reserved ones.

    A clash (``a.b`` and ``a_b``) gets a numbered suffix on the later name, so the
    result depends only on the order of ``names``.
    """
    used = set(taken) | RESERVED
    out = []
    for name in names:
        base = candidate = sanitize(name)
        n = 2
        while candidate in used:
            candidate, n = f"{base}_{n}", n + 1
        used.add(candidate)
        out.append(candidate)
    return out
