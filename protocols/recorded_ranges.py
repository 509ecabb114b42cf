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

__all__ = ["FILES", "load", "calibrated_settings"]

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


def calibrated_settings(margin: float = 4.0, eps: float = 1e-5) -> Dict[str, object]:
    """Protocol knobs (for ``protocols.config.use(**...)``) from the recorded ranges, widened by
    ``margin`` (a factor on each bound): the exp clip comparison is skipped when the recorded
    softmax inputs x - max, times ``margin``, stay where exp needs no clip
    (``exp_input_min``), and the rsqrt magnitude comparisons of GroupNorm cover only
    [variance_min / margin^2, variance_max * margin^2] in powers of two (``magnitude_lo`` /
    ``magnitude_hi``; below it the guess saturates at 2^lo and the result is too small, above it
    Newton's steps start from a too large guess and degrade gracefully; see
    :mod:`cipherdm_torch.protocols.reciprocal`). {} when nothing was recorded.
    Only for models like the recorded ones: an unknown model keeps the defaults.
    """
    import math

    ranges = load()
    out: Dict[str, object] = {}
    shifted = ranges.get("softmax_shifted")
    if shifted is not None:
        out["exp_input_min"] = float(shifted["min"]) * margin
    var = ranges.get("group_norm_variance")
    if var is not None:
        lo = max(float(var["min"]) + eps, 1e-12) / margin ** 2
        hi = (float(var["max"]) + eps) * margin ** 2
        out["magnitude_lo"] = math.floor(math.log2(lo))
        out["magnitude_hi"] = math.ceil(math.log2(hi))
    return out
