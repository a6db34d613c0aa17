"""mlx_aim._blas: which CBLAS MLX's CPU backend ends up calling, checked in fresh processes.

Each case starts a new interpreter (the choice is made once, before mlx.core loads) and asks glibc's loader
(LD_DEBUG=bindings) which library satisfied libmlx.so's `cblas_sgemm`, and, where that is mlx_aim's BLAS shim,
where the shim jumps: the evidence that the swap took, with no timing involved. What is expected follows from
what this install has: MKL, OpenBLAS or neither. On Linux x86-64 both are declared dependencies (pip wheels),
so there the tests require both and load each by name; no test depends on what the system happens to have
besides (a system libgfortran, a system OpenBLAS)."""

import ctypes
import glob
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import last_json
from mlx_aim import _blas

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
GLIBC = LINUX and platform.libc_ver()[0] == "glibc"
# Where pyproject.toml declares both `mkl` and `ngsolve-openblas`: their absence is a packaging failure.
PIP_BLAS = LINUX and platform.machine() == "x86_64"

CHILD = """
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if {mlx_first}:
        import mlx.core
    import mlx_aim
    from mlx_aim._blas import BlasWarning, blas_info, preload_blas, shim_target
    again = preload_blas()
import mlx.core as mx
import numpy as np

torch_err = None
if {with_torch}:  # PyTorch loaded after the preload: its own (static MKL) BLAS must keep working
    import torch
    gen = torch.Generator().manual_seed(0)
    torch_err = 0.0
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(2, 3, 20, 16, generator=gen, dtype=dtype)
        y = torch.randn(2, 3, 16, 12, generator=gen, dtype=dtype)
        ref = np.einsum("bhik,bhkj->bhij", x.double().numpy(), y.double().numpy())
        torch_err = max(torch_err, float(np.abs((x @ y).double().numpy() - ref).max()))

rng = np.random.default_rng(0)
a, b = rng.standard_normal((96, 80), dtype=np.float32), rng.standard_normal((80, 72), dtype=np.float32)
m = rng.standard_normal((24, 24)) + 24 * np.eye(24)
with mx.stream(mx.cpu):
    product = np.array(mx.array(a) @ mx.array(b))
    inverse = np.array(mx.linalg.inv(mx.array(m, dtype=mx.float32)))
    singular = np.array(mx.linalg.svd(mx.array(m, dtype=mx.float32), compute_uv=False))
libs = []
if sys.platform.startswith("linux"):
    libs = sorted({{line.split()[-1] for line in open("/proc/self/maps") if "/" in line}})
print(json.dumps({{
    "info": blas_info(), "again": again,
    "warnings": [str(w.message) for w in caught if issubclass(w.category, BlasWarning)],
    "matmul_err": float(np.abs(product - a.astype(np.float64) @ b).max()),
    "inv_err": float(np.abs(inverse - np.linalg.inv(m)).max()),
    "svd_err": float(np.abs(singular - np.linalg.svd(m, compute_uv=False)).max()),
    "libs": libs, "torch_err": torch_err,
    "targets": {{s: shim_target(s) for s in ("cblas_sgemm", "sgetrf_")}},
}}))
"""


