"""Three-party runtime: run one function in every party and collect the results.

Locally, :func:`launch` (or a reusable :class:`PartyPool`) starts one process
per party with ``torch.multiprocessing`` and a gloo process group; under
``torchrun`` (one node per party, ``env://`` rendezvous) the same call runs the
function in the current process only. Inside the function, :func:`party` tells
the party its rank and roles.

Failure is loud and bounded: when a party raises or dies, the others are
stopped within ``grace`` seconds and :class:`PartyError` names the party that
failed first and its cause (never a hang).
"""

from __future__ import annotations

import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as mp

from cipherdm_torch.mpc import cost, netsim

__all__ = ["Roles", "PartyInfo", "PartyError", "PartyPool", "launch", "party", "under_torchrun"]


@dataclass(frozen=True)
class Roles:
    """Which rank plays which role (configurable; defaults follow DESIGN.md)."""

    owner: int = 0  # holds the model weights in plaintext
    user: int = 1  # holds noise, label / prompt, and receives the image

    def check(self, world_size: int) -> None:
        for name, rank in (("owner", self.owner), ("user", self.user)):
            if not 0 <= rank < world_size:
                raise ValueError(f"role {name} is rank {rank}, outside 0..{world_size - 1}")


@dataclass(frozen=True)
class PartyInfo:
    rank: int
    world_size: int
    roles: Roles = field(default_factory=Roles)

    @property
    def is_owner(self) -> bool:
        return self.rank == self.roles.owner

    @property
    def is_user(self) -> bool:
        return self.rank == self.roles.user


class PartyError(RuntimeError):
    """A party failed; ``rank`` is the party that failed first, ``cause`` why."""

    def __init__(self, rank: Optional[int], cause: str, details: str = ""):
        self.rank, self.cause, self.details = rank, cause, details
        who = "all parties" if rank is None else f"party {rank}"
        super().__init__(f"{who} failed: {cause}" + (f"\n{details}" if details else ""))


_PARTY: Optional[PartyInfo] = None


def party() -> PartyInfo:
    """This process's party (rank, world size, roles); only valid inside a launched function."""
    if _PARTY is None:
        raise RuntimeError("not inside a party: run the function with cipherdm_torch.launch()")
    return _PARTY


