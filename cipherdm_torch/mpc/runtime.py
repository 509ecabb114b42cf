"""Three-party runtime: run one function in every party and collect the results.

Locally, :func:`launch` (or a reusable :class:`PartyPool`) starts one process
per party with ``torch.multiprocessing`` and a gloo process group; under
``torchrun`` (one node per party, ``env://`` rendezvous) the same call runs the
function in the current process only. Inside the function, :func:`party` tells
the party its rank and roles.

Failure is loud and bounded: when a party raises or dies, the others are
stopped within ``grace`` seconds and :class:`PartyError` names the party that
failed first and its cause (never a hang).

Hangs are bounded too, by three limits the caller sets:

* ``hang_timeout`` (``launch`` / :class:`PartyPool`; default ``$CIPHERDM_HANG_TIMEOUT`` or
  60 s; ``cipherdm sample --timeout``): every link sends a heartbeat every
  ``hang_timeout / 4`` seconds while idle, from a thread beside the computation. A party that
  is stopped (SIGSTOP), frozen or cut off sends none; the peers waiting on it raise after
  ``hang_timeout`` seconds of silence and :class:`PartyError` names it (``rank``, role, and
  its process state). A party busy with a long local computation keeps beating and is
  never reported, however long it computes.
* ``timeout`` (``launch`` / :meth:`PartyPool.run`): bounds the whole call, party start-up
  (rendezvous, TLS mesh) included for ``launch``. On expiry the error says whether start-up
  had finished, which parties had started (and how far) or finished, and names the party
  the others wait for (or a stopped one).
* ``$CIPHERDM_LINK_TIMEOUT`` (default 900 s): a receive that gets heartbeats but no data for
  that long fails, naming the link (a party alive but stuck), also under ``torchrun``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as mp

from cipherdm_torch.mpc import cost, identity, netsim, prg, secure_comm
from cipherdm_torch.mpc.channel import PeerHungError, hang_timeout_from_env

__all__ = ["Roles", "PartyInfo", "PartyError", "PartyPool", "launch", "party", "under_torchrun"]

DEFAULT_START_TIMEOUT = 180.0  # s, for a start-up that no ``timeout`` bounds


@dataclass(frozen=True)
class Roles:
    """Which rank plays which role (configurable; defaults follow DESIGN.md)."""

    owner: int = 0  # holds the model weights in plaintext
    user: int = 1  # holds noise, label / prompt, and receives the image

    def check(self, world_size: int) -> None:
        for name, rank in (("owner", self.owner), ("user", self.user)):
            if not 0 <= rank < world_size:
                raise ValueError(f"role {name} is rank {rank}, outside 0..{world_size - 1}")

    def of(self, rank: int) -> str:
        """The role(s) of ``rank``: owner, user, or helper."""
        names = [n for n, r in (("owner", self.owner), ("user", self.user)) if r == rank]
        return " and ".join(names) or "helper"


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
    """A party failed; ``rank`` is the party that failed first (or is hung), ``cause`` why,
    ``role`` its role (owner / user / helper) when the launcher knows it."""

    def __init__(self, rank: Optional[int], cause: str, details: str = "",
                 role: Optional[str] = None):
        self.rank, self.cause, self.details, self.role = rank, cause, details, role
        who = "all parties" if rank is None else f"party {rank}" + (f" ({role})" if role else "")
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
               secure: bool = True, hang_timeout: Optional[float] = None,
               on_stage: Optional[Callable[[str], None]] = None) -> PartyInfo:
    """Join the process group, open the authenticated links, meter, apply settings.

    ``keys`` is the credentials folder (:mod:`cipherdm_torch.mpc.identity`); ``secure=False``
    keeps CrypTen's plain gloo links and MT19937 generators and exists only so that a
    benchmark can measure what the secure links cost. ``hang_timeout``: seconds of silence
    (no message, no heartbeat) after which a peer is reported as hung (default
    ``$CIPHERDM_HANG_TIMEOUT`` or 60 s). ``on_stage`` is told "rendezvous" when CrypTen is
    imported and the party joins the process group, "group" once it has (the links next).
    """
    global _PARTY
    from cipherdm_torch.mpc.crypten_compat import crypten  # CrypTen loads in the party processes only

    roles.check(world_size)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), RENDEZVOUS=rendezvous,
                      DISTRIBUTED_BACKEND=os.environ.get("DISTRIBUTED_BACKEND", "gloo"))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
    for key, value in (crypten_config or {}).items():
        setattr(crypten.cfg, key, value)
    if on_stage is not None:
        on_stage("rendezvous")
    crypten.init()
    if on_stage is not None:
        on_stage("group")
    if secure:
        if not keys:
            raise ValueError("no party credentials: set CIPHERDM_KEYS to a folder made by "
                             "`cipherdm keys --out DIR` (every party's .crt, this party's .key)")
        secure_comm.setup(identity.load(keys, rank, world_size), hang_timeout=hang_timeout)
    else:

        prg.allow_insecure_generators()
    cost.install()
    netsim.from_env()
    _PARTY = PartyInfo(rank, world_size, roles)
    return _PARTY


def _hung(exc: BaseException) -> Optional[dict]:
    """The :class:`~cipherdm_torch.mpc.channel.PeerHungError` behind ``exc``, as a dict."""

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PeerHungError):
            return {"peer": exc.peer, "rank": exc.rank, "silent_for": exc.silent_for,
                    "label": exc.label}
        exc = exc.__cause__ or exc.__context__
    return None


def _failure(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "time": time.time(),
            "traceback": traceback.format_exc(), "hung": _hung(exc)}


def _wait_state() -> dict:
    """What this party waits on now (for the launcher's timeout report)."""

    waits = {}
    if secure_comm.is_secure():
        waits = {peer: list(w) for peer, w in secure_comm.mesh().waits().items()}
    return {"waits": waits}


def _exit_with_parent(parent: int, period: float = 1.0, control: Optional[str] = None,
                      rank: int = 0, results=None) -> None:
    """Stop this party if the launching process dies (else it would compute on, orphaned);
    answer the launcher's requests for this party's wait state (``control``/report)."""

    def watch():
        answered = None
        while True:
            time.sleep(period)
            if os.getppid() != parent:
                os._exit(1)
            if control is None or results is None:
                continue
            try:
                with open(os.path.join(control, "report")) as f:
                    request = f.read()
                if request and request != answered:
                    answered = request
                    results.put((rank, "state", _wait_state()))
            except Exception:  # no request yet, or the queue is closed: nothing to answer
                pass

    threading.Thread(target=watch, name="cipherdm-parent-watch", daemon=True).start()


def _party_main(rank, world_size, rendezvous, roles, crypten_config, threads, tasks, results,
                parent=None, keys=None, secure=True, hang_timeout=None, control=None):
    """Body of one party process: initialise, then run tasks until told to stop."""
    if parent is not None:
        _exit_with_parent(parent, control=control, rank=rank, results=results)
    try:
        results.put((rank, "stage", "started"))
        init_party(rank, world_size, rendezvous, roles, crypten_config, threads, keys, secure,
                   hang_timeout=hang_timeout,
                   on_stage=lambda stage: results.put((rank, "stage", stage)))
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
    import crypten  # loaded by init_party in this party process already

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
                 threads: Optional[int] = None, start_timeout: Optional[float] = None,
                 grace: float = 10.0, keys: Optional[str] = None, secure: bool = True,
                 hang_timeout: Optional[float] = None):
        """``keys``: a credentials folder for the parties' TLS identities; by default (local
        processes) a throwaway set is made in a private temporary folder. ``secure=False``
        runs on plain gloo links and CrypTen's generators: for overhead benchmarks only.

        ``start_timeout``: seconds the parties may take to start (import, rendezvous, TLS
        mesh; default ``$CIPHERDM_START_TIMEOUT`` or 180 s); the error then says which
        parties had started and how far. ``hang_timeout``: seconds of silence (no message,
        no heartbeat) after which a party's peers report it as hung and :class:`PartyError`
        names it (default ``$CIPHERDM_HANG_TIMEOUT`` or 60 s; heartbeats every quarter of
        it). ``grace``: seconds the other parties get to stop after one failed."""

        if world_size < 2:
            raise ValueError(f"world_size must be at least 2, got {world_size}")
        roles.check(world_size)
        if start_timeout is None:
            start_timeout = float(os.environ.get("CIPHERDM_START_TIMEOUT",
                                                 DEFAULT_START_TIMEOUT))
        if hang_timeout is None:
            hang_timeout = hang_timeout_from_env()
        for name, value in (("start_timeout", start_timeout), ("hang_timeout", hang_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        self.world_size, self.roles, self.crypten_config = world_size, roles, crypten_config
        self.threads, self.start_timeout, self.grace = threads, start_timeout, grace
        self.keys, self.secure, self.hang_timeout = keys, secure, float(hang_timeout)
        self._procs: List[mp.Process] = []
        self._tmp: Optional[str] = None
        self._stage: Dict[int, str] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "PartyPool":
        """Start the parties (if not running); raise :class:`PartyError` if they do not all
        get ready within ``start_timeout`` seconds, naming the start-up."""
        if self._procs:
            return self
        _refuse_while_spawning()
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="cipherdm-")
        rendezvous = f"file://{self._tmp}/rendezvous"
        keys = self.keys
        if self.secure and keys is None:

            keys = os.path.join(self._tmp, "keys")
            identity.create(keys, self.world_size)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._stage = {}
        self._procs = [
            ctx.Process(target=_party_main, daemon=True, name=f"cipherdm-party-{r}",
                        args=(r, self.world_size, rendezvous, self.roles, self.crypten_config,
                              self.threads, self._tasks[r], self._results, os.getpid(), keys,
                              self.secure, self.hang_timeout, self._tmp))
            for r in range(self.world_size)]
        old_dir = os.environ.get(_BOOT_DIR)
        os.environ[_BOOT_DIR] = self._tmp  # where a party that dies while starting says why
        t0 = time.monotonic()
        try:
            for p in self._procs:
                p.start()
        finally:
            if old_dir is None:
                os.environ.pop(_BOOT_DIR, None)
            else:
                os.environ[_BOOT_DIR] = old_dir
        self._collect("ready", t0 + self.start_timeout, self.start_timeout)
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
                p.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
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
        the run (a pool that must start first has ``start_timeout`` for that); on timeout
        or failure the pool is torn down and :class:`PartyError` is raised, naming the
        party the others wait for when there is one. A party that stops responding (no
        message, no heartbeat) is named after ``hang_timeout`` seconds whatever ``timeout``
        is. ``private`` maps a rank to extra keyword
        arguments that only that party's process receives (the user's seed and labels,
        say): the other processes never hold them.
        """
        tasks = self._tasks_for(fn, args, kwargs, private)
        self.start()
        self._submit(tasks)
        return self._collect("ok", None if timeout is None else time.monotonic() + timeout,
                             timeout)

    def _tasks_for(self, fn, args, kwargs, private) -> List[bytes]:
        private = private or {}
        bad = [r for r in private if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"private arguments for ranks {bad} outside 0..{self.world_size - 1}")
        return [_pickle_task(fn, args, {**kwargs, **private.get(r, {})})
                for r in range(self.world_size)]

    def _submit(self, tasks: List[bytes]) -> None:
        for q, task in zip(self._tasks, tasks):
            q.put(task)

    def _who(self, rank: int) -> str:
        return f"party {rank} ({self.roles.of(rank)})"

    def _collect(self, expected: str, deadline: Optional[float],
                 limit: Optional[float]) -> List[Any]:
        out: Dict[int, Any] = {}
        failures: Dict[int, dict] = {}
        stop_by = None  # set once something failed: others get `grace` seconds
        while len(out) + len(failures) < self.world_size:
            now = time.monotonic()
            if stop_by is not None and now > stop_by:
                break
            pending = [r for r in range(self.world_size) if r not in out and r not in failures]
            blamed = {f["hung"]["peer"] for f in failures.values() if f.get("hung")}
            if failures and all(r in blamed for r in pending):
                break  # every party still out is the one its peers found hung
            if deadline is not None and now > deadline:
                raise self._timed_out(expected, limit, out, failures)
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
            if status == "stage":
                self._stage[rank] = payload
            elif status == "error":
                failures[rank] = payload
                stop_by = stop_by or time.monotonic() + self.grace
            elif status == expected:
                out[rank] = pickle.loads(payload) if status == "ok" else payload
                if status == "ready":
                    self._stage[rank] = "ready"
        if failures:
            states = self._proc_states()
            self._kill()
            raise self._error(failures, states)
        return [out[r] for r in range(self.world_size)]

    # ------------------------------------------------------------------ diagnosis
    def _proc_states(self) -> Dict[int, str]:
        """Each live party process's state from /proc (Linux): running, sleeping, stopped..."""
        names = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O",
                 "T": "stopped (SIGSTOP or job control)", "t": "stopped by a debugger",
                 "Z": "exited", "X": "exited"}
        states = {}
        for r, p in enumerate(self._procs):
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    code = f.read().rsplit(")", 1)[1].split()[0]
                states[r] = names.get(code, code)
            except (OSError, IndexError, TypeError):
                pass
        return states

    def _ask_wait_states(self, out, failures, wait: float = 2.5) -> Dict[int, dict]:
        """Ask the running parties what they wait on (their watcher threads answer)."""
        answers: Dict[int, dict] = {}
        if not self._tmp:
            return answers
        try:
            with open(os.path.join(self._tmp, "report.tmp"), "w") as f:
                f.write(repr(time.time()))
            os.replace(os.path.join(self._tmp, "report.tmp"), os.path.join(self._tmp, "report"))
        except OSError:
            return answers
        running = [r for r, p in enumerate(self._procs)
                   if r not in out and r not in failures and p.is_alive()]
        end = time.monotonic() + wait
        while time.monotonic() < end and set(answers) != set(running):
            try:
                rank, status, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                continue
            if status == "state":
                answers[rank] = payload
            elif status == "stage":
                self._stage[rank] = payload
            elif status == "error":
                failures[rank] = payload
        return answers

    _STAGES = {None: "had not started (its process was starting Python, importing torch)",
               "started": "was importing CrypTen",
               "rendezvous": "was waiting in the rendezvous to join the process group",
               "group": "was opening the secure links (TLS mesh)",
               "ready": "was ready"}

    def _timed_out(self, expected: str, limit: Optional[float], out, failures) -> PartyError:
        """The timeout error: start-up or run, who had finished, whom the others wait for."""
        states = self._proc_states()
        waits = {} if expected == "ready" else self._ask_wait_states(out, failures)
        self._kill()
        running = [r for r in range(self.world_size) if r not in out and r not in failures]
        stopped = [r for r in running if states.get(r, "").startswith("stopped")]
        limit_text = f"{limit:.0f} s" if limit is not None else "its deadline"
        if expected == "ready":
            order = list(self._STAGES)
            level = {r: order.index(self._stage.get(r)) for r in running}
            behind = [r for r in running if level[r] == min(level.values())]
            culprit = stopped[0] if len(stopped) == 1 else (
                behind[0] if len(behind) == 1 and len(set(level.values())) > 1 else None)
            lines = []
            for r in range(self.world_size):
                if r in failures:
                    lines.append(f"{self._who(r)} failed: {failures[r]['message'][:200]}")
                    continue
                text = f"{self._who(r)} {self._STAGES[self._stage.get(r)]}"
                if r in running and r in states and states[r] not in ("running", "sleeping"):
                    text += f"; its process is {states[r]}"
                lines.append(text)
            started = sorted(r for r in range(self.world_size) if r in self._stage)
            cause = (f"party start-up did not finish within {limit_text} (timeout: the "
                     f"parties import torch and CrypTen, join the group and open the TLS mesh); "
                     f"started: {started}, ready: {sorted(out)}, failed: {sorted(failures)}")
            if culprit in stopped:
                cause += f"; {self._who(culprit)} is {states[culprit]}"
            elif culprit is not None:
                cause += (f"; {self._who(culprit)} is behind the others: it "
                          f"{self._STAGES[self._stage.get(culprit)]}")
            return PartyError(culprit, cause, "\n".join(lines),
                              role=None if culprit is None else self.roles.of(culprit))
        waited_on = {int(peer): (r, w) for r, a in waits.items()
                     for peer, w in a.get("waits", {}).items()}
        busy = [r for r in running if r in waits and not waits[r].get("waits")]
        culprit = stopped[0] if len(stopped) == 1 else None
        if culprit is None:
            candidates = [r for r in busy if r in waited_on]
            culprit = candidates[0] if len(candidates) == 1 else None
        lines = []
        for r in running:
            text = self._who(r)
            if r in states and states[r].startswith("stopped"):
                text += f": its process is {states[r]}"
            elif r in waits and waits[r].get("waits"):
                text += ": waiting " + ", ".join(
                    f"{secs:.0f} s on party {peer} ({kind} at op {label!r})"
                    for peer, (kind, label, secs) in sorted(waits[r]["waits"].items()))
            elif r in waits:
                text += ": computing (waits on no link)"
            else:
                text += f": no answer (process {states.get(r, 'unknown')})"
            lines.append(text)
        cause = (f"timed out after {limit_text} (finished: {sorted(out)}, failed: "
                 f"{sorted(failures)}, still running: {running})")
        if culprit is not None:
            if culprit in stopped:
                cause += f"; {self._who(culprit)} is stopped ({states[culprit]})"
            else:
                r, (kind, label, secs) = waited_on[culprit]
                cause += (f"; the others wait for {self._who(culprit)}, which is computing "
                          f"(party {r} has waited {secs:.0f} s at op {label!r})")
        return PartyError(culprit, cause, "\n".join(lines),
                          role=None if culprit is None else self.roles.of(culprit))

    def _died(self, rank: int, proc, starting: bool) -> dict:
        """Why party ``rank`` exited: its own report if it died while starting, else the code."""
        path = os.path.join(self._tmp or "", f"boot-{rank}.json")
        if starting and self._tmp and os.path.exists(path):

            with open(path) as f:
                report = json.load(f)
            return {"type": report["type"], "message": report["message"], "time": time.time(),
                    "traceback": report.get("traceback", "")}
        message = f"process exited with code {proc.exitcode}"
        if starting:
            message += (" before it started (its own error is on stderr above; a script that "
                        "calls launch() needs an `if __name__ == \"__main__\":` guard)")
        return {"type": "died", "time": time.time(), "traceback": "", "message": message}

    def _error(self, failures: Dict[int, dict], states: Optional[Dict[int, str]] = None
               ) -> PartyError:
        """Blame the party that failed first and not merely because a peer went away; a
        party its peers found silent (stopped, frozen) is blamed unless one really failed."""
        states = states or {}

        def consequential(f):
            return bool(f.get("hung")) or any(s in f["message"] for s in _COMM_ERRORS)

        order = sorted(failures, key=lambda r: (consequential(failures[r]), failures[r]["time"]))
        first = failures[order[0]]
        hung = sorted((f for f in failures.values() if f.get("hung")), key=lambda f: f["time"])
        if consequential(first) and hung:
            h = hung[0]["hung"]
            peer = h["peer"]
            detectors = sorted({f["hung"]["rank"] for f in hung if f["hung"]["peer"] == peer})
            cause = (f"not responding: no message and no heartbeat for {h['silent_for']:.0f} s "
                     f"(hang_timeout {self.hang_timeout:g} s) while "
                     f"{'party' if len(detectors) == 1 else 'parties'} "
                     f"{' and '.join(map(str, detectors))} waited on it at op {h['label']!r}")
            if peer in states:
                cause += f"; its process is {states[peer]}"
            details = "; ".join(f"party {r}: {failures[r]['type']}: {failures[r]['message'][:300]}"
                                for r in order)
            return PartyError(peer, cause, details, role=self.roles.of(peer))
        others = "; ".join(f"party {r}: {failures[r]['type']}: {failures[r]['message'][:200]}"
                           for r in order[1:])
        details = first.get("traceback", "")
        if others:
            details += f"\nthen {others}"
        return PartyError(order[0], f"{first['type']}: {first['message']}", details.strip(),
                          role=self.roles.of(order[0]))