def run_child(tmp_path, blas=None, mlx_first=False, extra_env=None, with_torch=False, bind_now=False):
    """Run CHILD in a fresh interpreter; returns its report plus `sgemm_from`: the library libmlx.so's cblas_sgemm
    was bound to (None where glibc's LD_DEBUG is unavailable); `sgemm_calls`: the library whose cblas_sgemm
    that runs (the shim's target, where it is the shim); `mlx_bound`: {name: library} for the names libmlx.so
    has bound (with `bind_now`, LD_BIND_NOW, all it imports, at load; MKL cannot load so); `binders`: every
    file the loader bound names for, by the name it knew it by (the pip OpenBLAS is opened through a symlink
    in a temporary folder removed since)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_AIM_BLAS", "LD_DEBUG", "LD_DEBUG_OUTPUT")}
    if blas is not None:
        env["MLX_AIM_BLAS"] = blas
    env.update(extra_env or {})
    debug = tmp_path / "ld"
    if GLIBC and not with_torch:  # (PyTorch's own bindings would be millions of lines)
        env.update(LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(debug), **({"LD_BIND_NOW": "1"} if bind_now else {}))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(mlx_first=mlx_first, with_torch=with_torch)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = last_json(proc.stdout)
    report["mlx_bound"], report["binders"] = {}, set()
    for path in glob.glob(f"{debug}.*"):
        with open(path, errors="replace") as f:
            for line in f:
                if "binding file " not in line or " to " not in line:
                    continue
                binder = line.split("binding file ", 1)[1].split(" [", 1)[0]
                bound = line.split(" to ", 1)[1].split(" [", 1)[0]
                report["binders"].add(binder)
                if os.path.basename(binder).startswith("libmlx") and "`" in line:
                    report["mlx_bound"][line.rsplit("`", 1)[1].split("'", 1)[0]] = mapped(bound, report["libs"])
    report["sgemm_from"] = report["mlx_bound"].get("cblas_sgemm")
    shim = report["info"].get("shim")
    shimmed = shim is not None and report["sgemm_from"] == real(shim)
    report["sgemm_calls"] = report["targets"]["cblas_sgemm"] if shimmed else report["sgemm_from"]
    # Correct results whichever BLAS and LAPACK MLX got (float32 against float64).
    assert report["matmul_err"] < 1e-3 and report["inv_err"] < 1e-5 and report["svd_err"] < 1e-3, report
    return report


def mapped(path, libs):
    """The file the loader knew as `path`: itself, or, when that was a symlink since removed, the one mapped file
    of that name."""
    if os.path.exists(path):
        return os.path.realpath(path)
    same = [p for p in libs if os.path.basename(p) == os.path.basename(path)]
    return same[0] if len(same) == 1 else path


def real(path):
    return os.path.realpath(path)


def loaded_blas_libraries(report):
    names = ("libmkl_rt.so", "libopenblas")
    return [p for p in report["libs"] if os.path.basename(p).startswith(names)]


@pytest.fixture(scope="module")
def present():
    """(name, path) of the optimized CBLAS libraries this machine has, best first, and MLX's bundled one."""
    if not LINUX:
        return [], None
    return _blas._candidates(), _blas._bundled_reference_blas()


def test_disabled_loads_nothing(tmp_path, present):
    report = run_child(tmp_path, blas="0")
    assert report["info"]["loaded"] is False
    assert report["info"]["reason"] == "disabled by MLX_AIM_BLAS=0"
    assert report["warnings"] == []
    assert loaded_blas_libraries(report) == []
    _, bundled = present
    if GLIBC and bundled:
        assert report["sgemm_from"] == real(bundled)


def test_automatic_choice_follows_what_is_installed(tmp_path, present):
    report = run_child(tmp_path)
    info = report["info"]
    assert report["again"] == info  # a second preload_blas() changes nothing and does not warn again
    candidates, bundled = present
    if PIP_BLAS:  # mlx[cpu]'s wheel ships its reference BLAS and both replacements are declared: the swap must happen
        assert bundled is not None, "MLX's bundled reference BLAS was not found (mlx[cpu] is declared there)"
        assert candidates, "neither mkl nor ngsolve-openblas was found (both are declared in pyproject.toml)"
    if not LINUX:
        assert info["loaded"] is False and "not needed" in info["reason"] and report["warnings"] == []
    elif bundled is None:
        assert info["loaded"] is False and "nothing to replace" in info["reason"] and report["warnings"] == []
    elif candidates:
        name, path = candidates[0]
        assert info["loaded"] is True and info["name"] == name and info["path"] == real(path)
        assert report["warnings"] == []
        assert real(path) in map(real, report["libs"])
        if GLIBC:
            assert report["sgemm_calls"] == real(path)
    else:
        assert info["loaded"] is False
        assert len(report["warnings"]) == 1 and "pip install mkl" in report["warnings"][0]
        assert loaded_blas_libraries(report) == []
        if GLIBC:
            assert report["sgemm_from"] == real(bundled)


@pytest.mark.skipif(not LINUX, reason="the preload acts on Linux only")
@pytest.mark.parametrize("finder", ["_find_mkl", "_find_pip_openblas"])
def test_named_library_is_loaded(tmp_path, finder):
    """Each pip-installed CBLAS loads when named, whatever the automatic order would pick and whatever the
    system has besides (the pip OpenBLAS needs no system libgfortran)."""
    path = getattr(_blas, finder)()
    if PIP_BLAS:
        assert path, f"{finder}: a declared dependency on Linux x86-64 is not installed (pyproject.toml)"
    if path:
        report = run_child(tmp_path, blas=path)
        assert report["info"]["loaded"] is True and report["info"]["name"] == "custom", report["info"]
        assert report["info"]["path"] == real(path) and report["warnings"] == []
        assert real(path) in map(real, report["libs"])
        if GLIBC:
            assert report["sgemm_calls"] == real(path)
    else:  # not installed here: naming a missing library must say so, once
        report = run_child(tmp_path, blas="/nonexistent/libopenblas.so.0")
        assert report["info"]["loaded"] is False
        assert len(report["warnings"]) == 1 and "/nonexistent/libopenblas.so.0" in report["warnings"][0]


