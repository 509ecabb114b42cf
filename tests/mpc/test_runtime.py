"""The three-party runtime: results per rank, roles, and loud, bounded failure.

Time bounds are measured from the fault (a party records when it raises, exits or starts
to hang), not from the launch: start-up on a loaded machine can take minutes.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from cipherdm_torch.mpc import identity
from cipherdm_torch.mpc.channel import op_label
import torch

import cipherdm_torch
from cipherdm_torch import PartyError, PartyPool, Roles, launch, party
import crypten
import crypten.communicator as comm


def _whoami(tag):
    p = party()
    return {"tag": tag, "rank": p.rank, "world": p.world_size,
            "comm_rank": comm.get().get_rank(), "owner": p.is_owner, "user": p.is_user}


def _share_and_reveal(x):
    return crypten.cryptensor(x, src=party().roles.user).get_plain_text()


def test_launch_returns_each_party_result_and_roles():
    results = launch(_whoami, "hi", roles=Roles(owner=2, user=0))
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert [r["comm_rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 and r["tag"] == "hi" for r in results)
    assert [r["owner"] for r in results] == [False, False, True]
    assert [r["user"] for r in results] == [True, False, False]


def test_pool_runs_many_calls(parties):
    x = torch.linspace(-100, 100, 11)
    for _ in range(3):
        for out in parties.run(_share_and_reveal, x):
            torch.testing.assert_close(out, x, atol=1e-4, rtol=0)


def test_bad_roles_and_world_size_are_rejected():
    with pytest.raises(ValueError, match="role user is rank 5"):
        launch(_whoami, "x", roles=Roles(user=5))
    with pytest.raises(ValueError, match="world_size"):
        cipherdm_torch.PartyPool(world_size=1)


def test_unpicklable_function_is_a_clear_error():
    with pytest.raises(TypeError, match="module-level function"):
        launch(lambda: 1)


def _fault(path):
    """Record when the fault happens (wall clock: the test is another process)."""
    with open(path, "w") as f:
        f.write(repr(time.time()))


def _since_fault(path):
    return time.time() - float(open(path).read())


def _raise_in_party_1(path):
    if party().rank == 1:
        _fault(path)
        raise ValueError("bad input on purpose")
    # the others block in a collective that party 1 never joins
    crypten.cryptensor(torch.ones(4)).get_plain_text()


def _die_in_party_2(path):
    if party().rank == 2:
        _fault(path)
        os._exit(3)
    crypten.cryptensor(torch.ones(4)).get_plain_text()


def _hang_in_party_0(path):
    if party().rank == 0:
        _fault(path)
        time.sleep(3600)  # alive (its heartbeats go on) but never answers
    with op_label("after.hang"):
        crypten.cryptensor(torch.ones(4)).get_plain_text()


def test_raising_party_is_named_and_others_stop(tmp_path):
    with pytest.raises(PartyError) as err:
        launch(_raise_in_party_1, str(tmp_path / "fault"))
    assert err.value.rank == 1 and err.value.role == "user"
    assert "ValueError: bad input on purpose" in str(err.value)
    assert _since_fault(tmp_path / "fault") < 60


def test_dead_party_is_named_within_bounded_time(tmp_path):
    with pytest.raises(PartyError) as err:
        launch(_die_in_party_2, str(tmp_path / "fault"))
    assert err.value.rank == 2 and err.value.role == "helper"
    assert "exited with code 3" in str(err.value)
    assert _since_fault(tmp_path / "fault") < 60


def test_hanging_party_times_out_naming_the_party_the_others_wait_for(tmp_path):
    # a started pool, so that `timeout` bounds the run only (launch's covers start-up too)
    with PartyPool(3, threads=1) as pool:
        with pytest.raises(PartyError, match="timed out after 20 s") as err:
            pool.run(_hang_in_party_0, str(tmp_path / "fault"), timeout=20)
    took = _since_fault(tmp_path / "fault")
    text = str(err.value)
    assert err.value.rank == 0 and err.value.role == "owner", text
    assert "the others wait for party 0 (owner), which is computing" in text, text
    assert "party 1 (user): waiting" in text and "after.hang" in text, text
    assert took < 20 + 30, took


def test_launch_timeout_covers_start_up():
    # far too short for any start-up: the error says start-up, not a run that timed out
    t0 = time.monotonic()
    with pytest.raises(PartyError, match="start-up did not finish within 1 s") as err:
        launch(_whoami, "x", timeout=1)
    assert "ready: []" in str(err.value)
    assert time.monotonic() - t0 < 1 + 30


def test_same_code_runs_under_torchrun(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, cipherdm_torch, crypten

        def job(x):
            p = cipherdm_torch.party()
            return (crypten.cryptensor(x, src=p.roles.user) * 2).get_plain_text()

        if __name__ == "__main__":
            out = cipherdm_torch.launch(job, torch.arange(4.0))
            rank = cipherdm_torch.party().rank
            assert [o is not None for o in out] == [r == rank for r in range(3)], out
            with open(sys.argv[1] + f"/result{rank}.txt", "w") as f:
                f.write(str(out[rank].tolist()))
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           "--nproc-per-node=3", str(script), str(tmp_path)]
    identity.create(str(tmp_path / "keys"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "CIPHERDM_KEYS": str(tmp_path / "keys")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(3):
        assert (tmp_path / f"result{r}.txt").read_text() == "[0.0, 2.0, 4.0, 6.0]"


ORPHAN_SCRIPT = textwrap.dedent("""
    import os, sys, time, cipherdm_torch

    def job(path):
        with open(path + f"/pid{cipherdm_torch.party().rank}", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)

    if __name__ == "__main__":
        cipherdm_torch.launch(job, sys.argv[1])
""")


def test_parties_stop_when_the_launcher_is_killed(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    try:
        deadline = time.monotonic() + 600  # waits out start-up; the bound below is from the kill
        while len(list(tmp_path.glob("pid*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        pids = [int(p.read_text()) for p in tmp_path.glob("pid*")]
        assert len(pids) == 3
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
                 "zombie" not in open(f"/proc/{p}/status").read().lower()]
    assert not alive, f"parties {alive} outlived their launcher"
