"""Build drt_fast._C (and _C_cuda where nvcc is found) with CMake, as in pybind11's cmake example.

Works for `pip install .` (with build isolation), `pip install -e .` and
`python setup.py build_ext --inplace`. Environment:
  DRT_FAST_CUDA=auto|0|1        build the CUDA kernels (auto: when CMake finds nvcc)
  CMAKE_CUDA_ARCHITECTURES=...  CUDA architectures (default "80;90")
  CMAKE_BUILD_PARALLEL_LEVEL=N  parallel compile jobs (default: CPU count)
  CMAKE_GENERATOR=...           CMake's generator (default: Ninja, from the ninja package)
  CMAKE_ARGS="..."              extra arguments for the CMake configure step
  DRT_FAST_CMAKE_ARGS="..."     the same (an older name), after CMAKE_ARGS
  DRT_FAST_TORCH_CUDA=12.4      torch's CUDA version, for the choice of CUDA toolkit (default:
                                read from the torch installed beside the build; "none": no preference)
Where several CUDA toolkits are installed and neither CUDACXX nor CMAKE_CUDA_COMPILER names one,
CMake builds with the one of torch's CUDA major version (CMakeLists.txt, cmake/pick_cuda_toolkit.py):
the kernels link cudart statically and need a driver for their toolkit's major version, so they
then need no newer driver than torch itself.
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension that CMakeLists.txt builds (no sources for setuptools to compile)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _ninja_program():
    """Path of a ninja executable, preferring the `ninja` package of this (possibly isolated) env."""
    try:
        import ninja

        path = Path(ninja.BIN_DIR) / "ninja"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("ninja")


def generator_args(environ) -> list:
    """``-G Ninja`` with the ninja of this (possibly isolated) env, unless CMAKE_GENERATOR
    names another generator: CMake reads that variable itself (pybind11's cmake_example)."""
    if environ.get("CMAKE_GENERATOR", "Ninja") not in ("", "Ninja"):
        return []
    ninja = _ninja_program()
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []


def user_args(environ) -> list:
    """The user's extra configure arguments: CMAKE_ARGS (the convention of pybind11's
    cmake_example and conda-forge), then DRT_FAST_CMAKE_ARGS (this project's older name)."""
    return [*shlex.split(environ.get("CMAKE_ARGS", "")),
            *shlex.split(environ.get("DRT_FAST_CMAKE_ARGS", ""))]


def _cmake_program():
    try:
        import cmake

        path = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("cmake") or "cmake"


class CMakeBuild(build_ext):
    def build_extensions(self):
        import pybind11

        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # A cache from an earlier build may point at a deleted isolated env (its ninja, its
        # python): drop the cache and CMake's probes (compiler checks, try-compiles), keep the
        # object files (CMakeFiles/<target>.dir) for an incremental build. Ninja rebuilds an
        # object whose command line changed, so a reused one is always one this build wants.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        if (build_dir / "CMakeFiles").is_dir():
            for entry in (build_dir / "CMakeFiles").iterdir():
                if not (entry.is_dir() and entry.name.endswith(".dir")):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

        outputs = [(ext, Path(self.get_ext_fullpath(ext.name)).resolve()) for ext in self.extensions]
        out_dir = outputs[0][1].parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for _, path in outputs:  # never ship a stale module from an earlier build
            path.unlink(missing_ok=True)

        cuda = os.environ.get("DRT_FAST_CUDA", "auto").strip().lower() or "auto"
        if cuda not in ("auto", "0", "1"):
            raise SystemExit(f"DRT_FAST_CUDA must be auto, 0 or 1, got {cuda!r}")
        # Options are always passed: a cached value must never decide a build.
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DDRT_FAST_CUDA={cuda}",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CMAKE_CUDA_ARCHITECTURES', '80;90')}",
        ]
        args += generator_args(os.environ) + user_args(os.environ)

        cmake = _cmake_program()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)

        # _C_cuda exists only where CUDA was built: drop what CMake did not produce, so that
        # setuptools neither copies nor installs a module that is not there.
        self.missing = [ext.name for ext, path in outputs if not path.exists()]
        if "drt_fast._C" in self.missing:
            raise SystemExit("CMake did not produce drt_fast._C")
        self.extensions = [ext for ext, path in outputs if path.exists()]

    def copy_extensions_to_source(self):
        # --inplace / editable: nor leave an old module of a kind not built now in the source tree
        for name in getattr(self, "missing", []):
            for stale in (ROOT / "drt_fast").glob(name.rsplit(".", 1)[1] + ".*"):
                if stale.suffix in (".so", ".pyd"):
                    stale.unlink()
        super().copy_extensions_to_source()


setup(
    ext_modules=[CMakeExtension("drt_fast._C"), CMakeExtension("drt_fast._C_cuda")],
    cmdclass={"build_ext": CMakeBuild},
)
