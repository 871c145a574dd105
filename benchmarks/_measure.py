"""Measuring tools for benchmarks/run.py: the simulator in its own process, child runs with
their process tree's peak memory and CPU, and the machine description.

Standard library only (and no mkt_assets import): importing ``mkt_assets`` loads Dagster and
builds the definitions, and the harness must stay light so it does not compete for the two
cores with what it measures.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# Clock ticks per second for the utime/stime fields of /proc/<pid>/stat and /proc/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# How often the process tree is sampled. VmHWM is the kernel's own high-water mark, so a
# coarse interval only misses growth in a process's last interval before it exits.
SAMPLE_SECONDS = 0.05


# ===================================================================== /proc readers


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError:  # the process exited between listing and reading
        return None


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    session: int
    cpu_seconds: float  # user + system, this process only


def read_stat(pid: int) -> ProcStat | None:
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): ppid is 4, session 6, utime 14, stime 15.
    return ProcStat(
        ppid=int(fields[1]),
        session=int(fields[3]),
        cpu_seconds=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
    )


def read_memory_kb(pid: int) -> tuple[int, int] | None:
    """(VmHWM, VmRSS) in kB: the peak and current resident set of the process."""
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    values = dict(re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", text, re.MULTILINE))
    if not values:
        return None  # a zombie has no memory lines
    return int(values.get("VmHWM", 0)), int(values.get("VmRSS", 0))


def read_cmdline(pid: int) -> str:
    text = _read(f"/proc/{pid}/cmdline") or ""
    return text.replace("\0", " ").strip()


def system_busy_seconds() -> float:
    """CPU seconds spent busy by all cores since boot (idle and iowait excluded)."""
    first = (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]
    ticks = [int(value) for value in first[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    stat = read_stat(pid)
    return stat.cpu_seconds if stat else 0.0


# ===================================================================== process tree monitor


@dataclass
class ProcessRecord:
    """What was seen of one process of a measured tree."""

    pid: int
    ppid: int
    cmdline: str
    peak_kb: int = 0  # max VmHWM seen (VmRSS too, in case a read caught RSS above an older HWM)
    cpu_seconds: float = 0.0  # last utime+stime seen
    kind: str = ""

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


class TreeMonitor:
    """Polls /proc for every process of a session (the measured child is started with
    ``start_new_session=True``, so its session id is its pid and every descendant inherits it,
    including multiprocessing's spawn children) and keeps each one's peak memory."""

    def __init__(self, session: int, interval: float = SAMPLE_SECONDS) -> None:
        self.session = session
        self.interval = interval
        self.processes: dict[int, ProcessRecord] = {}
        self._outsiders: set[int] = set()  # pids already seen not to belong: not re-read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-monitor", daemon=True)

    def __enter__(self) -> TreeMonitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in self._outsiders:
                continue
            record = self.processes.get(pid)
            stat = read_stat(pid)
            if stat is None:
                continue
            if record is None:
                if stat.session != self.session:
                    self._outsiders.add(pid)
                    continue
                record = self.processes[pid] = ProcessRecord(pid, stat.ppid, read_cmdline(pid))
            if not record.cmdline:
                record.cmdline = read_cmdline(pid)
            record.cpu_seconds = max(record.cpu_seconds, stat.cpu_seconds)
            memory = read_memory_kb(pid)
            if memory is not None:
                record.peak_kb = max(record.peak_kb, *memory)

    def cpu_seconds(self) -> float:
        return sum(record.cpu_seconds for record in self.processes.values())


# ===================================================================== measured child runs


def _reaped_children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Measured:
    """One child run: its wall time, exit code, processes and the load around it."""

    command: list[str]
    pid: int  # the child started; its session holds every process measured
    started_at: float  # time.time() just before it started, to place its events on a timeline
    seconds: float
    returncode: int
    log_path: Path
    processes: list[ProcessRecord]
    cpu_seconds: float  # the measured tree's CPU (see run_measured)
    simulator_cpu_seconds: float
    other_cpu_seconds: float  # everything else on the machine: other users' noise
    sampled_cpu_seconds: float = 0.0  # the tree's CPU as the 50 ms samples saw it (<= cpu_seconds)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def peak_mb(self) -> float:
        return max((process.peak_mb for process in self.processes), default=0.0)


class ChildFailed(RuntimeError):
    def __init__(self, message: str, measured: Measured | None = None) -> None:
        super().__init__(message)
        self.measured = measured  # what was seen of the failed run: its peaks still count


def run_measured(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    timeout: float,
    simulator_pid: int | None = None,
) -> Measured:
    """Run ``command`` to completion, sampling its whole process tree; raise if it fails."""
    busy_before = system_busy_seconds()
    simulator_before = process_cpu_seconds(simulator_pid) if simulator_pid else 0.0
    # The kernel's account of every descendant reaped so far: the measured child's, once it
    # is waited for, includes every process of its tree that was waited for in turn. One
    # measured child runs at a time and the simulator is only reaped at its end, so the
    # difference across the run is the tree's CPU.
    reaped_before = _reaped_children_cpu()
    with open(log_path, "wb") as log:
        started_at = time.time()
        started = time.perf_counter()
        # A new session: the monitor finds every descendant by session id, and a timeout
        # can kill the whole group the benchmark started, and nothing else.
        child = subprocess.Popen(
            list(command), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        with TreeMonitor(child.pid) as monitor:
            try:
                returncode = child.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise ChildFailed(f"timed out after {timeout:.0f}s: {' '.join(command)} (log: {log_path})") from None
            seconds = time.perf_counter() - started
    busy = system_busy_seconds() - busy_before
    simulator_cpu = (process_cpu_seconds(simulator_pid) - simulator_before) if simulator_pid else 0.0
    # Sampling misses the CPU a process spends after its last sample (all of it for one that
    # lives under 50 ms, as many short helpers do); the reaped account misses only processes
    # that left the tree (daemonized, re-parented). The larger of the two is closer.
    sampled_cpu = monitor.cpu_seconds()
    tree_cpu = max(sampled_cpu, _reaped_children_cpu() - reaped_before)
    measured = Measured(
        command=list(command),
        pid=child.pid,
        started_at=started_at,
        seconds=seconds,
        returncode=returncode,
        log_path=log_path,
        processes=sorted(monitor.processes.values(), key=lambda record: record.pid),
        cpu_seconds=tree_cpu,
        simulator_cpu_seconds=simulator_cpu,
        other_cpu_seconds=max(0.0, busy - tree_cpu - simulator_cpu),
        sampled_cpu_seconds=sampled_cpu,
    )
    if returncode != 0:
        tail = "".join(measured.log().splitlines(keepends=True)[-40:])
        raise ChildFailed(
            f"exit {returncode} after {seconds:.0f}s, peak RSS {measured.peak_mb():.0f} MB: {' '.join(command)}\n{tail}",
            measured,
        )
    return measured


# ===================================================================== the simulator


@dataclass
class Simulator:
    """``mkt-assets sandbox`` in its own process, so its CPU and memory are never counted in
    the process being measured."""

    process: subprocess.Popen[bytes]
    base_url: str
    contacts: int
    latency: float
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGTERM, not SIGINT: a shell starting the benchmark in the background makes its
            # children ignore SIGINT. The simulator holds nothing that needs a clean close.
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def simulator(
    contacts: int, *, latency: float, api_key: str, log_dir: Path, env: Mapping[str, str], startup_timeout: float = 180.0,
    extra: Sequence[str] = (),
) -> Iterator[Simulator]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"simulator-{contacts}-{latency:g}-{time.monotonic_ns()}.log"
    command = [
        sys.executable, "-m", "mkt_assets.cli", "sandbox",
        "--port", "0", "--contacts", str(contacts), "--latency", repr(latency), *extra,
    ]  # fmt: skip
    # The key goes by environment, not argv, so it is not on every `ps` listing.
    child_env = {**env, "MKT_API_KEY": api_key}
    with open(log_path, "wb") as log:
        # stdout to a file, not a pipe: nobody would drain a pipe after the first line.
        process = subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    running = Simulator(process, "", contacts, latency, log_path)
    try:
        running.base_url = _wait_for_url(running, startup_timeout)
        yield running
    finally:
        running.stop()


def _wait_for_url(running: Simulator, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"serving (\S+)", running.log_path.read_text(errors="replace"))
        if match:
            return match.group(1)
        if running.process.poll() is not None:
            raise ChildFailed(f"the simulator exited ({running.process.returncode}): {running.log_path.read_text()}")
        time.sleep(0.1)
    raise ChildFailed(f"the simulator printed no 'serving <url>' in {timeout:.0f}s ({running.log_path})")


# ===================================================================== the machine


@dataclass
class Machine:
    cpu_model: str
    cores: int
    usable_cores: int
    ram_gb: float
    kernel: str
    python: str
    versions: dict[str, str] = field(default_factory=dict)
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def lines(self) -> list[str]:
        packages = ", ".join(f"{name} {version}" for name, version in self.versions.items())
        return [
            f"CPU:     {self.cpu_model} ({self.cores} cores, {self.usable_cores} usable by this process)",
            f"RAM:     {self.ram_gb:.1f} GB; kernel {self.kernel}",
            f"Python:  {self.python}; {packages}",
            f"Load:    {self.load_average[0]:.2f} {self.load_average[1]:.2f} {self.load_average[2]:.2f}"
            " (1/5/15 min averages when the benchmark started)",
        ]


def describe_machine() -> Machine:
    cpuinfo = _read("/proc/cpuinfo") or ""
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = _read("/proc/meminfo") or ""
    total_kb = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    versions = {}
    for package in ("dagster", "dagster-duckdb", "duckdb", "requests"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return Machine(
        cpu_model=models[0] if models else platform.processor() or "unknown",
        cores=os.cpu_count() or 0,
        usable_cores=len(os.sched_getaffinity(0)),
        ram_gb=int(total_kb.group(1)) / 1024 / 1024 if total_kb else 0.0,
        kernel=platform.release(),
        python=f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        versions=versions,
        load_average=os.getloadavg(),
    )
