"""Run argv in a new session; poll its whole process tree (driver, raylet, Ray workers) every 0.2 s; print wall,
the tree's CPU (user+sys incl. waited children, max seen per pid), peak tree RSS and the load average.

Ray's workers are children of the raylet, not waited for by the driver, so ``time``'s CPU misses them.

    python3 bench/tree_cpu.py python -m calib advise ... --backend ray --num-workers 2
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on


def tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            kids.setdefault(int(stat(int(p))[1]), []).append(int(p))
        except (OSError, IndexError):
            pass
    out, todo = [], [root]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += kids.get(q, [])
    return out


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main(argv: list[str]) -> int:
    t0, load0 = time.perf_counter(), load()
    proc = subprocess.Popen(argv, start_new_session=True)
    cpu: dict[int, float] = {}
    peak = 0
    while proc.poll() is None:
        rss = 0
        for q in tree(proc.pid):
            try:
                f = stat(q)
                cpu[q] = max(cpu.get(q, 0.0), sum(int(x) for x in f[11:15]) / TICK)  # utime stime cutime cstime
                rss += int(f[21]) * PAGE
            except (OSError, IndexError):
                pass
        peak = max(peak, rss)
        time.sleep(0.2)
    print(f"wall {time.perf_counter() - t0:.1f} s, cpu {sum(cpu.values()):.1f} s, peak tree RSS {peak / 2**20:.0f} MB, "
          f"load before {load0}, after {load()}, rc {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
