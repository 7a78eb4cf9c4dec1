"""Runs one command and measures the tool itself, apart from the VMs and
other programs it starts.

What is counted (see bench/README.md, "What is measured"):

* wall time: from just before the command is spawned until it has exited.
* The *tool's own processes* are the root process and every descendant whose
  executable (/proc/PID/exe) is the same file as the root's: for imgbuild
  that is the imgbuild process alone; for Packer 1.6.6 it is `packer` and
  its plugin subprocesses (`packer plugin packer-builder-qemu`, ...), which
  are the same /usr/bin/packer binary.
* Every other descendant is *external* (qemu-system-x86_64, qemu-img, docker
  CLI, ssh, sh, ...), reported per command name. Processes that are not
  descendants (the Docker engine, containers, moto) are not in the tree;
  bench.py reports the engine's CPU separately.
* CPU time: utime + stime from /proc/PID/stat. For every PID the last value
  seen is kept (a process's stat covers all its threads, dead or alive), and
  the values are summed per group. The root process is held as a zombie
  (waitid WNOWAIT) when it exits, so its final value is read exactly;
  descendants are sampled every `interval` (50 ms), so the last < 50 ms of
  a short-lived child can be missed.
* Peak memory:
    - `own_peak_pss`: the largest sum of PSS (/proc/PID/smaps_rollup: RSS
      with each shared page divided among the processes mapping it) over
      the tool's own processes in one sample;
    - `own_peak_rss`: the largest sum of RSS over the tool's own processes
      seen in one sample (the tool's total footprint at one moment);
    - `own_max_hwm`: the largest VmHWM (the kernel's exact per-process RSS
      high-water mark) of any one own process -- for imgbuild, the exact peak
      RSS of the imgbuild process;
    - `external_peak_rss`: the largest sum of RSS over external processes in
      one sample.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def read_stat(pid: int):
    """(comm, ppid, utime+stime ticks, rss bytes, starttime) or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split at the last ')'.
    close = data.rfind(b")")
    comm = data[data.find(b"(") + 1 : close].decode(errors="replace")
    rest = data[close + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12])  # utime (14) + stime (15)
    starttime = int(rest[19])  # field 22
    rss = int(rest[21]) * PAGE  # field 24
    return comm, ppid, ticks, rss, starttime


def read_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_pss(pid: int) -> int:
    """Proportional set size: RSS with shared pages divided among the
    processes sharing them (so Packer's plugins, which map the same binary,
    are not counted several times)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def exe_of(pid: int):
    try:
        st = os.stat(f"/proc/{pid}/exe")
        return (st.st_dev, st.st_ino)
    except OSError:
        return None


def exe_name(pid: int, comm: str) -> str:
    """The executable's file name (QEMU renames its process with -name)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        return comm


@dataclass
class ProcInfo:
    comm: str
    own: bool
    ticks: int = 0
    max_rss: int = 0
    hwm: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class Result:
    returncode: int
    wall_s: float
    own_cpu_s: float
    own_peak_rss: int
    own_peak_pss: int
    own_max_hwm: int
    own_processes: int
    external_cpu_s: float
    external_peak_rss: int
    external: dict  # executable name -> {"cpu_s", "max_rss", "count"}
    samples: int
    lines: list = field(default_factory=list)  # (t_since_start, text)
    timed_out: bool = False

    def to_json(self):
        return {
            "returncode": self.returncode,
            "wall_s": round(self.wall_s, 3),
            "own_cpu_s": round(self.own_cpu_s, 3),
            "own_peak_rss_mib": round(self.own_peak_rss / 2**20, 2),
            "own_peak_pss_mib": round(self.own_peak_pss / 2**20, 2),
            "own_max_hwm_mib": round(self.own_max_hwm / 2**20, 2),
            "own_processes": self.own_processes,
            "external_cpu_s": round(self.external_cpu_s, 3),
            "external_peak_rss_mib": round(self.external_peak_rss / 2**20, 2),
            "external": {
                k: {
                    "cpu_s": round(v["cpu_s"], 3),
                    "max_rss_mib": round(v["max_rss"] / 2**20, 2),
                    "count": v["count"],
                }
                for k, v in sorted(self.external.items())
            },
            "samples": self.samples,
            "timed_out": self.timed_out,
        }


