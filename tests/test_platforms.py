"""Every platform-dependent choice (mlx_aim/platforms.py) for Linux x86-64, Linux aarch64 and macOS arm64, whatever
machine runs the tests; that the package follows those choices here; and that no module reaches for a
platform-specific facility (/proc, LD_*, RLIMIT_AS, fork, dlopen, sched_getaffinity, sys.platform) outside the places
that decide it per platform."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_aim import _blas, platforms
from mlx_aim.backend import native
from mlx_aim.apps.benchmark import torch_synchronizer
from mlx_aim.platforms import LINUX_AARCH64, LINUX_X86_64, MACOS_ARM64, Platform
from mlx_aim.checkpoints.weights import cast_weight

ROOT = Path(__file__).resolve().parents[1]
ALL = (LINUX_X86_64, LINUX_AARCH64, MACOS_ARM64)


def _by_platform(decide) -> dict:
    return {p: decide(p) for p in ALL}


def test_native_kernels_are_built_on_linux_only():
    skipped = _by_platform(platforms.native_kernels_skipped)
    assert skipped[LINUX_X86_64] is None and skipped[LINUX_AARCH64] is None
    assert "not built on macOS" in skipped[MACOS_ARM64]
    assert "not built on win32" in platforms.native_kernels_skipped(Platform("win32", "AMD64"))


def test_blas_shim_and_preload():
    assert _by_platform(platforms.builds_blas_shim) == {LINUX_X86_64: True, LINUX_AARCH64: False,
                                                        MACOS_ARM64: False}
    preload = _by_platform(platforms.blas_preload_skipped)
    assert preload[LINUX_X86_64] is None and preload[LINUX_AARCH64] is None
    assert "Accelerate" in preload[MACOS_ARM64]


def test_backend_paths_a_test_can_run():
    assert _by_platform(platforms.backend_paths) == {LINUX_X86_64: ("native", "ops", "portable"),
                                                     LINUX_AARCH64: ("native", "ops", "portable"),
                                                     MACOS_ARM64: ("ops", "portable")}


def test_thread_counts_come_from_the_machine():
    probes = dict(affinity=3, performance_cores=None, cpu_count=8)
    assert platforms.compute_threads(LINUX_X86_64, **probes) == 3  # a container's affinity mask, not the host's 8
    assert platforms.compute_threads(LINUX_AARCH64, **probes) == 3
    apple = dict(affinity=None, performance_cores=6, cpu_count=12)
    assert platforms.compute_threads(MACOS_ARM64, **apple) == 6  # the efficiency cores left out
    assert platforms.compute_threads(MACOS_ARM64, affinity=None, performance_cores=None, cpu_count=10) == 10
    assert platforms.compute_threads(LINUX_X86_64, affinity=None, performance_cores=None, cpu_count=None) == 1
    assert [platforms.loader_threads(LINUX_X86_64, n) for n in (1, 2, 64)] == [2, 2, 2]  # as measured
    assert [platforms.loader_threads(MACOS_ARM64, n) for n in (1, 6, 12)] == [2, 6, 8]


def test_the_thread_defaults_in_use_here():
    import mlx_aim.data
    import mlx_aim.apps.scaling

    here = platforms.current()
    assert platforms.probe_compute_threads() >= 1
    assert mlx_aim.data.NUM_WORKERS == platforms.loader_threads(here, platforms.probe_compute_threads())
    assert mlx_aim.apps.scaling.PRETRAIN_COMPUTE_THREADS == max(1, platforms.probe_compute_threads() - 1)


def test_memory_probes():
    assert platforms.maxrss_bytes(LINUX_X86_64, 10) == 10 * 1024  # KiB on Linux
    assert platforms.maxrss_bytes(MACOS_ARM64, 10) == 10  # bytes on macOS
    assert _by_platform(platforms.resident_probe) == {LINUX_X86_64: "statm", LINUX_AARCH64: "statm",
                                                      MACOS_ARM64: "libproc"}
    assert _by_platform(platforms.memory_limits) == {LINUX_X86_64: ("address-space", "watchdog"),
                                                     LINUX_AARCH64: ("address-space", "watchdog"),
                                                     MACOS_ARM64: ("watchdog",)}
    assert _by_platform(platforms.child_start) == {LINUX_X86_64: "fork", LINUX_AARCH64: "fork",
                                                   MACOS_ARM64: "spawn"}


def test_memory_probes_here():
    import os

    before = platforms.peak_rss_bytes()
    block = np.ones(64 << 20, np.uint8)  # 64 MiB, every page written
    assert platforms.peak_rss_bytes() >= before + (60 << 20) or before > (64 << 20)
    resident = platforms.resident_bytes(os.getpid())
    assert resident is not None and resident >= (64 << 20)
    del block
    assert platforms.resident_bytes(2**22 + 12345) is None  # no such process


def test_cpu_record_for_benchmarks():
    sysctl = {"machdep.cpu.brand_string": "Apple M3 Pro", "hw.perflevel0.physicalcpu": "6",
              "hw.perflevel1.physicalcpu": "6"}
    assert platforms.cpu_record(MACOS_ARM64, sysctl.get, "") == {"cpu_model": "Apple M3 Pro", "performance_cores": 6,
                                                                "efficiency_cores": 6}
    assert platforms.cpu_record(MACOS_ARM64, lambda name: None, "") == {}
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2\n"
    assert platforms.cpu_record(LINUX_X86_64, sysctl.get, cpuinfo) == {"cpu_model": "AMD EPYC 9B14"}
    assert platforms.cpu_record(LINUX_AARCH64, sysctl.get, "processor\t: 0\nBogoMIPS\t: 50.00\n") == {}


def test_one_writer_lock_on_each_platform(tmp_path, monkeypatch):
    assert _by_platform(platforms.file_lock) == {LINUX_X86_64: "flock", LINUX_AARCH64: "flock", MACOS_ARM64: "flock"}
    assert platforms.file_lock(Platform("win32", "AMD64")) is None
    path = tmp_path / "lock"
    first, second = (os.open(path, os.O_RDWR | os.O_CREAT) for _ in range(2))  # two open file descriptions
    try:
        assert platforms.lock_file(first, wait=False)
        assert not platforms.lock_file(second, wait=False)  # held: refused at once, not waited for
        os.close(first)
        first = None
        assert platforms.lock_file(second, wait=False)  # closing the holder's file released it
    finally:
        for fd in (first, second):
            if fd is not None:
                os.close(fd)
    monkeypatch.setattr(platforms, "current", lambda: Platform("win32", "AMD64"))
    with pytest.raises(OSError, match="no file lock on win32"):
        platforms.lock_file(0, wait=False)


def _setup_py():
    spec = importlib.util.spec_from_file_location("_mlx_aim_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its setup() runs only as __main__
    return module


def test_install_compiles_what_each_platform_uses():
    extensions = _setup_py().extensions
    names = {p: [e.name for e in extensions(p)] for p in ALL}
    assert names == {LINUX_X86_64: ["mlx_aim._native_kernels", "mlx_aim._blas_shim"],
                     LINUX_AARCH64: ["mlx_aim._native_kernels"], MACOS_ARM64: []}
    assert all(e.optional for p in ALL for e in extensions(p))  # a failed build never fails the install


def test_build_requirements_are_linux_only():
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in requires:
        if not requirement.startswith("setuptools"):
            assert requirement.endswith("; sys_platform == 'linux'"), requirement  # a Mac builds pure Python


def test_native_kernels_exist_where_they_are_built():
    """Fail, not skip: where the platform builds them, the suite requires them."""
    expected = platforms.native_kernels_skipped(platforms.current()) is None
    assert native.available() == expected, native.unavailable_reason()


def test_on_macos_the_native_loader_and_the_blas_preload_touch_nothing(monkeypatch):
    import ctypes

    def no_library(*args, **kwargs):
        raise AssertionError(f"opened a library: {args}")

    monkeypatch.setattr(platforms, "current", lambda: MACOS_ARM64)
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    monkeypatch.delenv("MLX_AIM_BLAS", raising=False)
    for variable in (_blas.SPIN_ENV, "OPENBLAS_CORETYPE"):
        monkeypatch.delenv(variable, raising=False)
    kernels, reason = native._load()
    assert kernels is None and reason.startswith("not built on macOS")
    result = _blas._preload()
    assert not result["loaded"] and "not needed on macOS" in result["reason"]
    # Nor does it set OpenBLAS's variables there (Accelerate, not OpenBLAS, serves MLX on a Mac).
    assert _blas.SPIN_ENV not in os.environ and "OPENBLAS_CORETYPE" not in os.environ


def test_float64_weights_are_cast_on_the_cpu_stream():
    calls = []

    class Recorder:  # stands in for an mx.array: which stream the cast was given
        def __init__(self, dtype):
            self.dtype = dtype

        def astype(self, dtype, stream=None):
            calls.append((self.dtype, dtype, stream))
            return dtype

    cast_weight(Recorder(mx.float64), mx.float32)
    cast_weight(Recorder(mx.float32), mx.bfloat16)
    assert calls == [(mx.float64, mx.float32, mx.cpu), (mx.float32, mx.bfloat16, None)]
    value = mx.array(np.linspace(-1, 1, 7), dtype=mx.float64)
    with mx.stream(mx.cpu):
        assert cast_weight(value, mx.float32).dtype == mx.float32


def test_torch_synchronizes_the_device_it_runs_on(monkeypatch):
    torch = pytest.importorskip("torch")
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    assert torch_synchronizer("cpu") is None
    torch_synchronizer("mps")()
    torch_synchronizer("cuda:1")()
    assert calls == [("mps", None), ("cuda", "cuda:1")]
    with pytest.raises(ValueError, match="torch device 'xla'"):
        torch_synchronizer("xla")


# ---------------------------------------------------------------------------------------------------
# No platform-specific facility outside the places that decide it per platform

_NAMES = {"fork", "forkpty", "RLIMIT_AS", "dlopen", "CDLL", "sched_getaffinity", "pthread_atfork", "flock"}
_TEXT = re.compile(r"/proc|(?<![A-Za-z0-9_])LD_[A-Z]|RLIMIT_AS|dlopen")
# file -> {function (or "*" for the whole file): the guard that keeps it to its platform}
GUARDED = {
    "mlx_aim/platforms.py": {"*": "the module of platform decisions: each reader is chosen by a decision on the "
                                  "Platform, or is a Linux-only probe that only a Linux decision calls"},
    "mlx_aim/_blas.py": {"*": "Linux only: _preload returns at platforms.blas_preload_skipped before anything opens "
                              "a library or reads /proc (test_on_macos_the_native_loader_and_the_blas_preload_touch_"
                              "nothing)"},
    "tests/hostile_cases.py": {"_child": "RLIMIT_AS only where platforms.memory_limits says address-space (Linux)",
                               "_start": "forks only where platforms.child_start says fork (Linux); spawns "
                                         "elsewhere",
                               "main": "the reader is imported before forking only where platforms.child_start says "
                                       "fork"},
    "tests/test_blas.py": {"*": "every test that reads LD_DEBUG or /proc is marked skipif(not GLIBC) or needs the "
                                "Linux x86-64 wheels (PIP_BLAS)"},
    "tests/test_platforms.py": {"*": "this scan's own patterns"},
}


def _docstrings(tree) -> set:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _uses(path: Path) -> list[tuple[str, int, str]]:
    """(enclosing function, line, what) for each platform-specific use in `path`'s code (not its comments or
    docstrings)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings, found = _docstrings(tree), []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        what = None
        if isinstance(node, ast.Name) and node.id in _NAMES:
            what = node.id
        elif isinstance(node, ast.Attribute) and (node.attr in _NAMES or node.attr.startswith("RTLD_")):
            what = node.attr
        elif isinstance(node, ast.Attribute) and node.attr == "platform" and getattr(node.value, "id", "") == "sys":
            what = "sys.platform"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            match = _TEXT.search(node.value)
            what = match.group(0) if match else None
            if what is None and node.value in ("fork", "forkserver"):
                what = node.value
        if what is not None:
            found.append((function, node.lineno, what))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_platform_specific_code_is_guarded():
    files = [ROOT / "setup.py"] + [p for folder in ("mlx_aim", "tests", "benchmarks", "scripts", "convert")
                                   for p in sorted((ROOT / folder).rglob("*.py"))]
    unguarded = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        allowed = GUARDED.get(rel, {})
        for function, line, what in _uses(path):
            if "*" not in allowed and function not in allowed:
                unguarded.append(f"{rel}:{line} ({function}): {what}")
    assert not unguarded, ("platform-specific code outside a platform decision (mlx_aim/platforms.py) or a listed "
                           "guard:\n" + "\n".join(unguarded))
    for rel, functions in GUARDED.items():  # the list names only what exists
        names = {f for f, _, _ in _uses(ROOT / rel)}
        assert "*" in functions or set(functions) <= names, (rel, set(functions) - names)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""Reads /proc and forks (a docstring: not code)."""\nimport os, sys\n\n\ndef f():\n'
                     '    # /proc in a comment is not code either\n    pid = os.fork()\n'
                     '    open("/proc/self/status")\n    env = {"LD_PRELOAD": "x", "MLX_AIM_BUILD": "1"}\n'
                     '    return sys.platform\n')
    assert _uses(probe) == [("f", 7, "fork"), ("f", 8, "/proc"), ("f", 9, "LD_P"), ("f", 10, "sys.platform")]