def launch(fn: Callable, *args, world_size: int = 3, roles: Roles = Roles(),
           crypten_config: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None,
           private: Optional[Dict[int, Dict[str, Any]]] = None,
           hang_timeout: Optional[float] = None, **kwargs) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` once in each of ``world_size`` parties.

    Locally, returns the list of every party's result (index = rank). Under
    ``torchrun`` the current process is one party: the list holds only this
    party's result at its rank (``None`` elsewhere), since results may be secret.
    ``private`` maps a rank to keyword arguments only that party receives.

    ``timeout`` (seconds) bounds the whole call, party start-up included; a start-up that
    does not finish in time raises :class:`PartyError` saying so and which parties had
    started (default: start-up within ``$CIPHERDM_START_TIMEOUT`` or 180 s, the run
    unbounded). ``hang_timeout`` (seconds; default ``$CIPHERDM_HANG_TIMEOUT`` or 60 s): a party
    that sends nothing, not even a heartbeat (one every ``hang_timeout / 4`` s), for that long
    while a peer waits on it (stopped, frozen, cut off) is named by :class:`PartyError`
    (``rank``, ``role``) about ``hang_timeout`` seconds after it stopped; a party that is
    merely computing keeps beating and is never reported.
    """
    if under_torchrun():
        rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if ws != world_size:
            raise ValueError(f"torchrun started {ws} processes but world_size={world_size}")
        init_party(rank, ws, "env://", roles, crypten_config, keys=os.environ.get("CIPHERDM_KEYS"),
                   hang_timeout=hang_timeout)
        results: List[Any] = [None] * ws
        results[rank] = fn(*args, **{**kwargs, **(private or {}).get(rank, {})})
        return results
    t0 = time.monotonic()
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    pool = PartyPool(world_size, roles, crypten_config, start_timeout=timeout,
                     hang_timeout=hang_timeout)
    tasks = pool._tasks_for(fn, args, kwargs, private)  # fail before starting any process
    try:
        pool.start()  # within `timeout` (the default start-up bound without one)
        pool._submit(tasks)
        return pool._collect("ok", None if timeout is None else t0 + timeout, timeout)
    finally:
        pool.close()