@pytest.mark.skipif(not GLIBC, reason="reads glibc's LD_DEBUG bindings and /proc/self/maps")
def test_pip_openblas_runs_on_a_wheel_shipped_libgfortran(tmp_path):
    """The ngsolve-openblas library needs libgfortran.so.5 and the wheel has none: it must get a wheel's hashed
    build (here, with or without a system libgfortran), and the symlink folder it was opened through must be
    gone once it is loaded."""
    path = _blas._find_pip_openblas()
    if path is None:
        assert not PIP_BLAS, "ngsolve-openblas is a declared dependency on Linux x86-64 (pyproject.toml)"
        pytest.skip("ngsolve-openblas is not installed")
    report = run_child(tmp_path, blas=path)
    info = report["info"]
    assert info["loaded"] is True and info["path"] == real(path) and report["warnings"] == [], info
    assert report["sgemm_calls"] == real(path)
    via = [b for b in report["binders"] if os.path.basename(b) == os.path.basename(path)]
    assert len(via) == 1, report["binders"]
    folder = os.path.dirname(via[0])
    assert os.path.basename(folder).startswith("mlx_aim_blas-")
    assert real(os.path.dirname(folder)) == real(tempfile.gettempdir())
    assert not os.path.exists(folder)
    gfortran = [p for p in report["libs"] if os.path.basename(p).startswith("libgfortran")]
    assert info["libgfortran"] in gfortran
    assert info["libgfortran"] in _blas._shipped_libgfortran()
    # Hashed wheel builds only (MLX's, and NumPy's for its own BLAS): no system libgfortran.so.5 was used.
    assert all(os.path.basename(os.path.dirname(p)).endswith(".libs") for p in gfortran), gfortran
    assert not any(os.path.basename(p).startswith("libgfortran.so") for p in gfortran), gfortran


@pytest.mark.skipif(not GLIBC, reason="needs glibc's libm.so.6 as a library without CBLAS")
def test_named_library_without_cblas_is_refused(tmp_path, present):
    report = run_child(tmp_path, blas="libm.so.6")
    assert report["info"]["loaded"] is False
    assert len(report["warnings"]) == 1 and "does not export cblas_sgemm" in report["warnings"][0]
    _, bundled = present
    if bundled:
        assert report["sgemm_from"] == real(bundled)


def test_mlx_imported_first_warns_once(tmp_path, present):
    report = run_child(tmp_path, mlx_first=True)
    candidates, bundled = present
    info = report["info"]
    assert info["loaded"] is False and report["again"] == info
    assert loaded_blas_libraries(report) == []
    if LINUX and bundled:
        assert len(report["warnings"]) == 1 and "imported before mlx_aim" in report["warnings"][0]
        if GLIBC:
            assert report["sgemm_from"] == real(bundled)
    else:
        assert report["warnings"] == []


@pytest.mark.skipif(not LINUX, reason="the preload acts on Linux only")
def test_users_openblas_coretype_is_kept(tmp_path, present):
    candidates, _ = present
    report = run_child(tmp_path, extra_env={"OPENBLAS_CORETYPE": "Haswell"})
    info = report["info"]
    assert "coretype_set" not in info
    if info["name"] == "openblas":
        assert info["core"] == "Haswell"


