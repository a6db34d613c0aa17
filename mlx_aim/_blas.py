"""Give MLX's Linux CPU matmul an optimized CBLAS instead of the reference BLAS its wheel bundles.

MLX's `libmlx.so` imports `cblas_sgemm` (and LAPACK routines) by name; the Linux `mlx[cpu]` wheel
satisfies them from a bundled netlib reference BLAS, about 4 GFLOP/s for float32 matmul. The dynamic
loader resolves a library's imports from the global scope before that library's own dependencies, so names
made global before `mlx.core` loads are the ones MLX calls (measured on a 2-core AMD EPYC VM, 1024x1024
float32: 2.5 GFLOP/s -> 60 with MKL, 120 with OpenBLAS).

Only MLX's names are made global, through a shim (csrc/blas_shim.c, built by setup.py on Linux x86-64): the
optimized library is opened privately (RTLD_LOCAL), the shim's table gets its 24 functions MLX imports
(cblas_sgemm, sgetrf_, ...) and the shim alone is opened globally; each shim function is one jump through the
table. Opening the library itself globally, as mlx_aim first did, also handed every later library all of its
names: PyTorch's CPU build exports the MKL it links statically, and OpenBLAS 0.3.33's cblas_dgemm_batch,
declared differently, took over its calls and crashed float64 batched matmul (2-core AMD EPYC, 2026-12-01).
Through the shim, matmul runs at the same speed: `benchmarks/bench_kernels.py --blas auto --sizes 1024`,
two rounds alternating with the shim file moved away (2-core AMD EPYC, OpenBLAS, 512x1536 @ 1536x6144
float32): 179.3 and 193.4 GFLOP/s through the shim, 193.0 and 170.2 opened globally, run-to-run noise either
way. Where the shim is not built (no C compiler, another architecture) the library is opened globally as
before; `blas_info()["binding"]` says which ("shim" or "global"); a library without LAPACK keeps MLX's bundled
LAPACK for those names (`"from_reference"`).

Measured here again (2-core AMD EPYC Zen 3 VM, one BLAS thread, 512x1536 @ 1536x6144 float32, GFLOP/s):
reference 2.3, MKL 41 (MKL takes its generic code path on AMD CPUs), OpenBLAS with its Zen kernels 69.
aim-600M float32 inference, batch 2, against PyTorch in the same run (`scripts/benchmark.py --preset
aim-600M --batch-size 2 --compare-torch`, quiet machine): OpenBLAS 0.98x (1 thread) and 1.02x (2 threads),
MKL 0.72x and 0.68x.
Both are dependencies on Linux x86-64 (pyproject.toml): OpenBLAS from the `ngsolve-openblas` wheel
(DYNAMIC_ARCH, unprefixed CBLAS names) is preferred on AMD CPUs, MKL on Intel CPUs; when the first cannot
load, the next is used and `blas_info()["skipped"]` says why.

The pip OpenBLAS and libgfortran: that wheel's library lists `libgfortran.so.5` as a dependency
(DT_NEEDED) and searches only its own folder for it (DT_RPATH `$ORIGIN/.`), and the wheel does not ship one,
so on a machine without the system's libgfortran (a fresh one, or a slim container) it cannot load by
itself. The wheels installed next to it do ship a libgfortran.so.5 build, under a hashed auditwheel name
(`mlx_cpu.libs/libgfortran-<hash>.so.5.0.0`, which MLX's own LAPACK links; then `numpy.libs/`). So for the
pip OpenBLAS this module always does the same thing, whatever the system has: it loads that libgfortran
from its own folder (its RPATH finds its hashed libquadmath), makes a private temporary folder holding two
symlinks, `libgfortran.so.5` to it and the OpenBLAS under its own name, opens the OpenBLAS through the
folder (its `$ORIGIN/.` is now that folder, where `libgfortran.so.5` resolves to a file glibc already has
mapped, which it reuses: it matches loaded objects by device and inode), and removes the folder: the
mappings outlive it. `blas_info()["libgfortran"]` names the file used. Rejected: requiring
`apt-get install libgfortran5` (pip-only users, as CI is, never get OpenBLAS); scipy-openblas32/64 from
PyPI (they prefix their symbols, `scipy_cblas_sgemm`, so they cannot stand in for `cblas_sgemm`); copying
or patching the binary (patchelf, an edited RPATH or NEEDED: fragile, and writes a second copy of a 30 MB
library); setting LD_LIBRARY_PATH (glibc reads it once, at process start). System OpenBLAS builds (Debian's
`/usr/lib/...`, conda's) bring their own libgfortran and load as they are.

Threads: each library uses all cores by default, which is fastest on a quiet machine (above: 2 threads
1.6x one). On a machine busy with other processes, a multithreaded
call waits at its barriers for descheduled threads: OpenBLAS then lost 80x on attention's many small
batched products (2 threads 566 ms, 1 thread 7 ms for 24 products of 256x128 @ 128x256), and aim-600M ran
2.3x slower than with one thread. Set OPENBLAS_NUM_THREADS=1 (or MKL_NUM_THREADS=1) there, or call
`set_num_threads(1)`.

`preload_blas()` must run before anything imports `mlx.core`; `mlx_aim/__init__.py` calls it first.
The shim's names also serve every library loaded after it: PyTorch imported later calls its BLAS and
LAPACK too (correct either way; MKL keeps torch fast, OpenBLAS slows torch's threaded attention ~15x), so
tests and benchmarks that time torch next to MLX import torch before mlx_aim.
Environment variable MLX_AIM_BLAS: `0`/`off` loads nothing, a path (or soname) names the library to load,
unset/`auto` searches. It does nothing off Linux, where MLX uses Accelerate and Metal.
"""

