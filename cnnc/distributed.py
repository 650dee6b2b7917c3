"""Many processes, one plan: MPI ranks that each own a contiguous block of logical devices.

Every rank walks the same programs in the same order (the executor's walk is a
function of the plan alone), runs the ops of its own devices, and turns each copy
whose two ends sit on different ranks into one host-staged message, sent when the
walk reaches the copy.  The kernels, and so every sum, are the single-process
ones in the single-process order, which keeps results bitwise independent of
the rank count.  Every wait has a deadline: a rank that dies or stops makes the
others fail with the rank and the operation named, never hang.

mpi4py is imported only when the process was started by an MPI launcher.
"""
from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from typing import Any, Callable

DEFAULT_TIMEOUT = 60.0          # seconds any one wait on another rank may take, at least...
STEP_TIMEOUTS = 10              # ...or this many of the last training step, when no timeout is given
_POLL = 1e-5, 1e-3              # seconds between polls of a pending message: first, at most

# what the common launchers (MPICH's Hydra, Open MPI, PMIx) put in every rank's environment
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")

_DATA, _COLLECTIVE = 1, 2       # message tags: copies, and exchanges of host results


class CommError(Exception):
    """Another rank did not answer in time, or the ranks cannot share this plan."""


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def launched_ranks() -> int:
    """How many ranks the launcher started (1 outside mpiexec), read from the environment
    so that a plain run never initialises MPI."""
    return _env_int(_SIZE_VARIABLES) or 1


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (0 outside mpiexec)."""
    return _env_int(_RANK_VARIABLES) or 0


def owned_devices(devices: list[int], rank: int, ranks: int) -> list[int]:
    """The contiguous block of logical devices rank `rank` of `ranks` owns."""
    if len(devices) % ranks:
        raise CommError(f"{ranks} ranks cannot share the plan's {len(devices)} logical devices: "
                        f"the number of ranks must divide it")
    per = len(devices) // ranks
    return devices[rank * per:(rank + 1) * per]


class Transport:
    """Host-staged messages between the ranks of MPI's COMM_WORLD, each wait bounded by `timeout`
    (None: the larger of DEFAULT_TIMEOUT and STEP_TIMEOUTS training steps)."""

    def __init__(self, timeout: float | None = None):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise CommError(f"started by mpiexec, but mpi4py cannot be imported ({e}); "
                            f"install cnnc[mpi]") from None
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)     # a lost rank becomes an exception that names it
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.adaptive = timeout is None
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._sends: list[Any] = []

    def step_took(self, seconds: float) -> None:
        """A training step's time, which a timeout left to the default grows with."""
        if self.adaptive:
            self.timeout = max(DEFAULT_TIMEOUT, STEP_TIMEOUTS * seconds)

    @property
    def root(self) -> bool:
        """Rank 0 alone writes files and shows progress."""
        return self.rank == 0

    def _await(self, ready: Callable[[], bool], peer: int | None, what: str) -> None:
        deadline, pause = time.monotonic() + self.timeout, _POLL[0]
        who = f"rank {peer}" if peer is not None else "another rank"
        while not self._guarded(ready, who, what):
            if time.monotonic() > deadline:
                raise CommError(f"rank {self.rank}: no answer from {who} within {self.timeout:g} s "
                                f"while waiting for {what}")
            time.sleep(pause)
            pause = min(2 * pause, _POLL[1])

    def _guarded(self, call: Callable[[], Any], who: str, what: str) -> Any:
        try:
            return call()
        except self._mpi.Exception as e:
            raise CommError(f"rank {self.rank}: lost {who} while waiting for {what} "
                            f"({e.Get_error_string().splitlines()[0]})") from None

    def send(self, value: Any, peer: int, tag: int = _DATA) -> None:
        """Start sending `value` to `peer` without waiting for it to be received."""
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.comm.isend(value, dest=peer, tag=tag))

    def recv(self, peer: int, what: str, tag: int = _DATA) -> Any:
        """The next value `peer` sent with `tag` (messages between two ranks arrive in order)."""
        self._await(lambda: self.comm.iprobe(source=peer, tag=tag), peer, what)
        return self._guarded(lambda: self.comm.recv(source=peer, tag=tag), f"rank {peer}", what)

    def allgather(self, value: Any, what: str) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        for peer in range(self.size):
            if peer != self.rank:
                self.send(value, peer, _COLLECTIVE)
        return [value if peer == self.rank else self.recv(peer, what, _COLLECTIVE) for peer in range(self.size)]

    def finish(self) -> None:
        """Wait for every message this rank sent to be taken, then for every rank to get here."""
        for request in self._sends:
            self._await(request.Test, None, "a message it sent to be received")
        self._sends = []
        self.allgather(None, "the other ranks to finish")


def transport_for_launch(timeout: float | None = None) -> Transport | None:
    """A transport when mpiexec started more than one rank, else None (one process runs it all)."""
    if launched_ranks() < 2:
        return None
    transport = Transport(timeout)
    return transport if transport.size > 1 else None


def abort_on_failure(fn: Callable) -> Callable:
    """Under mpiexec, a rank that exits with an error takes every rank down with it
    (MPI_Abort), so that no rank is left waiting on it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SystemExit as e:
            if e.code not in (0, None):
                _abort(e.code if isinstance(e.code, int) else 1)
            raise
        except Exception as e:
            code = getattr(e, "exit_code", None)    # click's usage errors, which click prints itself
            if code is None:                        # a bug: its traceback, then the job ends
                traceback.print_exc()
            _abort(code or 1)
            raise
    return wrapper


# MPI_Abort makes the launcher end the job at once, and its proxies drop output they have
# not yet forwarded: give them this long to forward this rank's last message first.
_FORWARD_GRACE_S = 0.5


def _abort(code: int) -> None:
    if launched_ranks() > 1 and "mpi4py.MPI" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(_FORWARD_GRACE_S)
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)