def test_coretype_from_cpu_flags():
    avx2 = {"sse4_2", "avx", "avx2", "fma"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
    assert _blas._coretype_for("x86_64", "AuthenticAMD", avx2) == "Zen"
    assert _blas._coretype_for("x86_64", "GenuineIntel", avx2) == "Haswell"
    assert _blas._coretype_for("x86_64", "GenuineIntel", avx512) == "SkylakeX"
    assert _blas._coretype_for("x86_64", "GenuineIntel", {"sse4_2", "avx"}) is None  # leave detection alone
    assert _blas._coretype_for("aarch64", "", set()) is None


def test_amd_prefers_openblas_intel_prefers_mkl(monkeypatch):
    monkeypatch.setattr(_blas, "_find_mkl", lambda: "/x/libmkl_rt.so.2")
    monkeypatch.setattr(_blas, "_find_openblas", lambda: "/y/libopenblas.so.0")
    monkeypatch.setattr(_blas, "_cpuinfo", lambda: ("GenuineIntel", set()))
    assert [n for n, _ in _blas._candidates()] == ["mkl", "openblas"]
    monkeypatch.setattr(_blas, "_cpuinfo", lambda: ("AuthenticAMD", set()))
    assert [n for n, _ in _blas._candidates()] == ["openblas", "mkl"]
    monkeypatch.setattr(_blas, "_find_openblas", lambda: None)
    assert _blas._candidates() == [("mkl", "/x/libmkl_rt.so.2")]


def test_finds_mkl_in_the_environment_lib_dir(tmp_path, monkeypatch):
    lib = tmp_path / "env" / "lib"
    lib.mkdir(parents=True)
    (lib / "libmkl_rt.so.3").write_bytes(b"")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))
    assert str(lib) in _blas._lib_dirs()
    monkeypatch.setattr(_blas, "_lib_dirs", lambda: [str(tmp_path / "empty"), str(lib)])
    assert _blas._find_mkl() == str(lib / "libmkl_rt.so.3")


def test_bundled_reference_blas_is_recognised(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "mlx" / "lib").mkdir(parents=True)
    (site / "mlx" / "lib" / "libmlx.so").write_bytes(b"")
    monkeypatch.setattr(_blas, "_mlx_package_dirs", lambda: [str(site / "mlx")])
    assert _blas._bundled_reference_blas() is None  # a source build linked to whatever BLAS it chose
    (site / "mlx_cpu.libs").mkdir()
    (site / "mlx_cpu.libs" / "libblas-0123abcd.so.3.10.0").write_bytes(b"")
    assert _blas._bundled_reference_blas() == str(site / "mlx_cpu.libs" / "libblas-0123abcd.so.3.10.0")


