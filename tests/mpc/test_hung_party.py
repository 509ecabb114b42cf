"""Hung parties are named in a bounded time the caller sets (real processes, three parties).

Every bound is measured from the fault (the moment the test stops a party, or the party
starts its long computation), never from the launch, so a slow start-up on a loaded machine
cannot fail a test; the bounds are generous (``hang_timeout + 30 s``).
"""

import argparse
import os
import signal
import threading
import time

import pytest
import torch

from cipherdm_torch import PartyError, PartyPool, launch, party  # before crypten: its fixes
from cipherdm_torch.cli.sample import add_timeout_arg, apply_timeout
from cipherdm_torch.mpc import runtime, secure_comm
from cipherdm_torch.mpc.channel import op_label
from cipherdm_torch.mpc.crypten_compat import crypten

HANG = 6.0  # hang_timeout of the SIGSTOP test: heartbeats every 1.5 s
SLACK = 30.0  # scheduling on a loaded machine, the launcher's polling, process teardown


def _children_only(pids):
    """Those of ``pids`` that are still our own child processes (never signal a stranger)."""
    mine = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid():
            mine.append(pid)
    return mine


def _release(pids):
    """SIGCONT then SIGKILL whatever is left of the parties (normally the launcher did it)."""
    for pid in _children_only(pids):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _in_thread(fn, *args, **kwargs):
    box = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # the test inspects it
            box["error"] = exc
        box["at"] = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# ---------------------------------------------------------------- a stopped party

def _multiply_loop(folder, seconds):
    """Secure multiplications for ``seconds``; the pid file says the loop is running."""
    p = party()
    x = crypten.cryptensor(torch.full((256,), 1.0), src=p.roles.user)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with op_label("loop.multiply"):
            x = x * x
        n += 1
        if n == 2:
            with open(os.path.join(folder, f"pid{p.rank}.tmp"), "w") as f:
                f.write(str(os.getpid()))
            os.replace(os.path.join(folder, f"pid{p.rank}.tmp"),
                       os.path.join(folder, f"pid{p.rank}"))
    return n


def _wait_for_pids(folder, n=3, limit=900):
    deadline = time.monotonic() + limit  # waits out the start-up; bounds nothing we test
    while time.monotonic() < deadline:
        files = [os.path.join(folder, f"pid{r}") for r in range(n)]
        if all(os.path.exists(f) for f in files):
            return [int(open(f).read()) for f in files]
        time.sleep(0.2)
    raise AssertionError("the parties did not start their loop")


def test_stopped_party_is_named_within_the_hang_timeout(tmp_path):
    thread, box = _in_thread(launch, _multiply_loop, str(tmp_path), 900, hang_timeout=HANG)
    pids = []
    try:
        pids = _wait_for_pids(str(tmp_path))
        time.sleep(1.0)  # well inside the loop
        os.kill(pids[1], signal.SIGSTOP)  # party 1, the user: alive but stopped
        fault = time.monotonic()
        thread.join(HANG + SLACK + 60)
        assert not thread.is_alive(), "launch did not return after the party was stopped"
        err = box.get("error")
        assert isinstance(err, PartyError), box
        detected = box["at"] - fault
        print(f"\nSIGSTOP of party 1 reported {detected:.1f} s after the fault "
              f"(hang_timeout {HANG:g} s)\n{err}")
        text = str(err)
        assert err.rank == 1 and err.role == "user", text
        assert text.startswith("party 1 (user) failed: not responding"), text
        assert "no heartbeat" in text and "stopped" in text, text
        assert "loop.multiply" in text, text
        assert HANG - 1 <= detected <= HANG + SLACK, detected
    finally:
        _release(pids)
        thread.join(60)
    assert not _children_only(pids), "a party outlived the failed launch"


# ---------------------------------------------------------------- a busy party is not hung

BUSY_HANG = 4.0  # heartbeats every 1 s; the busy party computes for 3.5 x this


@pytest.fixture(scope="module")
def busy_pool():
    pool = PartyPool(3, threads=1, hang_timeout=BUSY_HANG)
    with pool:
        yield pool


