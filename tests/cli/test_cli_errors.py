"""Bad input gets one clear error line, exit 2, no traceback, and nothing on disk changes.

The whole table runs through ``cipherdm_torch.cli.main`` (the console script's entry point) in
this process, with the party launcher replaced by a trap: every check runs before any party
would start. A few rows also run through the real ``.venv/bin/cipherdm`` console script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cipherdm_torch import cli
from cipherdm_torch.errors import UserError, run_main
from cipherdm_torch.mpc.runtime import PartyError
from cipherdm_torch.pipelines.job import embedded_model_dir

SAFETENSORS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A work folder with the bad inputs of the table."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "empty-model").mkdir()
    (root / "a-file").write_text("keep me\n")
    src = embedded_model_dir()
    for name in ("garbage-weights", "truncated-weights", "wrong-config"):
        shutil.copytree(src, root / name)
    weights = root / "garbage-weights" / "backbone_ema" / SAFETENSORS
    weights.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    weights = root / "truncated-weights" / "backbone_ema" / SAFETENSORS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg_path = root / "wrong-config" / "backbone_ema" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_channels"] = 16
    cfg_path.write_text(json.dumps(cfg))
    (root / "empty.pt").write_bytes(b"")
    (root / "garbage.pt").write_bytes(b"this is not a torch file")
    torch.save({"images": torch.zeros(0, 1, 28, 28), "labels": torch.zeros(0, dtype=torch.long)},
               root / "zero.pt")
    torch.save({"images": torch.full((4, 1, 28, 28), float("nan")),
                "labels": torch.zeros(4, dtype=torch.long)}, root / "nan.pt")
    run = root / "run"  # a run folder: its config and ledger fix the privacy options
    run.mkdir()
    from cipherdm_torch.training.trainer import TrainConfig

    (run / "train_config.json").write_text(json.dumps(
        {**TrainConfig(output_dir=str(run), noise_multiplier=1.5).to_dict()}))
    (run / "ledger.json").write_text('{"version": 1}\n')
    return root


# (argv, a word the error line must contain); {w} is the work folder
CASES = [
    # sample / demo: checked before any party starts
    ("sample --model {w}/missing", "does not exist"),
    ("sample --model {w}/empty-model", "neither a DPDM checkpoint"),
    ("sample --out {w}/a-file", "is a file"),
    ("sample --guidance nan", "--guidance"),
    ("sample --guidance inf", "--guidance"),
    ("sample --link garbage", "--link"),
    ("sample --link 0:10", "bandwidth"),
    ("sample --model {w}/garbage-weights", "not a safetensors file"),
    ("sample --model {w}/truncated-weights", "truncated"),
    ("sample --model {w}/wrong-config", "do not match the config"),
    ("sample --labels 12", "outside"),
    ("sample --labels x", "--labels"),
    ("sample --steps 0", "--steps"),
    ("sample --timeout 0", "--timeout"),
    ("demo --out {w}/a-file", "is a file"),
    ("demo --steps -1", "--steps"),
    ("sample --device tpu", "--device"),
    ("demo --device tpu", "--device"),
] + ([] if torch.cuda.is_available() else [
    ("sample --device cuda", "CUDA is not available"),
    ("demo --device cuda", "CUDA is not available"),
]) + [
    # account
    ("account --epsilon 0 --q 0.01 --steps 10", "--epsilon"),
    ("account --epsilon -1 --q 0.01 --steps 10", "--epsilon"),
    ("account --epsilon nan --q 0.01 --steps 10", "--epsilon"),
    ("account --epsilon 1e-6 --q 0.01 --steps 10", "out of reach"),
    ("account --epsilon 1 --delta 2 --q 0.01 --steps 10", "--delta"),
    ("account --epsilon 1 --delta 0 --q 0.01 --steps 10", "--delta"),
    ("account --epsilon 1 --batch-size 100 --n 10 --steps 10", "larger than the data set"),
    ("account --epsilon 1 --batch-size 1 --n 0 --steps 10", "--n"),
    ("account --sigma -1 --q 0.01 --steps 10", "--sigma"),
    ("account --q 0.01 --steps 10", "--epsilon"),
    # train
    ("train --data {w}/no-such-data --out {w}/new-run", "no-such-data"),
    ("train --epsilon 0 --out {w}/new-run", "--epsilon"),
    ("train --epsilon -3 --out {w}/new-run", "--epsilon"),
    ("train --epsilon nan --out {w}/new-run", "--epsilon"),
    ("train --delta 1 --out {w}/new-run", "--delta"),
    ("train --out {w}/run", "already holds a privacy ledger"),
    ("train --out {w}/a-file", "is a file"),
    ("train --batch-size 0 --out {w}/new-run", "--batch-size"),
    ("train --resume {w}/run --data fashion-mnist", "--data"),
    ("train --resume {w}/run --clip 2", "--clip"),
    ("train --resume {w}/run --sigma 3", "--sigma"),
    ("train --resume {w}/run -K 4", "noise-multiplicity"),
    ("train --resume {w}/run --delta 1e-6", "--delta"),
    ("train --resume {w}/run --accountant prv", "--accountant"),
    ("train --resume {w}/run --epsilon 1000", "--epsilon"),
    ("train --resume {w}/missing-run", "no such run folder"),
    # eval
    ("eval {w}/empty.pt --out {w}/eval-out", "cannot be read"),
    ("eval {w}/garbage.pt --out {w}/eval-out", "cannot be read"),
    ("eval {w}/zero.pt --out {w}/eval-out", "non-empty"),
    ("eval {w}/nan.pt --out {w}/eval-out", "NaN"),
    ("eval {w}/missing.pt", "does not exist"),
    ("eval", "give a source"),
    # keys, bench, top level
    ("keys --out {w}/a-file", "keys"),
    ("bench --batch 0", "--batch"),
    ("no-such-command", "unknown command"),
]


def _snapshot(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def no_parties(monkeypatch):
    import cipherdm_torch
    from cipherdm_torch.mpc import runtime
    from cipherdm_torch.pipelines import job

    def trap(*a, **k):
        raise AssertionError("a party was started although the input could be checked first")

    monkeypatch.setattr(runtime.PartyPool, "start", trap)
    monkeypatch.setattr(runtime, "launch", trap)
    monkeypatch.setattr(cipherdm_torch, "launch", trap)
    monkeypatch.setattr(job, "launch", trap)  # the sampling job's own binding


@pytest.mark.parametrize("argv,needle", CASES, ids=[c[0].replace("{w}/", "") for c in CASES])
def test_bad_input_one_error_line(argv, needle, ws, capsys, no_parties, monkeypatch):
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    code = cli.main(argv.format(w=ws).split())
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln
             and not ln.startswith("  warnings.warn")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert _snapshot(ws) == before
    assert not os.path.exists(os.path.join(ws, "new-run", "ledger.json"))
    assert not os.path.exists(os.path.join(ws, "eval-out", "report.json"))


def test_party_error_is_one_line_and_debug_shows_traceback(capsys):
    def fails(argv):
        raise PartyError(1, "ValueError: label 12 outside 0..9", "Traceback (most recent ...)\n  x")

    assert run_main(fails, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: party 1 failed: ValueError")
    assert run_main(fails, ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bugs_keep_their_traceback():
    def bug(argv):
        raise ZeroDivisionError("a bug, not a user error")

    with pytest.raises(ZeroDivisionError):
        run_main(bug, [])


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)


CONSOLE = os.path.join(os.path.dirname(sys.executable), "cipherdm")
CONSOLE_CASES = ["sample --model {w}/truncated-weights", "account --epsilon nan --q 0.1 --steps 3",
                 "train --out {w}/run", "eval {w}/garbage.pt --out {w}/eval-out"]


@pytest.mark.slow  # four fresh interpreters importing torch: ~30 s on a loaded 2-core machine
@pytest.mark.skipif(not os.path.exists(CONSOLE), reason="console script not installed")
def test_real_console_script(ws):
    before = _snapshot(ws)

    def one(argv):
        return argv, subprocess.run([CONSOLE, *argv.format(w=ws).split()], capture_output=True,
                                    text=True, timeout=300, cwd=ws)

    with ThreadPoolExecutor(len(CONSOLE_CASES)) as pool:
        results = list(pool.map(one, CONSOLE_CASES))
    for argv, r in results:
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert r.returncode == 2, (argv, r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
    assert _snapshot(ws) == before
