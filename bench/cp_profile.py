"""Profiling the control plane during bench/cp.py (`--profile DIR`), with py-spy.

`Recorder` runs `py-spy record --format raw` on a PID between `start` and `stop`; the raw
format is one collapsed stack a line (`frame;frame;... count`), which `summary` reads
into the functions with the most samples, on the stack (inclusive) and at its top (self).

    .venv/bin/pip install py-spy             # once
    .venv/bin/python bench/cp.py --sizes 1000 --profile /tmp/cp-profile
    .venv/bin/python bench/cp_profile.py /tmp/cp-profile/n1000-rounds.txt   # again, longer
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATE = 200  # samples a second


def py_spy() -> str | None:
    local = ROOT / ".venv" / "bin" / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Recorder:
    """One `py-spy record` of a process, from `start` to `stop`."""

    def __init__(self, binary: str, pid: int, output: Path) -> None:
        self.output = output
        self.log = output.with_suffix(".log")
        with self.log.open("wb") as log:
            # --nonblocking: the control plane is not paused for each sample, so its
            # timings stay close to an unprofiled run (a sample may be a little torn)
            self.proc = subprocess.Popen(
                [
                    binary,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(RATE),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(output),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> str | None:
        """Stop sampling and write the file; an error text if there is no profile."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self.output.exists():
            text = self.log.read_text(errors="replace").strip().splitlines()
            return "py-spy wrote no profile: " + (text[-1] if text else "no output")
        return None


_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """`function (path/to/module.py:LINE)` -> `module.py:function`, shorter for the table;
    a meshling frame keeps its package path (controlplane/distributor/core.py:build)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    short = path.split("meshling/", 1)[1] if "meshling/" in path else Path(path).name
    return f"{short}:{match.group('function')}"


def summary(path: Path, top: int = 15) -> str:
    """The functions with the most samples, inclusive and self, in percent of all."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f.strip()]
        # the first frames are the process and thread names py-spy adds
        frames = [f for f in frames if ":" in f] or frames
        total += count
        for name in set(frames):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
    if total == 0:
        return f"{path}: no samples"
    lines = [f"{path.name}: {total} samples at {RATE}/s (~{total / RATE:.1f} s on CPU or waiting)"]
    for title, counter in (("inclusive (on the stack)", inclusive), ("self (top frame)", own)):
        lines.append(f"  {title}:")
        for name, count in counter.most_common(top):
            lines.append(f"    {100 * count / total:5.1f}%  {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(summary(Path(name), top=30))
