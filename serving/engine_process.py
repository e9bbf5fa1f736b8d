"""The engine process: one EngineCore, driven by the commands the server sends over a socket.

Why a process: `ContinuousBatchingPipeline.step()` holds the GIL for the whole step, which in the
server's process stalled its event loop (measurements: bench/ANALYSIS.md, "Design notes").

Run as `python -m serving.engine_process FD`, FD being its end of a socket pair with the server. The
server keeps one such process started ahead (serving/engine.py's spare): its imports are done
before it is given a model.
Protocol (pickled tuples in multiprocessing.connection's framing):
  server -> engine: (label, log level, folder, adapters, settings, numerics properties) once, then
                    ("add", Job) | ("cancel", job id) | ("adapters", [AdapterSpec, ...]) | ("retire",) | ("close",)
  engine -> server: ("ready", None) or ("failed", message) once, then, after each step that produced
                    events or changed the running count,
                    ("events", [(job id, Event), ...], (steps, switches, cancelled, running)),
                    and ("adapters", None or the error) in answer to each "adapters" command
"retire" finishes the jobs in hand and exits; "close" cancels them and exits. The engine also
exits when the server's end of the socket closes (the server died).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import signal
import sys
from multiprocessing.connection import Connection

from serving.engine_core import AdapterSpec, EngineCore, Event


def main(fd: int) -> None:
    # Ctrl-C reaches the whole process group: the server decides when its engines stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A crash inside OpenVINO kills the process: its Python stack goes to the server's log, to say where.
    faulthandler.enable()
    conn = Connection(fd)
    try:
        label, log_level, folder, adapters, settings, numerics = conn.recv()
    except EOFError:
        return
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s engine {label}: %(message)s")
    try:
        core = EngineCore(folder, adapters, settings, numerics)
    except Exception as e:  # reported to the server, which reports the version as not loaded
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):  # the server is gone
        conn.send(("ready", None))
        _serve(conn, core)


def _serve(conn: Connection, core: EngineCore) -> None:
    retiring = False
    reported = 0  # the running count the server last heard of
    while True:
        events: list[tuple[int, Event]] = []
        # Wait for a command only when there is nothing to step nor to finish; else take what has arrived.
        timeout = 0.0 if core.busy or retiring else None
        while conn.poll(timeout):
            command = conn.recv()
            timeout = 0.0
            match command:
                case ("add", job):
                    events += core.add(job)
                case ("cancel", job_id):
                    events += core.cancel(job_id)
                case ("adapters", specs):
                    conn.send(("adapters", _set_adapters(core, specs)))
                case ("retire",):
                    retiring = True
                case ("close",):
                    events += core.cancel_all()
                    retiring = True
        if retiring and not core.busy:
            _send(conn, events, core)
            return
        events += core.step()
        if events or core.running != reported:  # a non-streaming request says nothing until it ends
            _send(conn, events, core)
            reported = core.running


def _set_adapters(core: EngineCore, specs: list[AdapterSpec]) -> str | None:
    try:
        core.set_adapters(specs)
    except Exception as e:  # an adapter file genai cannot read: the server builds a new engine or reports it
        return f"{type(e).__name__}: {e}"
    return None


def _send(conn: Connection, events: list[tuple[int, Event]], core: EngineCore) -> None:
    conn.send(("events", events, (core.steps, core.switches, core.cancelled, core.running)))


if __name__ == "__main__":
    main(int(sys.argv[1]))
