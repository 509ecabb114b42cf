"""Each party as its own torchrun launch (one node per party), as across three hosts."""

import json
import os
import socket
import subprocess
import sys
import textwrap

from cipherdm_torch.mpc import identity

JOB = textwrap.dedent("""
    import sys, torch, cipherdm_torch, crypten

    def job(x):
        p = cipherdm_torch.party()
        secret = crypten.cryptensor(x if p.is_user else torch.zeros_like(x), src=p.roles.user)
        return (secret * secret).get_plain_text(dst=p.roles.user)

    if __name__ == "__main__":
        out = cipherdm_torch.launch(job, torch.arange(4.0))
        p = cipherdm_torch.party()
        with open(sys.argv[1] + f"/node{p.rank}.txt", "w") as f:
            f.write(str(out[p.rank].tolist()) if p.is_user else "no result")
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parties_as_separate_torchrun_launches(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    port = _free_port()
    keys = tmp_path / "keys"
    identity.create(str(keys))
    hosts = []
    for rank in range(3):  # each host gets every certificate and only its own key
        host = tmp_path / f"host{rank}"
        host.mkdir()
        for r in range(3):
            (host / f"party{r}.crt").write_bytes((keys / f"party{r}.crt").read_bytes())
        (host / f"party{rank}.key").write_bytes((keys / f"party{rank}.key").read_bytes())
        hosts.append(host)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=3", "--nproc-per-node=1",
         f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
         str(script), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CIPHERDM_KEYS": str(hosts[rank])})
        for rank in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    squares = json.loads((tmp_path / "node1.txt").read_text())  # the user (rank 1)
    assert max(abs(a - b) for a, b in zip(squares, [0.0, 1.0, 4.0, 9.0])) < 1e-3
    assert (tmp_path / "node0.txt").read_text() == "no result"
    assert (tmp_path / "node2.txt").read_text() == "no result"
