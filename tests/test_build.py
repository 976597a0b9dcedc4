"""The build: compiled modules present and torch-free, packaging metadata as DESIGN.md fixes it."""
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import drt_fast
from cli_fixtures import NEUTRAL_CWD, subprocess_env
from drt_fast import _C, ops

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_module_is_the_compiled_extension_next_to_the_package():
    module = Path(_C.__file__)
    assert module.parent == Path(drt_fast.__file__).parent
    assert module.suffix in (".so", ".pyd")
    assert _C.cpu_isa() in ("baseline", "avx2", "avx512")


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
@pytest.mark.parametrize("name", ["_C", "_C_cuda"])
def test_modules_link_neither_libtorch_nor_shared_cudart(name):
    module = {"_C": ops.extension.cpu_kernels, "_C_cuda": ops.extension.cuda_kernels}[name]
    if module is None:
        pytest.skip(f"drt_fast.{name} was not built")
    needed = subprocess.run(["readelf", "-d", module.__file__], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in needed and "libc10" not in needed
    assert "libcudart" not in needed  # cudart is linked statically


def test_cuda_module_imports_and_answers_without_a_driver():
    if ops.extension.cuda_kernels is None:
        pytest.skip("built without CUDA kernels")
    count = ops.extension.cuda_kernels.device_count()  # 0, not a crash, where no driver answers
    assert isinstance(count, int) and count >= 0
    assert drt_fast.cuda_available() == (count > 0)


def test_cuda_module_reports_driver_and_runtime_versions():
    """What drt_fast needs to say "driver for CUDA 12.2 found, CUDA 13.0 needed": the driver's
    CUDA version (0: none), the runtime the kernels were built with, and why no device answers."""
    if ops.extension.cuda_kernels is None:
        pytest.skip("built without CUDA kernels")
    info = ops.extension.cuda_kernels.runtime_info()
    assert set(info) == {"driver_version", "runtime_version", "device_count", "error_code", "error"}
    assert info["runtime_version"] >= 11000 and info["runtime_version"] % 10 == 0
    assert info["driver_version"] >= 0 and info["device_count"] == ops.extension.cuda_kernels.device_count()
    if info["device_count"] == 0:       # no driver, an old one, or no GPU: named, not raised
        assert info["error_code"] != 0 and info["error"].startswith("cudaError")
    else:
        assert info["error_code"] == 0 and info["error"] is None
        assert info["driver_version"] >= info["runtime_version"] // 1000 * 1000
    # the toolkit CMake built with (this in-place build's, when there is one)
    found = list(ROOT.glob("build/*/cmake/CMakeFiles/*/CMakeCUDACompiler.cmake"))
    if len(found) == 1 and not Path(drt_fast.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()):
        version = re.search(r'set\(CMAKE_CUDA_COMPILER_VERSION "(\d+)\.(\d+)', found[0].read_text())
        assert version and info["runtime_version"] == 1000 * int(version[1]) + 10 * int(version[2])
    # and the same in a fresh interpreter (the first CUDA call of a process), without a crash
    code = "import drt_fast.ops as o; print(o.extension.cuda_kernels.runtime_info()['runtime_version'])"
    here = {**os.environ, "PYTHONPATH": str(Path(drt_fast.__file__).resolve().parents[1])}  # this drt_fast
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/", env=here)
    assert int(out.stdout) == info["runtime_version"]


def test_this_install_says_why_its_cuda_kernels_run_or_not():
    """`ops.cuda_status` of this install agrees with runtime_info(), and the driver the build's
    CUDA major version needs is known (the table `DRIVER_FOR_CUDA`)."""
    status = ops.cuda_status()
    assert status.state in ops.extension.CUDA_STATES
    assert (status.message is None) == (status.state == "ready") == drt_fast.cuda_available()
    if ops.extension.cuda_kernels is None:
        assert status.state in ("not built", "fails to load")
        return
    info = ops.extension.cuda_kernels.runtime_info()
    assert (status.driver_version, status.runtime_version) == (info["driver_version"], info["runtime_version"])
    assert info["runtime_version"] // 1000 in ops.extension.DRIVER_FOR_CUDA
    if status.state != "ready":
        assert info["error"] in status.message and "R" + str(
            ops.extension.DRIVER_FOR_CUDA[info["runtime_version"] // 1000]) in status.message


def test_the_drivers_named_in_prose_agree_with_the_table():
    """The driver each CUDA major version needs is stated once, in code (DRIVER_FOR_CUDA);
    the README and the build's comments that name one must agree with it."""
    named = 0
    for path in ("README.md", "CMakeLists.txt", "setup.py", "cmake/pick_cuda_toolkit.py", "docs/internals.md"):
        text = (ROOT / path).read_text()
        for major, release in re.findall(r"CUDA (\d+)(?:\.x)?(?: needs|:| toolkit needs)? R(\d{3})", text):
            assert ops.extension.DRIVER_FOR_CUDA[int(major)] == int(release), (path, major, release)
            named += 1
    assert named >= 2


def test_cuda_module_names_the_architectures_it_was_built_for():
    if ops.extension.cuda_kernels is None:
        pytest.skip("built without CUDA kernels")
    archs = ops.extension.cuda_kernels.architectures()
    assert archs and ";" not in archs
    # the build's own: the default 80;90 unless CMAKE_CUDA_ARCHITECTURES chose others
    cache = list(Path(__file__).resolve().parents[1].glob("build/*/cmake/CMakeCache.txt"))
    if cache and not Path(drt_fast.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()):
        line = [l for l in cache[0].read_text().splitlines() if l.startswith("CMAKE_CUDA_ARCHITECTURES:")]
        assert line and line[0].split("=", 1)[1].replace(";", ",") == archs


def test_a_cuda_module_that_fails_to_load_is_told_apart_from_none(tmp_path):
    """A copy of the package whose _C_cuda is damaged, and one without it."""
    source = os.path.dirname(drt_fast.__file__)
    # (an editable install's finder would supply the missing module from the source tree)
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'ditable' not in repr(f)]\n"
            "import drt_fast.ops as o; e = o.extensions(); print(e.cuda is None, repr(e.cuda_error))")
    for case in ("damaged", "absent"):
        pkg = tmp_path / case / "drt_fast"
        shutil.copytree(source, pkg, ignore=shutil.ignore_patterns("_C_cuda*", "__pycache__"))
        if case == "damaged":
            (pkg / os.path.basename(next(iter(glob.glob(os.path.join(source, "_C.*.so")))))
             .replace("_C.", "_C_cuda.")).write_bytes(b"not a shared object")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=tmp_path / case, check=True).stdout.split(maxsplit=1)
        assert out[0] == "True"
        assert (out[1].strip() == "None") == (case == "absent"), out


