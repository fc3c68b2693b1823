"""The local simulation SuperLink that ``flwr run . NAME`` starts for an ``address = ":local:"`` connection.

Flower's CLI starts it detached (a ``flower-superlink --simulation`` and the
``flower-superexec`` that runs the apps) with its database under
``$FLWR_HOME/local-superlink/``, and leaves both running after the run. That path in
their command lines is how they are found and stopped here, by PID, without touching any
other SuperLink on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def flwr_home() -> Path:
    """``$FLWR_HOME``, or Flower's default ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def local_superlink_pids(home: Path) -> list[int]:
    """PIDs of the local SuperLink of ``home`` and of the SuperExecs whose parent it is."""
    marker = str(home.resolve() / "local-superlink") + os.sep
    links, execs = [], []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # ended while we looked
            continue
        words = [a.decode(errors="replace") for a in args if a]
        if any(w.endswith("flower-superlink") for w in words) and any(w.startswith(marker) for w in words):
            links.append(int(entry.name))
        elif any(w.endswith("flower-superexec") for w in words) and "--parent-pid" in words:
            execs.append((int(entry.name), words[words.index("--parent-pid") + 1]))
    return links + [pid for pid, parent in execs if parent.isdigit() and int(parent) in links]


def stop_local_superlink(home: Path | None = None, timeout_s: float = 10.0) -> list[int]:
    """Stop ``home``'s local SuperLink and its SuperExecs (SIGTERM, then SIGKILL); returns their PIDs."""
    pids = local_superlink_pids(home or flwr_home())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.1)
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            break
    return pids
