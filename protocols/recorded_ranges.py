"""Input ranges of each nonlinearity recorded in real MNIST diffusion UNets.

Written by ``tools/record_activation_ranges.py``: ``activation_ranges.json``
(CipherDM's UNet2DModel shape, DDPM) and ``activation_ranges_dpdm_mnist.json``
(the shipped DP model, EDM). :func:`load` merges them (widest min / max), so the
protocol tests and the benchmark cover every recorded model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

__all__ = ["FILES", "load"]

FILES = tuple(Path(__file__).with_name(n) for n in
              ("activation_ranges.json", "activation_ranges_dpdm_mnist.json"))


def load() -> Dict[str, dict]:
    """{kind: {"min", "max", "sources"}} over the recorded files; {} when none is present."""
    out: Dict[str, dict] = {}
    for path in FILES:
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for kind, s in data.items():
            if not isinstance(s, dict) or "min" not in s:
                continue
            cur = out.setdefault(kind, {"min": s["min"], "max": s["max"], "sources": []})
            cur["min"], cur["max"] = min(cur["min"], s["min"]), max(cur["max"], s["max"])
            cur["sources"].append(path.name)
        if "softmax_row_length" in data:
            out.setdefault("softmax_row_length", {"max": 0})
            out["softmax_row_length"]["max"] = max(out["softmax_row_length"]["max"],
                                                   data["softmax_row_length"])
    return out