# ---- the CUDA build: float semantics pinned, the toolkit of torch's CUDA --------------------
_APPROXIMATE = re.compile(r"\b(?:div|sqrt|rcp|rsqrt|ex2|lg2|sin|cos)\.(?:approx|full)\b|\.ftz\b|\b(?:fma|mad)\.")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_a_users_fast_math_cannot_change_the_noise(tmp_path):
    """CUDAFLAGS=--use_fast_math (the same CMAKE_CUDA_FLAGS as -DCMAKE_CUDA_FLAGS=...) reaches
    nvcc before the target's own -prec-div=true -prec-sqrt=true -ftz=false --fmad=false, which
    win: the noise kernel's PTX, compiled with CMake's own command line, has no approximate
    division or square root, no flush to zero and no fused multiply-add."""
    pybind11 = pytest.importorskip("pybind11")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("needs cmake")
    build = tmp_path / "build"
    args = [cmake, "-S", str(ROOT), "-B", str(build), "-DDRT_FAST_CUDA=1", "-DCMAKE_CUDA_ARCHITECTURES=90",
            "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    env = {**os.environ, "CUDAFLAGS": "--use_fast_math"}
    configured = subprocess.run(args, capture_output=True, text=True, env=env)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    entries = json.loads((build / "compile_commands.json").read_text())
    (entry,) = [e for e in entries if e["file"].endswith("csrc/cuda/noise.cu")]
    words = shlex.split(entry["command"])
    assert "--use_fast_math" in words
    # the same command, PTX for one architecture instead of an object
    ptx = tmp_path / "noise.ptx"
    drop_with_value = {"-o", "-MT", "-MF", "-x"}
    command, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in drop_with_value:
            skip = True
        elif word not in ("-c", "-MD") and not word.startswith(("--generate-code", "-gencode", "-arch")):
            command.append(word)
    subprocess.run(command + ["-arch=compute_90", "-ptx", "-o", str(ptx)], cwd=entry["directory"], check=True,
                   capture_output=True, text=True)
    text = ptx.read_text()
    assert not sorted(set(_APPROXIMATE.findall(text)))
    assert "div.rn.f32" in text and "sqrt.rn.f32" in text   # Box-Muller's, IEEE-rounded
    pinned = [w for w in words[words.index("--use_fast_math"):]
              if w in ("-prec-div=true", "-prec-sqrt=true", "-ftz=false", "--fmad=false")]
    assert sorted(pinned) == ["--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]  # after it
    assert "torch's CUDA from" in configured.stdout    # cmake/pick_cuda_toolkit.py answered the configure


def _toolkit_picker():
    path = ROOT / "cmake" / "pick_cuda_toolkit.py"
    if not path.exists():
        pytest.skip("needs the source tree")
    spec = importlib.util.spec_from_file_location("pick_cuda_toolkit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_toolkit(root: Path, version: str) -> Path:
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.1'\n")
    nvcc.chmod(0o755)
    return nvcc


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-ins for nvcc")
def test_the_toolkit_of_torchs_cuda_major_version_is_preferred(tmp_path):
    """Several toolkits: the one of torch's CUDA major version -- nvcc on PATH when it is one,
    else the newest of them; none of it: CMake's own choice, and a line saying so."""
    pick = _toolkit_picker()
    on_path = _fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    old, newer = _fake_toolkit(tmp_path / "cuda-12.1", "12.1"), _fake_toolkit(tmp_path / "cuda-12.4", "12.4")
    environ = {"PATH": str(on_path.parent)}
    found = pick.candidates(environ, roots=[str(tmp_path / "cuda-12.1"), str(tmp_path / "cuda-12.4"),
                                            str(tmp_path / "cuda-13.0"), str(tmp_path / "nowhere")])
    assert found == [str(on_path), str(old), str(newer)]          # PATH first, each toolkit once
    toolkits = [(path, pick.nvcc_version(path)) for path in found]
    assert [v for _, v in toolkits] == [(13, 0), (12, 1), (12, 4)]
    assert pick.choose("12.6", toolkits)[0] == str(newer)
    assert pick.choose("13.0", toolkits)[0] == str(on_path)
    assert pick.choose("12.1", toolkits[1:])[0] == str(old)          # the first candidate matches
    path, why = pick.choose("11.8", toolkits)
    assert path is None and "no CUDA 11 toolkit" in why
    assert pick.choose(None, toolkits)[0] is None                   # a CPU torch: no preference
    # as CMakeLists.txt runs it: the path on stdout, why on stderr
    env = {"PATH": f"{on_path.parent}{os.pathsep}{os.environ.get('PATH', '')}", "CUDA_HOME": str(tmp_path / "cuda-12.4"),
           "DRT_FAST_TORCH_CUDA": "12.4"}
    out = subprocess.run([sys.executable, "-E", str(ROOT / "cmake" / "pick_cuda_toolkit.py")], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(newer) and "CUDA 12.4 toolkit" in out.stderr


def test_torchs_cuda_version_is_read_without_importing_torch(tmp_path):
    pick = _toolkit_picker()
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("raise ImportError('never imported')\n")
    version = site / "torch" / "version.py"
    version.write_text("from typing import Optional\n__version__ = '2.9.0+cu128'\ncuda: Optional[str] = '12.8'\n")
    assert pick.torch_cuda({}, [str(site)])[0] == "12.8"
    version.write_text("__version__ = '2.9.0+cpu'\ncuda = None\n")
    assert pick.torch_cuda({}, [str(site)])[0] is None
    assert pick.torch_cuda({}, [str(tmp_path / "empty")]) == (None, "no torch installed")
    assert pick.torch_cuda({"DRT_FAST_TORCH_CUDA": "12.4"}, [str(site)]) == ("12.4", "DRT_FAST_TORCH_CUDA")
    assert pick.torch_cuda({"DRT_FAST_TORCH_CUDA": "none"}, [str(site)])[0] is None


@pytest.mark.parametrize("archs, capability, runs", [
    ("80,90", (8, 0), True), ("80,90", (8, 6), True), ("80,90", (8, 9), True),
    ("80,90", (9, 0), True), ("80,90", (10, 0), True),     # compute_90 PTX, compiled by the driver
    ("80,90", (7, 5), False), ("80,90", (7, 0), False),     # T4, V100: nothing to run
    ("80-real,90-real", (10, 0), False), ("80-real,90-real", (8, 6), True),
    ("86-real", (8, 0), False), ("90-virtual", (12, 0), True), ("90-virtual", (8, 9), False),
    ("90a", (9, 0), True), ("90a", (10, 0), False), ("75", (7, 5), True),
    ("native", (7, 5), True), ("all-major", (6, 1), True), ("", (7, 5), True), ("80;90", (7, 5), False),
])
def test_arch_covers_follows_cuda_compatibility(archs, capability, runs):
    assert ops.arch_covers(archs, capability) is runs


def test_import_needs_no_cuda_driver_in_a_fresh_interpreter():
    code = "import drt_fast, drt_fast.ops as o; print(drt_fast.cuda_available(), o.extension.cpu_kernels is not None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=NEUTRAL_CWD, env=subprocess_env())         # the drt_fast under test
    assert out.stdout.split()[1] == "True"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_pyproject_requirements():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build_requires = " ".join(meta["build-system"]["requires"]).lower()
    assert "torch" not in build_requires
    for needed in ("setuptools", "pybind11", "cmake", "ninja"):
        assert needed in build_requires
    torch_dep = [d for d in meta["project"]["dependencies"] if d.startswith("torch")]
    assert torch_dep == ["torch>=2.4"]  # a range, never a pin
    assert meta["project"]["scripts"]["drt-fast"] == "drt_fast.cli:main"


def test_sdist_carries_the_build_inputs_and_the_whole_test_suite(tmp_path):
    """What `python -m build --sdist` packs (setuptools' SOURCES.txt): everything CMake builds
    from, and every tests/ file -- setuptools adds only tests/test*.py by itself, and those
    need conftest.py's fixtures and the helpers beside them."""
    pytest.importorskip("setuptools")
    if not (ROOT / "setup.py").exists():
        pytest.skip("needs the source tree")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    sources = set((tmp_path / "drt_fast.egg-info" / "SOURCES.txt").read_text().split())
    needed = ["CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "conftest.py"]
    for pattern in ("csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.cuh", "cmake/*.py", "drt_fast/assets/*",
                    "tests/*.py"):
        needed += [path.relative_to(ROOT).as_posix() for path in ROOT.glob(pattern)]
    assert "tests/conftest.py" in needed and "csrc/bindings.cpp" in needed and "cmake/pick_cuda_toolkit.py" in needed
    assert sorted(set(needed) - sources) == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_the_version_is_stated_once(tmp_path):
    """pyproject takes the version from drt_fast.__version__; the metadata a build writes
    carries it."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "drt_fast.__version__"}
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    pkg_info = (tmp_path / "drt_fast.egg-info" / "PKG-INFO").read_text().splitlines()
    assert f"Version: {drt_fast.__version__}" in pkg_info


def _setup_functions(monkeypatch):
    """setup.py's module namespace, without running setup()."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    return runpy.run_path(str(ROOT / "setup.py"))


def test_setup_honours_cmake_generator_and_cmake_args(monkeypatch):
    """As pybind11's cmake_example: CMAKE_GENERATOR other than Ninja is left to CMake (which
    reads it), CMAKE_ARGS are passed to the configure step; DRT_FAST_CMAKE_ARGS still is."""
    if not (ROOT / "setup.py").exists():
        pytest.skip("needs the source tree")
    setup = _setup_functions(monkeypatch)
    generator, user = setup["generator_args"], setup["user_args"]
    ninja = setup["_ninja_program"]()
    default = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    assert generator({}) == default and generator({"CMAKE_GENERATOR": "Ninja"}) == default
    assert generator({"CMAKE_GENERATOR": "Unix Makefiles"}) == []
    assert user({}) == []
    assert user({"CMAKE_ARGS": "-DA=1  -DB='two words'"}) == ["-DA=1", "-DB=two words"]
    assert user({"DRT_FAST_CMAKE_ARGS": "-DC=3"}) == ["-DC=3"]
    assert user({"CMAKE_ARGS": "-DA=1", "DRT_FAST_CMAKE_ARGS": "-DA=2"}) == ["-DA=1", "-DA=2"]


class _FakeDist:
    def __init__(self, folder):
        self.metadata = {"Name": "drt-fast"}
        self._folder = folder

    def locate_file(self, name):
        return self._folder / name


def test_missing_kernels_name_the_installed_copy_the_source_tree_shadows(tmp_path, monkeypatch):
    # `python -m drt_fast` / `torchrun -m drt_fast` from the repository root after a plain
    # `pip install .` import the source tree, which has no _C: the error must say so and
    # where the installed copy is, not ask for the `pip install .` that was already done.
    installed = tmp_path / "site-packages" / "drt_fast"
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    here = ops.extension.PACKAGE_DIR
    monkeypatch.setattr(ops.extension, "cpu_kernels", None)
    monkeypatch.setattr(ops.extension, "cpu_import_error", ImportError("cannot import name '_C'"))
    monkeypatch.setattr("importlib.metadata.distributions",
                        lambda: [_FakeDist(here.parent), _FakeDist(installed.parent)])
    with pytest.raises(ImportError) as err:
        ops.extension.require_cpu_kernels()
    message = str(err.value)
    assert str(installed.resolve()) in message and "shadows" in message
    assert "drt-fast -- certify" in message and "\n" not in message
    # Only the source tree (or an editable install, with no package folder): the plain message.
    monkeypatch.setattr("importlib.metadata.distributions",
                        lambda: [_FakeDist(here.parent), _FakeDist(tmp_path / "nowhere")])
    with pytest.raises(ImportError, match="must be built and installed"):
        ops.extension.require_cpu_kernels()