def _compute_then_multiply(seconds, how):
    """Party 0 computes locally for ``seconds`` (no message); the others wait on it."""
    p = party()
    links = secure_comm.mesh().links
    beats0 = {peer: link.heartbeats_received for peer, link in links.items()}
    x = crypten.cryptensor(torch.arange(4.0), src=p.roles.user)
    if p.rank == 0:
        end = time.monotonic() + seconds
        if how == "sleep":
            time.sleep(seconds)
        else:  # torch kernels: they release the GIL, the sender threads keep beating
            a = torch.randn(600, 600)
            while time.monotonic() < end:
                a = torch.tanh(a @ a)
    with op_label("after.compute"):
        y = (x * x).get_plain_text()
    beats = {peer: link.heartbeats_received - beats0[peer] for peer, link in links.items()}
    return {"y": y, "beats_from_0": beats.get(0)}


# "sleep" (no torch kernel at all) runs in the slow set: CI keeps the kernel case, ~30 s less
@pytest.mark.parametrize("how", [pytest.param("sleep", marks=pytest.mark.slow), "matmul"])
def test_long_local_computation_is_not_reported(busy_pool, how):
    seconds = 3.5 * BUSY_HANG
    t0 = time.monotonic()
    results = busy_pool.run(_compute_then_multiply, seconds, how, timeout=seconds + 600)
    assert time.monotonic() - t0 >= seconds
    for r in results:
        torch.testing.assert_close(r["y"], torch.arange(4.0) ** 2, atol=1e-3, rtol=0)
    # parties 1 and 2 waited on party 0 and heard its heartbeats meanwhile
    assert all(r["beats_from_0"] >= 2 for r in results[1:]), results


# ---------------------------------------------------------------- start-up

@pytest.mark.slow  # 30 s; tests/mpc/test_runtime.py's start-up timeout test stays in the fast set
def test_startup_timeout_says_start_up_and_names_the_party_that_did_not_start(monkeypatch):
    pools = []

    class Recorded(PartyPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(runtime, "PartyPool", Recorded)
    limit = 30.0
    t0 = time.monotonic()
    thread, box = _in_thread(launch, _multiply_loop, "/nonexistent", 1, timeout=limit)
    pid = None
    try:
        while pid is None and thread.is_alive():  # stop party 1 as soon as it is spawned
            procs = pools[0]._procs if pools else []
            if len(procs) > 1 and procs[1].pid is not None:
                pid = procs[1].pid
                os.kill(pid, signal.SIGSTOP)
            else:
                time.sleep(0.01)
        thread.join(limit + SLACK + 60)
        assert not thread.is_alive()
        took = box["at"] - t0
        err = box.get("error")
        assert isinstance(err, PartyError), box
        text = str(err)
        print(f"\nstart-up timeout reported after {took:.1f} s (timeout {limit:g} s)\n{text}")
        assert f"start-up did not finish within {limit:.0f} s" in text, text
        assert err.rank == 1 and err.role == "user", text
        assert "party 1 (user)" in text and "stopped" in text, text
        assert limit <= took <= limit + SLACK, took
    finally:
        if pid is not None:
            _release([pid])
        thread.join(60)


# ---------------------------------------------------------------- the knob

def test_cli_timeout_is_the_hang_timeout(monkeypatch):
    monkeypatch.delenv("CIPHERDM_HANG_TIMEOUT", raising=False)  # restored after the test
    assert PartyPool(3).hang_timeout == 60.0
    ap = argparse.ArgumentParser()
    add_timeout_arg(ap)
    apply_timeout(ap.parse_args(["--timeout", "7.5"]).timeout)
    assert PartyPool(3).hang_timeout == 7.5  # launch() builds its pool the same way
    assert PartyPool(3, hang_timeout=2).hang_timeout == 2.0  # an explicit value wins
    monkeypatch.setenv("CIPHERDM_HANG_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="CIPHERDM_HANG_TIMEOUT"):
        PartyPool(3)
    with pytest.raises(ValueError, match="hang_timeout"):
        PartyPool(3, hang_timeout=0)
