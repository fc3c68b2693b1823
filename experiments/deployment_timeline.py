"""Where a deployed message's latency goes: hop by hop, from the processes' DEBUG logs.

Run ``experiments/deployment_overhead.py`` with ``FLWR_LOG_LEVEL=DEBUG`` (Flower then
timestamps every log line, to the millisecond), then point this at one mode's directory:

    FLWR_LOG_LEVEL=DEBUG python experiments/deployment_overhead.py --modes model_holder_short_waits_prestarted \\
        --results runs/timeline
    python experiments/deployment_timeline.py runs/deployment_overhead/model_holder_short_waits_prestarted

For every message the server pushes (``Runtime.PushMessages`` in ``superlink.log``), in
seconds:

- ``pickup``: until the SuperNode's next ``Fleet.PullMessages``, its idle wait;
- ``objects``: until the SuperNode logs ``Received successfully`` (it has pulled the
  message's objects);
- ``clientapp``: until it logs ``Sending:`` (its ClientApp's reply is there: start,
  compute, the reply's transfer to the SuperNode);
- ``reply_push``: until ``Sent successfully`` (the reply's objects are at the SuperLink);
- ``server``: from there to the server's next push: its poll for the reply, the reply's
  pull, and its own work between messages (its polls interleave with the reply's object
  pushes, so they are not split out).

One SuperNode (``supernode-0.log``), messages one at a time, as the benchmark runs them.
"""

from __future__ import annotations

import argparse
import bisect
import re
import statistics
from datetime import datetime
from pathlib import Path

LINE = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s*:\s*(.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
HOPS = ("pickup", "objects", "clientapp", "reply_push", "server")


def events(log: Path) -> list[tuple[float, str]]:
    """(seconds since the epoch, message) of every timestamped line of ``log``."""
    found = []
    for raw in log.read_text(errors="replace").splitlines():
        match = LINE.match(ANSI.sub("", raw).strip())
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((stamp, match.group(2).strip()))
    return found


def times(found: list[tuple[float, str]], text: str) -> list[float]:
    return [t for t, message in found if message.startswith(text)]


def after(sorted_times: list[float], t: float) -> float | None:
    """The first of ``sorted_times`` at or after ``t``."""
    i = bisect.bisect_left(sorted_times, t)
    return sorted_times[i] if i < len(sorted_times) else None


def timeline(mode_dir: Path) -> list[dict[str, float]]:
    """Per message the server pushed, the seconds each hop took (``HOPS``); messages not answered are left out."""
    link, node = events(mode_dir / "superlink.log"), events(mode_dir / "supernode-0.log")
    if not link or not node:
        raise SystemExit(f"no timestamped lines in {mode_dir}: run the benchmark with FLWR_LOG_LEVEL=DEBUG")
    pushes = times(link, "Runtime.PushMessages")
    node_pulls = times(link, "[Fleet.PullMessages] node_id")
    received, sending, sent = (
        times(node, "Received successfully"),
        times(node, "Sending:"),
        times(node, "Sent successfully"),
    )
    rows = []
    for push, next_push in zip(pushes, [*pushes[1:], float("inf")], strict=True):
        marks = [push]
        for series in (node_pulls, received, sending, sent):
            mark = after(series, marks[-1])
            if mark is None or mark > next_push:
                break
            marks.append(mark)
        else:
            marks.append(next_push)
            if next_push == float("inf"):
                continue
            rows.append({hop: round(b - a, 3) for hop, a, b in zip(HOPS, marks[:-1], marks[1:], strict=True)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode_dir", type=Path, help="one mode's directory under deployment_overhead.py's --work")
    rows = timeline(parser.parse_args().mode_dir)
    print("| message | " + " | ".join(HOPS) + " |")
    print("| --- " * (len(HOPS) + 1) + "|")
    for i, row in enumerate(rows, 1):
        print(f"| {i} | " + " | ".join(f"{row[h]:.3f}" for h in HOPS) + " |")
    if rows:
        print("| median | " + " | ".join(f"{statistics.median(r[h] for r in rows):.3f}" for h in HOPS) + " |")


if __name__ == "__main__":
    main()
