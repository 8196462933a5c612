"""Run one job as its own process and measure it: wall time and peak RSS of the whole process tree.

Linux only (reads /proc). Also records the CPU time (user + system) of the tree from
``getrusage(RUSAGE_CHILDREN)``, which other work on a shared machine disturbs less than wall time. The tree is the job's process plus every descendant alive at each poll
(polled every ``interval_s``); the peak is the largest sum of their resident set sizes seen at one poll.
``ru_maxrss`` of the children (the largest single process, from the kernel) is recorded beside it as a
cross-check: a short-lived spike between two polls still shows there.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class JobRun:
    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float
    max_single_rss_mb: float
    cpu_s: float
    killed_reason: str | None = None
    stderr_tail: str = ""
    stdout_tail: str = ""
    extra: dict = field(default_factory=dict)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        rest = stat[stat.rfind(b")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(entry.name))
    return kids


def tree_pids(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(root: int) -> int:
    return sum(rss_bytes(p) for p in tree_pids(root))


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


def run_measured(
    argv: list[str],
    *,
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 3600.0,
    mem_limit_mb: float = 10240.0,
    interval_s: float = 0.05,
) -> JobRun:
    """Run ``argv`` in a new session; kill the whole tree past ``timeout_s`` or ``mem_limit_mb``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = ru0.ru_maxrss
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        peak, killed = 0, None
        while proc.poll() is None:
            rss = tree_rss_bytes(proc.pid)
            peak = max(peak, rss)
            elapsed = time.perf_counter() - t0
            if rss > mem_limit_mb * 2**20:
                killed = f"killed: process tree RSS {rss / 2**20:.0f} MB passed the memory guard of {mem_limit_mb:.0f} MB after {elapsed:.0f} s"
            elif elapsed > timeout_s:
                killed = f"killed: still running after the time limit of {timeout_s:.0f} s"
            if killed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                break
            time.sleep(interval_s)
        wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = ru1.ru_maxrss
    # user+system CPU seconds of the job and every descendant it waited for: less sensitive than wall time
    # to other work sharing the machine
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    # ru_maxrss of children is the max over all waited-for children so far (KiB on Linux): it only tells
    # this job's figure when it rose during the job.
    single = after / 1024 if after > before else float("nan")
    return JobRun(
        argv=[str(a) for a in argv],
        returncode=proc.returncode,
        wall_s=wall,
        peak_rss_mb=peak / 2**20,
        max_single_rss_mb=single,
        cpu_s=cpu,
        killed_reason=killed,
        stderr_tail=_tail(err_path),
        stdout_tail=_tail(out_path, 2000),
    )
