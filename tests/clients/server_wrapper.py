"""Run the server as a client library starts it, and record how it ended.

    server_wrapper.py RECORD_DIR COMMAND [ARG ...]

A client library starts ``COMMAND`` (through a launcher that execs this), talks to it over stdin and
stdout, and on exit closes stdin and waits; mcp 1.x then sends SIGTERM to the process group after
2 s, and SIGKILL 2 s later. This process hands its stdin and stdout to the server alone (so the client
sees the server's end of the pipes, not ours) and writes ``RECORD_DIR/<own pid>.json``:
``{"server_pid": ..., "signals": [...], "status": ...}``. ``signals`` lists every signal the client sent
(forwarded to the server, so that the client still gets what it asked for); ``status`` is the server's
exit status (negative: killed by that signal), and stays null when this process was killed first
(SIGKILL to the group: the record then says the server never exited by itself).

Standard library only: it runs under the test venv's interpreter, whatever the client's venv is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any


def main(argv: list[str]) -> int:
    record_dir, command = Path(argv[1]), argv[2:]
    record = record_dir / f"{os.getpid()}.json"
    state: dict[str, Any] = {"server_pid": None, "signals": [], "status": None, "started": time.time()}

    def write() -> None:
        partial = record.with_suffix(".tmp")
        partial.write_text(json.dumps(state), encoding="utf-8")
        partial.replace(record)

    server = subprocess.Popen(command)
    state["server_pid"] = server.pid
    write()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)

    def forward(signum: int, _frame: FrameType | None) -> None:
        state["signals"].append(signal.Signals(signum).name)
        state.setdefault("first_signal", time.time())
        write()
        server.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    status = server.wait()
    state["status"] = status
    state["ended"] = time.time()
    write()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
