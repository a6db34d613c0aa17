"""Builds mlx_aim's native CPU kernels (csrc/, an MLX extension) during `pip install` on Linux, where it can, and on
Linux x86-64 the BLAS shim (csrc/blas_shim.c, a plain C library that mlx_aim/_blas.py loads with ctypes). On macOS
neither is built and the package is pure Python (mlx_aim/platforms.py decides, for both).

Everything else about the package is in pyproject.toml. The extension is optional: when it cannot be built (no C++
compiler or CMake, an unsupported platform, a failed compile) the install still succeeds, the build prints why, and
mlx_aim runs its portable kernels, saying once at first use why it is slower (mlx_aim/backend/native.py).
MLX_AIM_BUILD_NATIVE=0 skips the build. The shim is optional too: without it mlx_aim/_blas.py makes the optimized
BLAS global itself, as it did before the shim.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

ROOT = Path(__file__).resolve().parent


def _platforms():
    """mlx_aim/platforms.py, loaded by path: the package's __init__ imports mlx, which a build may not have."""
    spec = importlib.util.spec_from_file_location("_mlx_aim_platforms", ROOT / "mlx_aim" / "platforms.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


platforms = _platforms()


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[], optional=True)  # optional: a missing module is not copied in place
        self.sourcedir = str(sourcedir)


class OptionalCMakeBuild(build_ext):
    """Runs CMake on csrc/ with this interpreter (whose mlx the kernels are compiled against) and puts the module where
    the package imports it (the source tree for an editable install); a failure is reported, not raised."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):  # the BLAS shim: setuptools' own C build
            try:
                super().build_extension(ext)
            except (CCompilerError, CompileError, LinkError, OSError) as error:
                print(f"mlx_aim: WARNING: BLAS shim not built ({error}); the optimized BLAS is made global instead",
                      file=sys.stderr)
            return
        if os.environ.get("MLX_AIM_BUILD_NATIVE", "").strip().lower() in ("0", "off", "false"):
            print("mlx_aim: MLX_AIM_BUILD_NATIVE=0, native CPU kernels not built", file=sys.stderr)
            return
        try:
            self._cmake_build(ext)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
            print(f"mlx_aim: WARNING: native CPU kernels not built ({error}); the package installs and runs its "
                  "portable kernels, slower on the CPU", file=sys.stderr)

    def _cmake_build(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("no cmake found")
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / "mlx_aim_native"
        out_dir = build_temp / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, ext.sourcedir, f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}"], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--config", "Release", f"-j{os.cpu_count() or 1}"], cwd=build_temp,
                       check=True)
        built = sorted(out_dir.glob("_native_kernels*"))
        if not built:
            raise RuntimeError(f"CMake produced no _native_kernels module in {out_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)


def extensions(platform) -> list:
    """What `pip install` compiles on `platform` (an mlx_aim.platforms.Platform)."""
    built = []
    if platforms.native_kernels_skipped(platform) is None:
        built.append(CMakeExtension("mlx_aim._native_kernels", ROOT / "csrc"))
    if platforms.builds_blas_shim(platform):
        built.append(Extension("mlx_aim._blas_shim", sources=["csrc/blas_shim.c"], extra_compile_args=["-O2"],
                               optional=True))
    return built


if __name__ == "__main__":  # as setuptools' build backend and pip run it; tests import `extensions`
    here = platforms.current()
    skipped = platforms.native_kernels_skipped(here)
    if skipped is not None:
        print(f"mlx_aim: native CPU kernels {skipped}", file=sys.stderr)
    setup(ext_modules=extensions(here), cmdclass={"build_ext": OptionalCMakeBuild})
