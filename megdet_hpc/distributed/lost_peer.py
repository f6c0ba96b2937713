"""Tell a lost peer from a bug: a rank that died makes its peers' next collective fail.

Under torchrun (gloo) the survivor's collective raises ``RuntimeError: [.../gloo/transport/tcp/
pair.cc:545] Read error [127.0.0.1]:52963: Connection reset by peer`` deep in a CGBN layer: a
100-line traceback that names neither the dead rank nor what to do, and exit code 1 ("a bug").  It
is not a bug of this process, and not bad input either: ``run_cli`` prints one line from
``describe`` instead and exits ``EXIT_PEER_LOST``.  (mpirun and horovodrun end the whole job
themselves when a rank dies.)

The lost rank is named from what this host can see: under torchrun the ranks of a node are the
agent's children, so an expected local rank whose process is gone (or a zombie) is the lost one.  A
rank on another host is reported by the address in the transport's message.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading

# How gloo, NCCL and torch.distributed say that the other end of a connection went away (not
# "Connection refused": that is a rendezvous that never happened, a set-up problem).
_PATTERNS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited or there was a network error",
)
_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


def _chain(exc: BaseException | None):  # type: ignore[no-untyped-def]
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def transport_message(exc: BaseException) -> str | None:
    """The collective's "peer went away" message in ``exc``'s chain, or None (another failure)."""
    for link in _chain(exc):
        if isinstance(link, RuntimeError):  # torch's DistBackendError is one
            text = str(link)
            if any(p in text for p in _PATTERNS):
                return text
    return None


def shield_teardown(exc: BaseException) -> None:
    """After a lost peer, let this rank finish saying so: the launcher (torchrun) sends the
    survivors SIGTERM a fraction of a second after the death, which would otherwise kill this one
    silently in its teardown, before ``run_cli`` prints the line (its SIGKILL still follows)."""
    if transport_message(exc) is None or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def lost_local_ranks(environ: dict[str, str] | None = None) -> list[int]:
    """Ranks of this node that torchrun started and that are no longer running."""
    env = dict(os.environ if environ is None else environ)
    if "TORCHELASTIC_RUN_ID" not in env or "LOCAL_WORLD_SIZE" not in env:
        return []
    import psutil

    first = int(env["RANK"]) - int(env["LOCAL_RANK"])
    expected = set(range(first, first + int(env["LOCAL_WORLD_SIZE"])))
    alive: set[int] = set()
    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.Error:
        return []
    for proc in siblings:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            rank = proc.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and rank.isdigit():
            alive.add(int(rank))
    return sorted(expected - alive)


def describe(exc: BaseException) -> str | None:
    """One line for a failure caused by a lost peer (None for any other failure)."""
    text = transport_message(exc)
    if text is None:
        return None
    lost = lost_local_ranks()
    if lost:
        who = f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))}"
        where = f"{who} (on {socket.gethostname()}) is no longer running"
    else:
        match = _ADDRESS.search(text)
        where = f"a peer rank at {match[1]} stopped answering" if match else "a peer rank stopped answering"
    return (
        f"lost a peer: {where}, so this rank's collective failed; the job cannot go on -- see that "
        "rank's own output for why it ended, then resume (the newest checkpoint is kept)"
    )