def _descendants(root: int):
    """PIDs of root's descendants (not root), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        st = read_stat(pid)
        if st is None:
            continue
        stats[pid] = st
        children.setdefault(st[1], []).append(pid)
    out = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out, stats


def run(
    argv,
    *,
    cwd=None,
    env=None,
    log_path=None,
    interval=0.05,
    timeout=None,
    on_line=None,
) -> Result:
    """Runs argv, sampling its process tree every `interval` seconds.

    stdout and stderr go (merged) to `log_path`; every line is also kept
    with the time it arrived, relative to the start.
    """
    log = open(log_path, "w", buffering=1) if log_path else None
    lines: list = []
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    root = proc.pid

    def reader():
        for raw in iter(proc.stdout.readline, b""):
            t = time.monotonic() - start
            text = raw.decode(errors="replace").rstrip("\n")
            lines.append((t, text))
            if log:
                log.write(f"[{t:9.3f}] {text}\n")
            if on_line:
                on_line(text)

    reader_thread = threading.Thread(target=reader, daemon=True)
    reader_thread.start()

    root_exe = None
    procs: dict[tuple, ProcInfo] = {}  # (pid, starttime) -> info
    own_peak = 0
    own_pss_peak = 0
    ext_peak = 0
    samples = 0
    timed_out = False

    def sample(pids_stats, root_stat):
        nonlocal own_peak, own_pss_peak, ext_peak, samples, root_exe
        now = time.monotonic() - start
        own_sum = 0
        own_pss = 0
        ext_sum = 0
        entries = []
        if root_stat is not None:
            entries.append((root, root_stat))
        entries.extend(pids_stats)
        for pid, st in entries:
            comm, _ppid, ticks, rss, starttime = st
            key = (pid, starttime)
            info = procs.get(key)
            if pid == root:
                if info is None:
                    root_exe = root_exe or exe_of(pid)
                    info = procs[key] = ProcInfo(comm=comm, own=True, first_seen=now)
            else:
                # Looked at every time: a child seen between fork and exec
                # still runs the tool's executable.
                exe = exe_of(pid)
                own = exe is not None and exe == root_exe
                if info is None:
                    info = procs[key] = ProcInfo(comm=exe_name(pid, comm), own=own, first_seen=now)
                elif info.own != own and exe is not None:
                    info.own = own
                    info.comm = exe_name(pid, comm)
            info.ticks = max(info.ticks, ticks)
            info.max_rss = max(info.max_rss, rss)
            info.last_seen = now
            if info.own:
                own_sum += rss
                own_pss += read_pss(pid)
                info.hwm = max(info.hwm, read_hwm(pid))
            else:
                ext_sum += rss
        own_peak = max(own_peak, own_sum)
        own_pss_peak = max(own_pss_peak, own_pss)
        ext_peak = max(ext_peak, ext_sum)
        samples += 1

    while True:
        # Has the root exited? Leave it a zombie so its stat can be read.
        try:
            info = os.waitid(os.P_PID, root, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
        exited = info is not None
        pids, stats = _descendants(root)
        root_stat = stats.get(root) or read_stat(root)
        sample([(p, stats[p]) for p in pids if p in stats], root_stat)
        if exited:
            break
        if timeout is not None and time.monotonic() - start > timeout:
            timed_out = True
            try:
                os.killpg(root, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(root, signal.SIGKILL)
            break
        time.sleep(interval)

    returncode = proc.wait()
    wall = time.monotonic() - start
    reader_thread.join(timeout=10)
    if log:
        log.close()

    own_ticks = sum(i.ticks for i in procs.values() if i.own)
    ext_ticks = sum(i.ticks for i in procs.values() if not i.own)
    external: dict = {}
    for i in procs.values():
        if i.own:
            continue
        e = external.setdefault(i.comm, {"cpu_s": 0.0, "max_rss": 0, "count": 0})
        e["cpu_s"] += i.ticks / CLK_TCK
        e["max_rss"] = max(e["max_rss"], i.max_rss)
        e["count"] += 1
    return Result(
        returncode=returncode,
        wall_s=wall,
        own_cpu_s=own_ticks / CLK_TCK,
        own_peak_rss=own_peak,
        own_peak_pss=own_pss_peak,
        own_max_hwm=max((i.hwm for i in procs.values() if i.own), default=0),
        own_processes=sum(1 for i in procs.values() if i.own),
        external_cpu_s=ext_ticks / CLK_TCK,
        external_peak_rss=ext_peak,
        external=external,
        samples=samples,
        lines=lines,
        timed_out=timed_out,
    )


if __name__ == "__main__":
    import json
    import sys

    r = run(sys.argv[1:])
    for _, line in r.lines:
        print(line)
    print(json.dumps(r.to_json(), indent=2))