def test_shipped_libgfortran_is_found_mlx_first(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    for folder in ("mlx/lib", "mlx_cpu.libs", "numpy", "numpy.libs"):
        (site / folder).mkdir(parents=True)
    (site / "mlx" / "lib" / "libmlx.so").write_bytes(b"")
    monkeypatch.setattr(_blas, "_mlx_package_dirs", lambda: [str(site / "mlx")])
    monkeypatch.setattr(_blas, "_package_dirs", lambda name: [str(site / name)] if name == "numpy" else [])
    assert _blas._shipped_libgfortran() == []
    numpys = site / "numpy.libs" / "libgfortran-040039e1-0352e75f.so.5.0.0"
    mlxs = site / "mlx_cpu.libs" / "libgfortran-f7379c93.so.5.0.0"
    numpys.write_bytes(b"")
    (site / "numpy.libs" / "libquadmath-96973f99.so.0.0.0").write_bytes(b"")
    assert _blas._shipped_libgfortran() == [str(numpys)]
    mlxs.write_bytes(b"")
    assert _blas._shipped_libgfortran() == [str(mlxs), str(numpys)]  # MLX's first: its LAPACK maps it anyway


def test_pip_openblas_without_a_shipped_libgfortran_is_skipped(monkeypatch):
    monkeypatch.setattr(_blas, "_shipped_libgfortran", lambda: [])
    with pytest.raises(OSError, match="neither the mlx.cpu. nor the numpy wheel ships one"):
        _blas._open_with_shipped_libgfortran("/x/libopenblasp-r0.3.33.so")


def test_a_candidate_that_cannot_load_is_skipped_and_reported(monkeypatch):
    """OpenBLAS that cannot load (say, one missing a dependency) does not cost the fast path: the next library
    loads, and blas_info() says what was skipped and why."""
    tried = []

    def fake_load(name, path):
        tried.append(name)
        if name == "openblas":
            return None, "libgfortran.so.5: cannot open shared object file"
        return _blas._result(f"found: {path}", name=name, path=path), ""

    monkeypatch.setattr(_blas, "_load", fake_load)
    candidates = [("openblas", "/x/libopenblas.so.0"), ("mkl", "/x/libmkl_rt.so.2")]
    monkeypatch.setattr(_blas, "_candidates", lambda: candidates)
    monkeypatch.setattr(_blas, "_bundled_reference_blas", lambda: "/x/libblas.so.3")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delitem(sys.modules, "mlx.core")  # restored after the test
    monkeypatch.delenv(_blas.ENV_VAR, raising=False)
    info = _blas._preload()
    assert tried == ["openblas", "mkl"]
    assert info["loaded"] is True and info["name"] == "mkl" and info["path"] == "/x/libmkl_rt.so.2"
    assert info["skipped"] == ["/x/libopenblas.so.0: libgfortran.so.5: cannot open shared object file"]


# ----------------------------------------------------------------------------------------------------
# The shim (csrc/blas_shim.c): the only BLAS names made global, so PyTorch keeps its own


def pip_libraries():
    """The declared pip BLAS libraries, by finder; on Linux x86-64 their absence is a packaging failure."""
    found = {finder: getattr(_blas, finder)() for finder in ("_find_mkl", "_find_pip_openblas")}
    if PIP_BLAS:
        assert all(found.values()), f"a declared dependency on Linux x86-64 is not installed: {found}"
    return found


@pytest.mark.skipif(not GLIBC, reason="reads glibc's LD_DEBUG bindings")
def test_every_blas_name_mlx_imports_goes_through_the_shim(tmp_path):
    """With every import bound at load (LD_BIND_NOW), libmlx.so binds the shim's names to the shim and nothing to
    its bundled reference BLAS or LAPACK: a name a new MLX imports and the shim lacks fails here."""
    shim, reason = _blas._shim()
    if PIP_BLAS:
        assert shim is not None, f"the BLAS shim is not available: {reason}"
    if shim is None:
        pytest.skip(reason)
    names = {shim.mlx_aim_blas_name(i).decode() for i in range(shim.mlx_aim_blas_count())}
    report = run_child(tmp_path, blas=pip_libraries()["_find_pip_openblas"], bind_now=True)
    info = report["info"]
    assert info["binding"] == "shim" and "from_reference" not in info, info
    to_shim = {name for name, lib in report["mlx_bound"].items() if lib == real(info["shim"])}
    assert to_shim == names
    reference = {name: lib for name, lib in report["mlx_bound"].items()
                 if os.path.basename(os.path.dirname(lib)).startswith("mlx") and
                 os.path.basename(lib).startswith(("libblas", "liblapack"))}
    assert reference == {}
    assert report["targets"] == {"cblas_sgemm": info["path"], "sgetrf_": info["path"]}


@pytest.mark.skipif(not PIP_BLAS, reason="the pip BLAS libraries are declared on Linux x86-64 only")
@pytest.mark.parametrize("finder", ["_find_mkl", "_find_pip_openblas"])
def test_torch_imported_after_mlx_aim_keeps_its_own_blas(tmp_path, finder):
    """PyTorch's CPU build links MKL statically and exports it; a globally loaded OpenBLAS 0.3.33 took over its
    cblas_dgemm_batch, declared differently, and float64 batched matmul crashed (AMD EPYC, 2026-12-01)."""
    report = run_child(tmp_path, blas=pip_libraries()[finder], with_torch=True)
    assert report["info"]["binding"] == "shim" and report["torch_err"] < 1e-4, report["info"]


@pytest.mark.skipif(not GLIBC, reason="reads glibc's LD_DEBUG bindings")
def test_a_cblas_without_lapack_keeps_mlx_lapack(tmp_path, present):
    """A library with CBLAS but no LAPACK (here MLX's own reference libblas, named): the shim's LAPACK names go to
    MLX's bundled LAPACK, and inv and svd stay correct (run_child checks them)."""
    _, bundled = present
    if bundled is None or _blas._shim()[0] is None:
        assert not PIP_BLAS, "MLX's bundled reference BLAS and the shim are there wherever pyproject.toml's pins hold"
        pytest.skip("needs MLX's bundled reference BLAS and the shim")
    report = run_child(tmp_path, blas=bundled)
    info = report["info"]
    assert info["binding"] == "shim" and "sgetrf_" in info["from_reference"] and "cblas_sgemm" not in info[
        "from_reference"]
    assert report["targets"]["cblas_sgemm"] == real(bundled)
    lapack = report["targets"]["sgetrf_"]
    assert os.path.basename(lapack).startswith("liblapack")
    assert os.path.dirname(lapack) == os.path.dirname(real(bundled))


def test_shim_binds_all_or_nothing():
    shim, reason = _blas._shim()
    if PIP_BLAS:
        assert shim is not None, reason
    if shim is None:
        pytest.skip(reason)
    count = shim.mlx_aim_blas_count()
    before = [shim.mlx_aim_blas_target(i) for i in range(count)]
    table = (ctypes.c_void_p * count)(*([1] * count))
    table[5] = None
    assert shim.mlx_aim_blas_bind(table) == 5
    assert [shim.mlx_aim_blas_target(i) for i in range(count)] == before
    assert shim.mlx_aim_blas_name(count) is None and shim.mlx_aim_blas_target(-1) is None


GLOBAL_CHILD = """
import importlib.util, json, os, sys, types
package = types.ModuleType("mlx_aim")  # the package without its __init__, which would preload the BLAS itself
package.__path__ = [os.path.dirname({path!r})]
sys.modules["mlx_aim"] = package
spec = importlib.util.spec_from_file_location("mlx_aim._blas", {path!r})
blas = importlib.util.module_from_spec(spec)
sys.modules["mlx_aim._blas"] = blas
spec.loader.exec_module(blas)
blas._find_shim = lambda: (None, "hidden by the test")
info = blas.preload_blas()
import mlx.core as mx
import numpy as np
a = np.arange(12, dtype=np.float32).reshape(3, 4)
print(json.dumps({{"info": info, "err": float(np.abs(np.array(mx.array(a) @ mx.array(a.T)) - a @ a.T).max())}}))
"""


@pytest.mark.skipif(not GLIBC, reason="reads glibc's LD_DEBUG bindings")
def test_without_the_shim_the_library_is_made_global(tmp_path):
    """Where the shim was not built, the library itself is reopened globally (what mlx_aim did before it)."""
    path = pip_libraries()["_find_pip_openblas"]
    if path is None:
        pytest.skip("ngsolve-openblas is not installed")
    env = {**os.environ, "MLX_AIM_BLAS": path, "LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(tmp_path / "ld")}
    code = GLOBAL_CHILD.format(path=str(ROOT / "mlx_aim" / "_blas.py"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = last_json(proc.stdout)
    assert report["info"]["binding"] == "global" and report["info"]["binding_reason"] == "hidden by the test"
    assert report["err"] == 0.0
    bound = [line for f in glob.glob(f"{tmp_path / 'ld'}.*") for line in open(f, errors="replace")
             if "libmlx" in line and "`cblas_sgemm'" in line]
    assert bound and all(os.path.basename(path) in line for line in bound), bound


SPIN_CHILD = """
import json, resource, time
import mlx_aim
import mlx.core as mx
from mlx_aim._blas import blas_info, set_num_threads
set_num_threads(2)
a = mx.random.normal((512, 512))
mx.eval(a @ a)

def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

mx.eval(a @ a)
before = cpu_seconds()
time.sleep(0.3)
print(json.dumps({"info": blas_info(), "idle_cpu": cpu_seconds() - before}))
"""


@pytest.mark.skipif(not PIP_BLAS, reason="needs the pip OpenBLAS (declared on Linux x86-64)")
def test_openblas_workers_sleep_after_a_call_unless_the_user_says_otherwise():
    """The CPU time a process spends asleep right after a threaded matmul: nothing with the timeout mlx_aim sets,
    while with OpenBLAS's longest spin (the user's OPENBLAS_THREAD_TIMEOUT=30, kept) its worker burns the whole
    sleep, which shows the probe sees spinning."""
    path = _blas._find_pip_openblas()
    assert path, "ngsolve-openblas is a declared dependency on Linux x86-64 (pyproject.toml)"

    def child(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("MLX_AIM_BLAS", _blas.SPIN_ENV)}
        proc = subprocess.run([sys.executable, "-c", SPIN_CHILD], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**base, "MLX_AIM_BLAS": path, **env})
        assert proc.returncode == 0, proc.stderr[-4000:]
        return last_json(proc.stdout)

    ours = child()
    assert ours["info"]["thread_timeout_set"] == _blas.OPENBLAS_THREAD_TIMEOUT and ours["info"]["threads"] >= 1
    assert ours["idle_cpu"] < 0.05, ours
    users = child(**{_blas.SPIN_ENV: "30"})
    assert "thread_timeout_set" not in users["info"]
    assert users["idle_cpu"] > 0.1, users