def under_torchrun() -> bool:
    """True when this process was started by torchrun (one process per party)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "LOCAL_RANK" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ)


def init_party(rank: int, world_size: int, rendezvous: str, roles: Roles = Roles(),
               crypten_config: Optional[Dict[str, Any]] = None,
               threads: Optional[int] = None, keys: Optional[str] = None,
               secure: bool = True) -> PartyInfo:
    """Join the process group, open the authenticated links, meter, apply settings.

    ``keys`` is the credentials folder (:mod:`cipherdm_torch.mpc.identity`); ``secure=False``
    keeps CrypTen's plain gloo links and MT19937 generators and exists only so that a
    benchmark can measure what the secure links cost.
    """
    global _PARTY
    from cipherdm_torch.mpc.crypten_compat import crypten
    from cipherdm_torch.mpc import identity, secure_comm

    roles.check(world_size)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), RENDEZVOUS=rendezvous,
                      DISTRIBUTED_BACKEND=os.environ.get("DISTRIBUTED_BACKEND", "gloo"))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
    for key, value in (crypten_config or {}).items():
        setattr(crypten.cfg, key, value)
    crypten.init()
    if secure:
        if not keys:
            raise ValueError("no party credentials: set CIPHERDM_KEYS to a folder made by "
                             "`cipherdm keys --out DIR` (every party's .crt, this party's .key)")
        secure_comm.setup(identity.load(keys, rank, world_size))
    else:
        from cipherdm_torch.mpc import prg

        prg.allow_insecure_generators()
    cost.install()
    netsim.from_env()
    _PARTY = PartyInfo(rank, world_size, roles)
    return _PARTY


def _failure(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "time": time.time(),
            "traceback": traceback.format_exc()}


def _exit_with_parent(parent: int, period: float = 1.0) -> None:
    """Stop this party if the launching process dies (else it would compute on, orphaned)."""
    import threading

    def watch():
        while True:
            time.sleep(period)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="cipherdm-parent-watch", daemon=True).start()


def _party_main(rank, world_size, rendezvous, roles, crypten_config, threads, tasks, results,
                parent=None, keys=None, secure=True):
    """Body of one party process: initialise, then run tasks until told to stop."""
    if parent is not None:
        _exit_with_parent(parent)
    try:
        init_party(rank, world_size, rendezvous, roles, crypten_config, threads, keys, secure)
        results.put((rank, "ready", None))
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args, kwargs = pickle.loads(task)
            results.put((rank, "ok", pickle.dumps(fn(*args, **kwargs))))
    except BaseException as exc:  # report, then leave so that peers stop waiting on us
        results.put((rank, "error", _failure(exc)))
        results.close()
        results.join_thread()
        os._exit(1)
    import crypten

    from cipherdm_torch.mpc import secure_comm

    secure_comm.teardown()
    crypten.uninit()


def _pickle_task(fn: Callable, args: tuple, kwargs: dict) -> bytes:
    try:
        return pickle.dumps((fn, args, kwargs))
    except Exception as exc:
        raise TypeError(f"launch() needs a picklable, module-level function and arguments: "
                        f"{exc}") from exc


_BOOT_DIR = "CIPHERDM_PARTY_BOOT_DIR"


def _refuse_while_spawning() -> None:
    """Stop a party that is re-running its launching script (no ``__main__`` guard).

    A spawned party imports the launching script as its main module; without the guard the
    script's ``launch()`` runs again inside the party, which can only fail. The party writes
    the cause where the launcher reads it, so the launch fails at once with this message.
    """
    import json
    import multiprocessing

    proc = multiprocessing.current_process()
    if not getattr(proc, "_inheriting", False):
        return
    message = (f"launch() was called again inside a starting party ({proc.name}): the launching "
               f"script re-runs when each party imports it. Put the launch() call under "
               f"`if __name__ == \"__main__\":` (functions the parties run stay at module level).")
    folder = os.environ.get(_BOOT_DIR)
    if folder and proc.name.startswith("cipherdm-party-"):
        rank = proc.name.rsplit("-", 1)[-1]
        try:
            with open(os.path.join(folder, f"boot-{rank}.json"), "w") as f:
                json.dump({"type": "RuntimeError", "message": message,
                           "traceback": "".join(traceback.format_stack())}, f)
        except OSError:
            pass
    raise RuntimeError(message)


_COMM_ERRORS = ("Connection closed by peer", "Connection reset", "Broken pipe", "Gloo",
                "gloo", "Timed out", "ECONNRESET",
                # secure links (cipherdm_torch.mpc.channel): a peer went away or stopped the run
                "closed (the party stopped", "stopped the run (")


class PartyPool:
    """``world_size`` long-lived party processes that run functions on request.

    Starting a party (importing torch and CrypTen, joining the group) takes
    seconds; a pool pays it once for many :meth:`run` calls (the test suite
    shares one). After a failure the pool restarts on the next call.
    """

    def __init__(self, world_size: int = 3, roles: Roles = Roles(),
                 crypten_config: Optional[Dict[str, Any]] = None,
                 threads: Optional[int] = None, start_timeout: float = 180.0,
                 grace: float = 10.0, keys: Optional[str] = None, secure: bool = True):
        """``keys``: a credentials folder for the parties' TLS identities; by default (local
        processes) a throwaway set is made in a private temporary folder. ``secure=False``
        runs on plain gloo links and CrypTen's generators: for overhead benchmarks only."""
        if world_size < 2:
            raise ValueError(f"world_size must be at least 2, got {world_size}")
        roles.check(world_size)
        self.world_size, self.roles, self.crypten_config = world_size, roles, crypten_config
        self.threads, self.start_timeout, self.grace = threads, start_timeout, grace
        self.keys, self.secure = keys, secure
        self._procs: List[mp.Process] = []
        self._tmp: Optional[str] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "PartyPool":
        if self._procs:
            return self
        _refuse_while_spawning()
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="cipherdm-")
        rendezvous = f"file://{self._tmp}/rendezvous"
        keys = self.keys
        if self.secure and keys is None:
            from cipherdm_torch.mpc import identity

            keys = os.path.join(self._tmp, "keys")
            identity.create(keys, self.world_size)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_party_main, daemon=True, name=f"cipherdm-party-{r}",
                        args=(r, self.world_size, rendezvous, self.roles, self.crypten_config,
                              self.threads, self._tasks[r], self._results, os.getpid(), keys,
                              self.secure))
            for r in range(self.world_size)]
        old_dir = os.environ.get(_BOOT_DIR)
        os.environ[_BOOT_DIR] = self._tmp  # where a party that dies while starting says why
        try:
            for p in self._procs:
                p.start()
        finally:
            if old_dir is None:
                os.environ.pop(_BOOT_DIR, None)
            else:
                os.environ[_BOOT_DIR] = old_dir
        self._collect("ready", self.start_timeout)
        return self

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        self._procs = []
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "PartyPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ running
    def run(self, fn: Callable, *args, timeout: Optional[float] = None,
            private: Optional[Dict[int, Dict[str, Any]]] = None, **kwargs) -> List[Any]:
        """Run ``fn(*args, **kwargs)`` in every party; return the results ordered by rank.

        ``fn`` must be picklable (a module-level function). ``timeout`` bounds
        the whole call; on timeout or failure the pool is torn down and
        :class:`PartyError` is raised. ``private`` maps a rank to extra keyword
        arguments that only that party's process receives (the user's seed and
        labels, say): the other processes never hold them.
        """
        private = private or {}
        bad = [r for r in private if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"private arguments for ranks {bad} outside 0..{self.world_size - 1}")
        tasks = [_pickle_task(fn, args, {**kwargs, **private.get(r, {})})
                 for r in range(self.world_size)]
        self.start()
        for q, task in zip(self._tasks, tasks):
            q.put(task)
        return self._collect("ok", timeout)

    def _collect(self, expected: str, timeout: Optional[float]) -> List[Any]:
        out: Dict[int, Any] = {}
        failures: Dict[int, dict] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        stop_by = None  # set once something failed: others get `grace` seconds
        while len(out) + len(failures) < self.world_size:
            now = time.monotonic()
            if stop_by is not None and now > stop_by:
                break
            if deadline is not None and now > deadline:
                self._kill()
                if expected == "ready":
                    raise PartyError(None, f"party start-up timed out after {timeout:.0f} s "
                                           f"(ready: {sorted(out)}, failed: {sorted(failures)}): "
                                           f"a party did not join the group")
                raise PartyError(None, f"timed out after {timeout:.0f} s "
                                       f"(finished: {sorted(out)}, failed: {sorted(failures)})")
            try:
                rank, status, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if r not in out and r not in failures and not p.is_alive():
                        failures[r] = self._died(r, p, starting=expected == "ready")
                        # a party that never started leaves the others waiting for it
                        stop_by = stop_by or time.monotonic() + (
                            0.5 if expected == "ready" else self.grace)
                continue
            if status == "error":
                failures[rank] = payload
                stop_by = stop_by or time.monotonic() + self.grace
            elif status == expected:
                out[rank] = pickle.loads(payload) if status == "ok" else payload
        if failures:
            self._kill()
            raise self._error(failures)
        return [out[r] for r in range(self.world_size)]

    def _died(self, rank: int, proc, starting: bool) -> dict:
        """Why party ``rank`` exited: its own report if it died while starting, else the code."""
        path = os.path.join(self._tmp or "", f"boot-{rank}.json")
        if starting and self._tmp and os.path.exists(path):
            import json

            with open(path) as f:
                report = json.load(f)
            return {"type": report["type"], "message": report["message"], "time": time.time(),
                    "traceback": report.get("traceback", "")}
        message = f"process exited with code {proc.exitcode}"
        if starting:
            message += (" before it started (its own error is on stderr above; a script that "
                        "calls launch() needs an `if __name__ == \"__main__\":` guard)")
        return {"type": "died", "time": time.time(), "traceback": "", "message": message}

    @staticmethod
    def _error(failures: Dict[int, dict]) -> PartyError:
        """Blame the party that failed first and not merely because a peer went away."""
        def consequential(f):
            return any(s in f["message"] for s in _COMM_ERRORS)

        order = sorted(failures, key=lambda r: (consequential(failures[r]), failures[r]["time"]))
        first = failures[order[0]]
        others = "; ".join(f"party {r}: {failures[r]['type']}: {failures[r]['message'][:200]}"
                           for r in order[1:])
        details = first.get("traceback", "")
        if others:
            details += f"\nthen {others}"
        return PartyError(order[0], f"{first['type']}: {first['message']}", details.strip())


def launch(fn: Callable, *args, world_size: int = 3, roles: Roles = Roles(),
           crypten_config: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None,
           private: Optional[Dict[int, Dict[str, Any]]] = None, **kwargs) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` once in each of ``world_size`` parties.

    Locally, returns the list of every party's result (index = rank). Under
    ``torchrun`` the current process is one party: the list holds only this
    party's result at its rank (``None`` elsewhere), since results may be secret.
    ``private`` maps a rank to keyword arguments only that party receives.
    """
    if under_torchrun():
        rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if ws != world_size:
            raise ValueError(f"torchrun started {ws} processes but world_size={world_size}")
        init_party(rank, ws, "env://", roles, crypten_config, keys=os.environ.get("CIPHERDM_KEYS"))
        results: List[Any] = [None] * ws
        results[rank] = fn(*args, **{**kwargs, **(private or {}).get(rank, {})})
        return results
    _pickle_task(fn, args, kwargs)  # fail before starting any process
    with PartyPool(world_size, roles, crypten_config) as pool:
        return pool.run(fn, *args, timeout=timeout, private=private, **kwargs)
