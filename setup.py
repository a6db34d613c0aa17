"""Builds mlx_aim's native CPU kernels (csrc/, an MLX extension) during `pip install`, where it can, and on Linux
x86-64 the BLAS shim (csrc/blas_shim.c, a plain C library that mlx_aim/_blas.py loads with ctypes).

Everything else about the package is in pyproject.toml. The extension is optional: when it cannot be built (no C++
compiler or CMake, an unsupported platform, a failed compile) the install still succeeds, the build prints why, and
mlx_aim runs its portable kernels, saying once at first use why it is slower (mlx_aim/native.py).
MLX_AIM_BUILD_NATIVE=0 skips the build. The shim is optional too: without it mlx_aim/_blas.py makes the optimized
BLAS global itself, as it did before the shim.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
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


extensions = [CMakeExtension("mlx_aim._native_kernels", ROOT / "csrc")]
if sys.platform.startswith("linux") and platform.machine() == "x86_64":
    extensions.append(Extension("mlx_aim._blas_shim", sources=["csrc/blas_shim.c"], extra_compile_args=["-O2"]))
setup(ext_modules=extensions, cmdclass={"build_ext": OptionalCMakeBuild})
