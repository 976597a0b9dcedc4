"""Which nvcc CMakeLists.txt builds the CUDA kernels with when several CUDA toolkits are here.

The rule: the kernels link cudart statically, so they run on a driver that supports their
toolkit's CUDA major version (CUDA 13 needs R580 or newer, CUDA 12 R525). torch's CUDA
wheels need the driver of *their* CUDA. A toolkit of the same major version as the installed
torch's (``torch.version.cuda``) therefore asks for no newer driver than torch does: where a
toolkit of that major version is installed, build with it -- nvcc on PATH when it is one,
else the newest of them; where none is, or torch has no CUDA, keep CMake's own choice.

torch's CUDA version comes from, first to answer:
  * ``DRT_FAST_TORCH_CUDA`` (``12.4``; ``none`` or empty: no preference) -- for installs
    into an environment other than the one running the build (uv's isolated builds);
  * the ``torch/version.py`` of the torch that this interpreter would import, read as text
    (torch is not imported). CMake runs this script with ``python -E``: pip's build
    isolation hides the site-packages with PYTHONPATH, which -E ignores, so the torch found
    is the one the package is being installed next to.
Candidates, in order: nvcc on PATH, then $CUDA_HOME, $CUDA_PATH, $CUDA_ROOT, /usr/local/cuda,
/usr/local/cuda-*, /opt/cuda (``<toolkit>/bin/nvcc``); their versions from ``nvcc --version``.
CMakeLists.txt asks only when neither CUDACXX nor CMAKE_CUDA_COMPILER names a compiler.

Prints the chosen nvcc's path on stdout (nothing: keep CMake's choice) and one line saying
why on stderr. Python 3.8+, standard library only (it runs before any build requirement).
"""
import glob
import importlib.machinery
import os
import re
import shutil
import subprocess
import sys


def torch_cuda(environ=os.environ, search_path=None):
    """torch's CUDA version as a string ("12.4"), or None (no preference), and where it came from."""
    given = environ.get("DRT_FAST_TORCH_CUDA")
    if given is not None:
        given = given.strip()
        return (None if given.lower() in ("", "none", "cpu") else given), "DRT_FAST_TORCH_CUDA"
    try:
        spec = importlib.machinery.PathFinder.find_spec("torch", search_path)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, "no torch installed"
    version_py = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    try:
        with open(version_py, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None, f"no {version_py}"
    found = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([0-9][0-9.]*)['\"]", text, re.M)
    return (found.group(1) if found else None), version_py


def nvcc_version(nvcc):
    """(major, minor) of an nvcc, or None when it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def candidates(environ=os.environ, roots=None):
    """nvcc paths to consider, in order, each once (by real path); nvcc on PATH first."""
    if roots is None:
        roots = [environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT")]
        roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*")) + ["/opt/cuda"]
    paths = [shutil.which("nvcc", path=environ.get("PATH", os.defpath))]
    paths += [os.path.join(root, "bin", "nvcc") for root in roots if root]
    seen, found = set(), []
    for path in paths:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append(path)
    return found


def choose(wanted, toolkits):
    """The nvcc to build with, or None (CMake's choice), and why. ``wanted``: torch's CUDA
    version string or None; ``toolkits``: [(nvcc path, (major, minor) or None)] in candidate
    order (`candidates`)."""
    if wanted is None:
        return None, "no CUDA torch to match: CMake picks the CUDA toolkit"
    major = int(wanted.split(".")[0])
    matching = [(path, v) for path, v in toolkits if v is not None and v[0] == major]
    found = ", ".join(f"{v[0]}.{v[1]} ({path})" for path, v in toolkits if v is not None) or "none"
    if not matching:
        return None, (f"torch uses CUDA {wanted}, but no CUDA {major} toolkit is installed (found: {found}); "
                      f"the kernels will need a driver for the toolkit CMake picks")
    path, v = matching[0] if matching[0] == toolkits[0] else max(matching, key=lambda t: t[1])
    return path, f"CUDA {v[0]}.{v[1]} toolkit {path}, the major version of torch's CUDA {wanted} (found: {found})"


def main():
    wanted, source = torch_cuda()
    toolkits = [(path, nvcc_version(path)) for path in candidates()] if wanted else []
    path, why = choose(wanted, toolkits)
    print(f"{why} [torch's CUDA from {source}]", file=sys.stderr)
    if path:
        print(path)


if __name__ == "__main__":
    main()
