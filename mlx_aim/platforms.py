"""Every choice that depends on the platform, as small functions of a `Platform`, so that each is tested for Linux
x86-64, Linux aarch64 and macOS arm64 on whichever machine runs the tests.

mlx_aim runs on macOS on Apple silicon (Metal the default device, Accelerate for the CPU's BLAS) and on Linux (MLX's
CPU backend, for development and CI). What differs:

- the native CPU kernels (`csrc/`) are built on Linux only: on macOS Metal runs the model, and a CPU-stream run there
  takes MLX's own kernels;
- the BLAS shim and the preloaded OpenBLAS or MKL are for Linux x86-64, where MLX's wheel bundles a reference BLAS;
- thread counts: the CPUs this process may run on (Linux), the performance cores (Apple silicon);
- memory probes: ru_maxrss counts KiB on Linux and bytes on macOS; another process's resident memory comes from
  /proc on Linux and from libproc on macOS;
- the machine's description for benchmark records: /proc/cpuinfo on Linux, sysctl on macOS;
- the lock that keeps one writer at a time on a search index: flock(2) on both, and no other.

This module imports nothing of mlx (setup.py loads it before mlx is installed) and reads the machine only in the
`probe_*` functions and `current()`; the decisions are pure.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform as _platform
import resource
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Platform:
    system: str  # "linux" or "darwin" (sys.platform, without Linux's old version suffix)
    machine: str  # "x86_64", "aarch64" (Linux on ARM) or "arm64" (Apple silicon)

    @property
    def linux(self) -> bool:
        return self.system == "linux"

    @property
    def macos(self) -> bool:
        return self.system == "darwin"

    @property
    def apple_silicon(self) -> bool:
        return self.macos and self.machine == "arm64"


LINUX_X86_64 = Platform("linux", "x86_64")
LINUX_AARCH64 = Platform("linux", "aarch64")
MACOS_ARM64 = Platform("darwin", "arm64")


def current() -> Platform:
    system = "linux" if sys.platform.startswith("linux") else sys.platform
    return Platform(system, _platform.machine())


# ---------------------------------------------------------------------------------------------------
# Build and libraries


def native_kernels_skipped(p: Platform) -> Optional[str]:
    """None where `pip install` builds the native CPU kernels, else why it does not. They replace MLX's CPU kernels,
    which only run where the CPU is the device: Linux. On macOS the model runs on Metal, so building them would cost
    every install a second mlx (the one they must be compiled against) for kernels that Metal never runs."""
    if p.linux:
        return None
    if p.macos:
        return ("not built on macOS: Metal runs the model there, and a run on the CPU stream takes MLX's own "
                "kernels")
    return f"not built on {p.system}: only Linux's CPU backend uses them"


def builds_blas_shim(p: Platform) -> bool:
    """The BLAS shim (`csrc/blas_shim.c`) exists for the pip-installed OpenBLAS and MKL, wheels for Linux x86-64."""
    return p.linux and p.machine == "x86_64"


def blas_preload_skipped(p: Platform) -> Optional[str]:
    """None where mlx_aim preloads an optimized CBLAS for MLX (Linux: MLX's wheel bundles the reference BLAS), else
    why not."""
    if p.linux:
        return None
    if p.macos:
        return "not needed on macOS: MLX uses Accelerate there, and Metal for the model"
    return f"not needed on {p.system}"


def backend_paths(p: Platform) -> tuple[str, ...]:
    """The mlx_aim.backend paths a test can run here: "native" only where the kernels are built (Linux)."""
    paths = ("ops", "portable")
    return paths if native_kernels_skipped(p) else ("native",) + paths


# ---------------------------------------------------------------------------------------------------
# Threads


def compute_threads(p: Platform, *, affinity: Optional[int], performance_cores: Optional[int],
                    cpu_count: Optional[int]) -> int:
    """The threads a CPU-bound job should use: on Apple silicon the performance cores (an efficiency core is several
    times slower, and a multithreaded loop waits for its slowest share); on Linux the CPUs this process may run on
    (its affinity mask, which containers narrow), as measured on the development VMs."""
    if p.apple_silicon and performance_cores:
        return performance_cores
    if p.linux and affinity:
        return affinity
    return max(1, cpu_count or 1)


def loader_threads(p: Platform, compute: int) -> int:
    """Decoding threads of the data loaders. Linux keeps the 2 measured on 2-core VMs, where the model shares the
    CPU with them. On a Mac the model runs on the GPU and the CPU only decodes, so the performance cores do (at most
    8: past that JPEG decoding outruns any model this library runs)."""
    if p.macos:
        return max(2, min(8, compute))
    return 2


@functools.lru_cache(maxsize=1)
def probe_compute_threads() -> int:
    """`compute_threads` for this machine (probed once per process)."""
    p = current()
    affinity = len(os.sched_getaffinity(0)) if p.linux else None
    performance = _sysctl_int("hw.perflevel0.physicalcpu") if p.macos else None
    return compute_threads(p, affinity=affinity, performance_cores=performance, cpu_count=os.cpu_count())


# ---------------------------------------------------------------------------------------------------
# Memory


def maxrss_bytes(p: Platform, ru_maxrss: int) -> int:
    """getrusage's ru_maxrss in bytes: Linux counts it in KiB, macOS in bytes."""
    return int(ru_maxrss) if p.macos else int(ru_maxrss) * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory, in bytes (a forked or spawned child starts from its own)."""
    return maxrss_bytes(current(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child_peak_rss_bytes() -> int:
    """The largest peak resident memory of this process's waited-for children, in bytes."""
    return maxrss_bytes(current(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def resident_probe(p: Platform) -> str:
    """How another process's resident memory is read: Linux's /proc/PID/statm, macOS's libproc
    (proc_pid_rusage)."""
    return "statm" if p.linux else "libproc"


def memory_limits(p: Platform) -> tuple[str, ...]:
    """How a child that runs untrusted input is kept from taking the machine. Linux enforces an address-space limit
    (RLIMIT_AS: the allocation fails in the child, as a MemoryError), and a watchdog on resident memory backs it. macOS
    does not enforce RLIMIT_AS, so there the watchdog alone kills a child past its bound."""
    return ("address-space", "watchdog") if p.linux else ("watchdog",)


def child_start(p: Platform) -> str:
    """How a harness starts its children. "fork" from a server that imported the reader (and mlx.core) once: on
    Linux, MLX's CPU backend starts no thread at import, and a case costs no interpreter start. "spawn" (a fresh
    interpreter) on macOS, where importing mlx.core may already have touched Metal, which is not fork-safe."""
    return "fork" if p.linux else "spawn"


class _RusageInfoV0(ctypes.Structure):  # <libproc.h>, struct rusage_info_v0
    _fields_ = [("uuid", ctypes.c_uint8 * 16), ("user_time", ctypes.c_uint64), ("system_time", ctypes.c_uint64),
                ("pkg_idle_wkups", ctypes.c_uint64), ("interrupt_wkups", ctypes.c_uint64),
                ("pageins", ctypes.c_uint64), ("wired_size", ctypes.c_uint64), ("resident_size", ctypes.c_uint64),
                ("phys_footprint", ctypes.c_uint64), ("proc_start_abstime", ctypes.c_uint64),
                ("proc_exit_abstime", ctypes.c_uint64)]


_libproc = None


def resident_bytes(pid: int) -> Optional[int]:
    """Resident memory of process `pid` now, in bytes; None once it has exited."""
    if resident_probe(current()) == "statm":
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            return None
    global _libproc
    if _libproc is None:
        _libproc = ctypes.CDLL("/usr/lib/libproc.dylib", use_errno=True)
    info = _RusageInfoV0()
    if _libproc.proc_pid_rusage(int(pid), 0, ctypes.byref(info)) != 0:  # 0: RUSAGE_INFO_V0
        return None
    return int(info.resident_size)


def virtual_memory_bytes() -> int:
    """This process's mapped address space now (Linux: what RLIMIT_AS bounds), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------------
# File locks


def file_lock(p: Platform) -> Optional[str]:
    """How a process holds a folder for itself (one writer at a time on a search index): "flock", BSD flock(2), a
    whole-file advisory lock on Linux and macOS alike. The kernel drops it when its holder exits, killed or not, so
    a crashed writer never leaves the folder locked, and a waiting writer wakes as soon as it is free. None
    elsewhere: no lock is known there, and a writer refuses to start rather than risk interleaving."""
    return "flock" if p.linux or p.macos else None


def lock_file(fd: int, wait: bool) -> bool:
    """Takes the exclusive `file_lock` on the open file `fd`: True once held (closing `fd` releases it); False when
    another process holds it and not `wait` (with `wait`, blocks until it is free). OSError where this platform
    has no lock, or the file system refuses one."""
    here = current()
    if file_lock(here) != "flock":
        raise OSError(f"no file lock on {here.system}: a search index can only be written on Linux or macOS")
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# The machine, for benchmark records


def cpu_record(p: Platform, read_sysctl: Callable[[str], Optional[str]], cpuinfo: str) -> dict:
    """The CPU's model, and on Apple silicon its performance and efficiency core counts, from sysctl (macOS) or
    /proc/cpuinfo's text (Linux)."""
    if p.macos:
        record = {"cpu_model": read_sysctl("machdep.cpu.brand_string")}
        for key, name in (("performance_cores", "hw.perflevel0.physicalcpu"),
                          ("efficiency_cores", "hw.perflevel1.physicalcpu")):
            value = read_sysctl(name)
            if value is not None and value.strip().isdigit():
                record[key] = int(value)
        return {k: v for k, v in record.items() if v is not None}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Processor"):
            return {"cpu_model": value.strip()}
    return {}


def probe_cpu_record() -> dict:
    """`cpu_record` for this machine."""
    p = current()
    cpuinfo = ""
    if p.linux:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            pass
    return cpu_record(p, _sysctl, cpuinfo)


def _sysctl(name: str) -> Optional[str]:
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def _sysctl_int(name: str) -> Optional[int]:
    value = _sysctl(name)
    return int(value) if value is not None and value.isdigit() else None