import ctypes
import glob
import os
import shutil
import site
import sys
import sysconfig
import tempfile
import warnings
from typing import Optional

from . import platforms

ENV_VAR = "MLX_AIM_BLAS"
# OpenBLAS's worker threads spin for 2^n cycles after each call before they sleep, n from this variable (default 28:
# about 0.1 s here, measured as the CPU time an idle process spends after one threaded matmul). MLX runs its own
# element-wise work and mlx_aim's native kernels between the matmuls, so a spinning worker holds a core those need
# (three busy threads on two cores). Where the user has not set it, a loaded OpenBLAS gets OPENBLAS_THREAD_TIMEOUT.
SPIN_ENV = "OPENBLAS_THREAD_TIMEOUT"
OPENBLAS_THREAD_TIMEOUT = "16"
_OFF = {"0", "off", "false", "no", "none"}
_AUTO = {"", "1", "on", "auto", "true", "yes"}
_INSTALL_HINT = ("`pip install mkl` (Linux x86-64), `pip install ngsolve-openblas` (faster on AMD CPUs) or "
                 "your distribution's OpenBLAS (Debian/Ubuntu: `apt-get install libopenblas0-pthread`)")


class BlasWarning(RuntimeWarning):
    """MLX will run float32 matmul on its bundled reference BLAS (tens of times slower)."""


_info = None  # dict once preload_blas() has run
_handles = []  # the optimized library, referenced for the life of the process
_kept = []  # the shim and any reference library it forwards to, likewise


def blas_info() -> dict:
    """What `preload_blas()` did: {"loaded", "name", "path", "reason", ...}.

    `name` is "mkl", "openblas" or "custom" (a library named by MLX_AIM_BLAS) when `loaded`; `reason` says
    why in words either way. OpenBLAS also reports the `core` its kernels were chosen for and `threads`;
    the pip OpenBLAS also `libgfortran`, the wheel-shipped libgfortran.so.5 it was given.
    """
    if _info is None:
        return {"loaded": False, "name": None, "path": None, "reason": "preload_blas() has not run"}
    return dict(_info)


def preload_blas() -> dict:
    """Load an optimized CBLAS so that MLX's Linux CPU backend binds to it; see the module doc.

    Idempotent: later calls return the first call's `blas_info()`. Warns once (BlasWarning) when MLX would
    keep its reference BLAS: none found, the named library unusable, or `mlx.core` imported too early.
    """
    global _info
    if _info is None:
        _info = _preload()
    return blas_info()


