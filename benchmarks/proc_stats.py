"""What a process uses, from /proc (Linux), for the benchmarks that compare ours with a peer process.

    status_mb("self")   # {"VmRSS", "VmHWM", "Rss", "Anonymous", "file"} in MB
    cpu_seconds(pid)    # user + system CPU seconds of every thread
"""

from __future__ import annotations

import os
from pathlib import Path


def status_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS / VmHWM and the anonymous / file-backed split of the resident set, MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Anonymous:", "Rss:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    out["file"] = out.get("Rss", 0.0) - out.get("Anonymous", 0.0)
    return out


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used: on a shared machine the wall time of a
    run depends on what else runs, its CPU time much less (both sides are measured the same way)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