def set_num_threads(threads: int) -> bool:
    """Sets the preloaded library's thread count (OpenBLAS or MKL) for the calls that follow; False when no
    library was preloaded or it has no such function. On a machine shared with other busy processes, one
    thread can beat several: each multithreaded call waits at its barriers for descheduled threads."""
    if threads < 1:
        raise ValueError(f"threads={threads}: expected a positive integer")
    for lib in _handles:
        for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(threads))
                if _info is not None:
                    _info["threads"] = threads
                return True
    return False


def get_num_threads() -> Optional[int]:
    """The preloaded library's thread count (OpenBLAS or MKL); None when no library was preloaded or it cannot
    say."""
    for lib in _handles:
        for name in ("openblas_get_num_threads", "MKL_Get_Max_Threads"):
            if hasattr(lib, name):
                getattr(lib, name).restype = ctypes.c_int
                return int(getattr(lib, name)())
    return None


def thread_functions() -> Optional[tuple[int, int]]:
    """The addresses of the preloaded library's `int get_threads(void)` and `void set_threads(int)` (OpenBLAS's or
    MKL's), for native code that sets them around its own threads' BLAS calls; None when no library was preloaded
    or it has no such pair."""
    for lib in _handles:
        for get, set_ in (("openblas_get_num_threads", "openblas_set_num_threads"),
                          ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads")):
            if hasattr(lib, get) and hasattr(lib, set_):
                return (ctypes.cast(getattr(lib, get), ctypes.c_void_p).value,
                        ctypes.cast(getattr(lib, set_), ctypes.c_void_p).value)
    return None


def _result(reason, name=None, path=None, **extra):
    return {"loaded": name is not None, "name": name, "path": path, "reason": reason, **extra}


def _warn(message):
    warnings.warn(message, BlasWarning, stacklevel=4)


def _preload():
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() in _OFF:
        return _result(f"disabled by {ENV_VAR}={setting}")
    skipped = platforms.blas_preload_skipped(platforms.current())
    if skipped is not None:  # every function below that opens a library or reads /proc is reached past this line
        return _result(skipped)
    explicit = setting.lower() not in _AUTO
    if not explicit:
        bundled = _bundled_reference_blas()
        if bundled is None:
            return _result("MLX is not installed or does not use a bundled reference BLAS; nothing to replace")
    if "mlx.core" in sys.modules:
        reason = ("mlx.core was imported before mlx_aim, so MLX is already bound to its reference BLAS; "
                  "import mlx_aim first for fast CPU matmul")
        _warn(reason)
        return _result(reason)

    if explicit:
        candidates = [("custom", setting)]
    else:
        candidates = _candidates()
    failures = []
    for name, path in candidates:
        loaded, detail = _load(name, path)
        if loaded is not None:
            if failures:  # e.g. an OpenBLAS whose dependencies are missing, then MKL
                loaded["skipped"] = [f"{path}: {detail}" for path, detail in failures]
            return loaded
        failures.append((path, detail))
    if explicit:
        reason = f"{ENV_VAR}={setting} could not be used ({failures[0][1]})"
    elif failures:
        tried = "; ".join(f"{path}: {detail}" for path, detail in failures)
        reason = f"no usable optimized CBLAS ({tried}); install one: {_INSTALL_HINT}"
    else:
        reason = f"no optimized CBLAS found; MLX keeps its reference BLAS (~4 GFLOP/s). Install one: {_INSTALL_HINT}"
    _warn(reason)
    return _result(reason)


def _load(name, path):
    """Open `path`, check it exports unprefixed CBLAS, then publish it to MLX (`_open`). Returns (info or
    None, detail)."""
    env_before = os.environ.get("OPENBLAS_CORETYPE")
    coretype = None
    if name in ("openblas", "custom") and "openblas" in os.path.basename(path) and env_before is None:
        # OpenBLAS picks its kernels at load time; on VMs that hide the CPU model it can fall back to an
        # old core (SSE-era kernels), so name the core from the instruction-set flags the CPU reports.
        coretype = _openblas_coretype()
        if coretype:
            os.environ["OPENBLAS_CORETYPE"] = coretype
    spin_set = None
    if name in ("openblas", "custom") and "openblas" in os.path.basename(path) and SPIN_ENV not in os.environ:
        spin_set = os.environ[SPIN_ENV] = OPENBLAS_THREAD_TIMEOUT  # read once, when the library loads
    extra = {}
    try:
        if _is_pip_openblas(path):
            (lib, published), extra["libgfortran"] = _open_with_shipped_libgfortran(path)
        else:
            lib, published = _open(path)
        extra.update(published)
    except OSError as err:
        if coretype:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        if spin_set:
            os.environ.pop(SPIN_ENV, None)
        return None, str(err)
    _handles.append(lib)
    if hasattr(lib, "openblas_get_corename"):
        lib.openblas_get_corename.restype = ctypes.c_char_p
        extra["core"] = lib.openblas_get_corename().decode()
        extra["threads"] = int(lib.openblas_get_num_threads())
        if coretype:
            extra["coretype_set"] = coretype
        if spin_set:
            extra["thread_timeout_set"] = spin_set
    how = f"named by {ENV_VAR}" if name == "custom" else "found"
    return _result(f"{how}: {path}", name=name, path=os.path.realpath(path) if os.path.exists(path) else path,
                   **extra), ""


def _open(path):
    """Opens the library privately (RTLD_LOCAL: nothing else in the process sees its names yet), checks that it
    exports cblas_sgemm (OSError if not), then publishes it; returns (library, what `_publish` reports)."""
    lib = ctypes.CDLL(path, mode=os.RTLD_LAZY | os.RTLD_LOCAL)
    if not hasattr(lib, "cblas_sgemm"):
        raise OSError("does not export cblas_sgemm (a symbol-prefixed build cannot stand in)")
    return lib, _publish(lib, path)


def _publish(lib, path):
    """Make `lib` the BLAS and LAPACK that libmlx.so binds to; returns what blas_info() reports about how.

    Through the shim where it was built: its table gets this library's functions and the shim alone becomes
    global, so the rest of the process sees only the names MLX imports (see csrc/blas_shim.c: a global
    OpenBLAS crashed PyTorch's MKL). Without the shim (not built, or not Linux x86-64), the library itself is
    reopened globally, as mlx_aim did before: fast, but every library loaded later binds to all its names."""
    shim, reason = _shim()
    if shim is None:
        ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        return {"binding": "global", "binding_reason": reason}
    names = _shim_names(shim)
    table = (ctypes.c_void_p * len(names))()
    from_reference, references = [], None
    for i, symbol in enumerate(names):
        table[i] = _address(lib, symbol)
        if not table[i]:  # e.g. a CBLAS without LAPACK: that function stays MLX's bundled one
            references = _reference_libraries() if references is None else references
            table[i] = next(filter(None, (_address(ref, symbol) for ref in references)), None)
            if not table[i]:
                raise OSError(f"exports no {symbol}, and neither does MLX's bundled BLAS or LAPACK")
            from_reference.append(symbol)
    shim.mlx_aim_blas_bind(table)
    _kept.append(ctypes.CDLL(shim._name, mode=os.RTLD_NOW | os.RTLD_GLOBAL))
    extra = {"binding": "shim", "shim": os.path.realpath(shim._name)}
    if from_reference:
        extra["from_reference"] = from_reference
    return extra


_shim_state = None  # (library or None, reason), once found


def _shim():
    """mlx_aim._blas_shim, opened privately, or None; and why not."""
    global _shim_state
    if _shim_state is None:
        _shim_state = _find_shim()
    return _shim_state


def _find_shim():
    if os.uname().machine != "x86_64":
        return None, f"the shim is built for x86-64 only, not {os.uname().machine}"
    found = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_blas_shim*.so")))
    if not found:
        return None, "mlx_aim._blas_shim was not built (setup.py builds it where a C compiler is found)"
    try:
        shim = ctypes.CDLL(found[0], mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as err:
        return None, f"{found[0]}: {err}"
    shim.mlx_aim_blas_name.restype = ctypes.c_char_p
    shim.mlx_aim_blas_target.restype = ctypes.c_void_p
    shim.mlx_aim_blas_bind.argtypes = [ctypes.c_void_p]
    _kept.append(shim)
    return shim, ""


def _shim_names(shim):
    """The shim's names, in its table's order."""
    return [shim.mlx_aim_blas_name(i).decode() for i in range(shim.mlx_aim_blas_count())]


def _address(lib, symbol):
    try:
        return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
    except AttributeError:
        return None


def _reference_libraries():
    """MLX's bundled reference LAPACK and BLAS, opened privately (libmlx.so loads the same files anyway)."""
    libs = []
    for mlx_dir in _mlx_package_dirs():
        site_dir = os.path.dirname(os.path.abspath(mlx_dir))
        for pattern in ("liblapack*.so*", "libblas*.so*"):
            for path in sorted(glob.glob(os.path.join(site_dir, "mlx*.libs", pattern))):
                libs.append(ctypes.CDLL(path, mode=os.RTLD_LAZY | os.RTLD_LOCAL))
    _kept.extend(libs)
    return libs


def shim_target(symbol: str) -> Optional[str]:
    """The file whose function the shim's `symbol` jumps to, or None where no shim is bound or the symbol is not
    one of its names. For checking what MLX calls: glibc's LD_DEBUG=bindings shows libmlx.so bound to the shim,
    and this shows where the shim goes."""
    shim, _ = _shim()
    if shim is None or _info is None or _info.get("binding") != "shim":
        return None
    names = _shim_names(shim)
    if symbol not in names:
        return None
    return _mapped_file(shim.mlx_aim_blas_target(names.index(symbol)))


def _mapped_file(address):
    """The file mapped at `address` (from /proc/self/maps, which names the file itself, not a symlink to it)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end and len(fields) == 6:
                return fields[5].strip()
    return None


def _open_with_shipped_libgfortran(path):
    """Open the pip OpenBLAS against a wheel-shipped libgfortran (see the module doc); returns (what `_open`
    returns, that libgfortran's path). Used whether or not the system has a libgfortran, so every machine gets the
    same build. Raises OSError saying what was tried."""
    shipped = _shipped_libgfortran()
    if not shipped:
        raise OSError("needs libgfortran.so.5, and neither the mlx[cpu] nor the numpy wheel ships one")
    real = os.path.realpath(path)
    errors = []
    for gfortran in shipped:
        try:
            # From its own folder, so that its RPATH ($ORIGIN) finds the hashed libquadmath next to it;
            # local: what the OpenBLAS then needs from it becomes global only with the OpenBLAS.
            ctypes.CDLL(gfortran, mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as err:  # e.g. numpy's build also needs the system's libz.so.1
            errors.append(f"{gfortran}: {err}")
            continue
        # Symlinks only, so the files mapped are the installed ones (and a noexec /tmp does not matter).
        folder = tempfile.mkdtemp(prefix="mlx_aim_blas-")
        try:
            os.symlink(gfortran, os.path.join(folder, "libgfortran.so.5"))
            link = os.path.join(folder, os.path.basename(real))
            os.symlink(real, link)
            return _open(link), gfortran
        except OSError as err:
            errors.append(f"with {gfortran}: {err}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    raise OSError("; ".join(errors))


def _mlx_package_dirs():
    import importlib.util

    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return []
    # mlx is a namespace package: a stray `mlx/` folder (MLX's own JIT cache in the working directory)
    # can be listed too, so keep the folders that hold the compiled library.
    return [d for d in spec.submodule_search_locations if glob.glob(os.path.join(d, "lib", "libmlx*.so*"))]


def _bundled_reference_blas():
    """Path of the reference libblas an MLX wheel ships (auditwheel's `mlx_*.libs/`), or None."""
    for mlx_dir in _mlx_package_dirs():
        site_dir = os.path.dirname(os.path.abspath(mlx_dir))
        found = sorted(glob.glob(os.path.join(site_dir, "mlx*.libs", "libblas*.so*")))
        if found:
            return found[0]
    return None


def _lib_dirs():
    dirs = [os.path.join(sys.prefix, "lib"), sysconfig.get_config_var("LIBDIR")]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(os.path.join(os.environ["CONDA_PREFIX"], "lib"))
    try:
        dirs.append(os.path.join(site.getuserbase(), "lib"))
    except (AttributeError, OSError):
        pass
    unique = []
    for d in dirs:
        if d and os.path.isdir(d) and os.path.realpath(d) not in map(os.path.realpath, unique):
            unique.append(d)
    return unique


def _find_mkl():
    for d in _lib_dirs():
        found = sorted(glob.glob(os.path.join(d, "libmkl_rt.so*")))
        if found:
            return found[0]
    # A pip install into an unusual prefix: ask the `mkl` distribution where it put the library.
    import importlib.metadata

    try:
        files = importlib.metadata.distribution("mkl").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmkl_rt.so"):
            path = os.path.normpath(str(f.locate()))
            if os.path.exists(path):
                return path
    return None


def _find_openblas():
    arch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    patterns = [f"/usr/lib/{arch}/libopenblas.so.0",  # Debian/Ubuntu (the update-alternatives link)
                f"/usr/lib/{arch}/openblas-pthread/libopenblas.so.0",
                "/usr/lib64/libopenblas.so.0", "/usr/lib64/libopenblasp.so.0",  # Fedora
                "/usr/lib/libopenblas.so.0"]  # Arch
    for d in _lib_dirs():  # conda's openblas
        patterns.append(os.path.join(d, "libopenblas.so.0"))
    for p in patterns:
        if os.path.exists(p):
            return p
    return _find_pip_openblas()


def _package_dirs(name):
    """Folders of an installed top-level package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec else []


def _find_pip_openblas():
    """OpenBLAS from PyPI with unprefixed CBLAS names: the `ngsolve-openblas` wheel (a DYNAMIC_ARCH build
    that needs a libgfortran.so.5 it does not ship; `_load` gives it one from another wheel).
    scipy-openblas32/64 prefix their symbols and cannot stand in."""
    for d in _package_dirs("ngsolve_openblas"):
        found = sorted(glob.glob(os.path.join(d, "libopenblas*.so*")))
        if found:
            return found[0]
    return None


def _is_pip_openblas(path):
    pip = _find_pip_openblas()
    return pip is not None and os.path.realpath(pip) == os.path.realpath(path)


def _shipped_libgfortran():
    """libgfortran.so.5 builds that installed wheels ship under hashed auditwheel names, in the order to try:
    MLX's (`mlx*.libs/`, the one its LAPACK already links, so nothing new is mapped), then NumPy's."""
    site_dirs = [os.path.dirname(os.path.abspath(d)) for d in _mlx_package_dirs()]
    patterns = [os.path.join(s, "mlx*.libs", "libgfortran*.so*") for s in site_dirs]
    patterns += [os.path.join(os.path.dirname(os.path.abspath(d)), "numpy.libs", "libgfortran*.so*")
                 for d in _package_dirs("numpy")]
    found = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            path = os.path.realpath(path)
            if path not in found:
                found.append(path)
    return found


def _cpuinfo():
    """(vendor, set of flags) from /proc/cpuinfo; empty when unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(65536)
    except OSError:
        return "", set()
    vendor, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if vendor and flags:
            break
    return vendor, flags


def _openblas_coretype():
    return _coretype_for(os.uname().machine, *_cpuinfo())


def _coretype_for(machine, vendor, flags):
    """OPENBLAS_CORETYPE for an x86-64 CPU's flags: the newest kernel family it can run, or None."""
    if machine != "x86_64":
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Zen" if vendor == "AuthenticAMD" else "Haswell"
    return None


def _candidates():
    """Optimized CBLAS libraries present, best first, as (name, path)."""
    mkl, openblas = _find_mkl(), _find_openblas()
    order = [("mkl", mkl), ("openblas", openblas)]
    # MKL takes its generic (non-AVX2) code path on AMD CPUs: OpenBLAS measured twice as fast there.
    if _cpuinfo()[0] == "AuthenticAMD":
        order.reverse()
    return [(name, path) for name, path in order if path]
