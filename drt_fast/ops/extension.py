"""The compiled kernels: loading ``drt_fast._C`` / ``_C_cuda``, and which implementation runs.

This module is the only one that imports the compiled modules. For each tensor an op gets,
`kernels_for` names the compiled module that runs it, or None where the op's pure-torch
reference (`drt_fast.ops.reference`) runs instead:

* under the reference switch (`use_reference`, or ``DRT_FAST_REFERENCE_OPS=1`` in the
  environment when drt_fast.ops is imported): every op, on every device;
* CUDA tensors where the CUDA kernels were not built, fail to load, find no driver or one
  too old for the CUDA they were built with, find no device (`cuda_status` says which), or
  hold no code for the GPU (`kernels_run_on`): with one RuntimeWarning a process that says
  which and what to do;
* CUDA tensors of an op whose CUDA kernel failed its first-use check on their device
  (`selfcheck`): with one RuntimeWarning naming the device and the op.

Importing never fails for lack of a build or a driver; a CPU op without ``_C`` raises an
ImportError that says how to build it (`require_cpu_kernels`).
"""
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import InvalidArgument
from . import selfcheck

# The compiled CPU kernels; the source tree has none until `pip install .` (or -e .) built it.
try:
    from .. import _C as cpu_kernels
    cpu_import_error: Optional[ImportError] = None
except ImportError as exc:  # pragma: no cover - depends on the build
    cpu_kernels = None
    cpu_import_error = exc

# The CUDA kernels, built only where nvcc was found. Not built (no such module) is normal;
# a module that exists but fails to load is not: `cuda_import_error` holds why.
cuda_import_error: Optional[ImportError] = None
try:
    from .. import _C_cuda as cuda_kernels
except ImportError as exc:
    cuda_kernels = None
    if importlib.util.find_spec(f"{__package__.rpartition('.')[0]}._C_cuda") is not None:
        cuda_import_error = exc

class Extensions(NamedTuple):
    """The compiled kernel modules this install loaded: ``cpu`` (``_C``) and ``cuda``
    (``_C_cuda``), None where absent; ``cuda_error``: why a ``_C_cuda`` that exists failed
    to load (None when it loaded or was never built)."""

    cpu: object
    cuda: object
    cuda_error: Optional[BaseException]


def extensions() -> Extensions:
    """What `Extensions` says of this install (for ``drt-fast --version``)."""
    return Extensions(cpu_kernels, cuda_kernels, cuda_import_error)


# dtype codes of the kernels' arguments (csrc/bindings.cpp)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# The folder of the drt_fast package this module belongs to.
PACKAGE_DIR = Path(__file__).resolve().parent.parent

REFERENCE_ENV = "DRT_FAST_REFERENCE_OPS"
_reference = os.environ.get(REFERENCE_ENV, "") == "1"


class use_reference:
    """Run every op -- custom op and eager twin, CPU and CUDA -- as its pure-torch
    reference (``enabled=True``) or by the compiled kernels where they run (False).

    A function call sets the switch for the process (as ``torch.set_grad_enabled`` does);
    used as a context manager, it restores the previous setting on exit::

        with drt_fast.ops.use_reference():
            ...                                  # the references, bit-identical noise

    ``DRT_FAST_REFERENCE_OPS=1`` in the environment sets it when drt_fast.ops is imported.
    """

    def __init__(self, enabled: bool = True):
        global _reference
        self._previous = _reference
        _reference = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        global _reference
        _reference = self._previous


def reference_in_use() -> bool:
    """Whether the reference switch (`use_reference`) is on."""
    return _reference


_cuda_ok = None


def cuda_available() -> bool:
    """Whether the CUDA kernels were built and a CUDA driver answers with at least one device.

    Never raises: a build without CUDA or a machine without a driver just gives False.
    """
    global _cuda_ok
    if _cuda_ok is None:
        try:
            _cuda_ok = cuda_kernels is not None and cuda_kernels.device_count() > 0
        except Exception:  # a broken driver must not break `import drt_fast`
            _cuda_ok = False
    return _cuda_ok


def arch_covers(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a build for ``CMAKE_CUDA_ARCHITECTURES`` ``archs`` (comma- or
    semicolon-separated: ``"80,90"``, ``"80-real,90-virtual"``, ``"90a"``) holds code a GPU of
    compute ``capability`` ``(major, minor)`` runs: a cubin of its major version and no higher
    minor one, or PTX of no higher version (which the driver compiles). A list CMake expands
    itself (``native``, ``all``, ``all-major``) or an empty one cannot be judged: True."""
    entries = [e.strip() for e in archs.replace(";", ",").split(",") if e.strip()]
    for entry in entries:
        name, _, kind = entry.partition("-")
        specific = name[-1:] in ("a", "f")          # 90a, 100f: that GPU family only
        digits = name[:-1] if specific else name
        if not digits.isdigit():
            return True
        major, minor = divmod(int(digits), 10)
        if kind in ("", "real") and major == capability[0] and minor <= capability[1]:
            if not specific or minor == capability[1]:
                return True
        if kind in ("", "virtual") and not specific and (major, minor) <= tuple(capability):
            return True
    return not entries


_device_ok: dict = {}


def kernels_run_on(device) -> bool:
    """Whether the CUDA kernels run on CUDA ``device``: the reference switch is off, they
    were built, a driver answers, and the build holds code for the device's GPU
    (`arch_covers`). Where the build has no code for it, CUDA tensors there use the
    pure-torch references, with one warning saying how to rebuild."""
    if _reference or not cuda_available():
        return False
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_ok:
        archs = getattr(cuda_kernels, "architectures", lambda: "")()
        capability = torch.cuda.get_device_capability(index)
        _device_ok[index] = arch_covers(archs, capability)
        if not _device_ok[index]:
            warn_cuda_fallback(uncovered_gpu_message(archs, capability, torch.cuda.get_device_name(index)))
    return _device_ok[index]


# The oldest NVIDIA driver branch (Linux) that runs code built with each CUDA major version:
# cudart (linked statically here) runs on a driver of its own major version from these
# releases on ("minor version compatibility", NVIDIA's CUDA compatibility guide), never on
# an older major version's. The one table of it in drt-fast.
DRIVER_FOR_CUDA = {11: 450, 12: 525, 13: 580}

# Where the NVIDIA kernel driver writes its release ("535.104.05"), read without nvidia-smi.
DRIVER_VERSION_FILES = ("/proc/driver/nvidia/version", "/sys/module/nvidia/version")

CUDA_STATES = ("ready", "not built", "fails to load", "no driver", "driver too old", "no device")

# cudaErrorInsufficientDriver: cudaGetDeviceCount's answer where the driver is older than the
# runtime linked in
CUDA_ERROR_INSUFFICIENT_DRIVER = 35

FALLBACK = "CUDA tensors use the slower pure-torch reference implementation"


def cuda_version_text(version: int) -> str:
    """A CUDA version as CUDA writes it (1000 * major + 10 * minor) -> ``"12.2"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_needed(runtime_version: int) -> str:
    """The driver that kernels built with CUDA ``runtime_version`` need: ``"R580 or newer"``."""
    oldest = DRIVER_FOR_CUDA.get(runtime_version // 1000)
    return (f"R{oldest} or newer" if oldest is not None
            else f"a driver for CUDA {runtime_version // 1000}.x")


def driver_release(files=DRIVER_VERSION_FILES) -> Optional[str]:
    """The NVIDIA kernel driver's release (``"535.104.05"``) from the first of ``files`` that
    names one; None where none does (no NVIDIA driver loaded, or not Linux)."""
    for path in files:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        found = re.search(r"(?<![\w.])\d{3,}\.\d+(?:\.\d+)?(?![\w.])", text)
        if found:
            return found.group(0)
    return None


def driver_text(driver_version: int, release: Optional[str]) -> str:
    """A driver in words: ``"535.104.05 (CUDA 12.2)"``, ``"CUDA 12.2"``, ``"none found"``."""
    cuda = f"CUDA {cuda_version_text(driver_version)}" if driver_version else None
    if release and cuda:
        return f"{release} ({cuda})"
    return release or cuda or "none found"


class CudaStatus(NamedTuple):
    """Whether CUDA tensors can run drt_fast's CUDA kernels, and why not (`cuda_status`).

    ``state``: one of `CUDA_STATES`; ``driver_version``: the newest CUDA the driver supports
    (1000 * major + 10 * minor; 0: no driver found, or not known); ``runtime_version``: the
    CUDA the kernels were built with (0: not known, the kernels not loaded);
    ``driver_release``: the driver's release (``"535.104.05"``; None: not known);
    ``message``: what happened and what to do, None when ``state`` is ``"ready"``. A GPU the
    build holds no code for is a matter of each device (`kernels_run_on`,
    `uncovered_gpu_message`)."""

    state: str
    driver_version: int
    runtime_version: int
    driver_release: Optional[str]
    message: Optional[str]


def cuda_status(ext: Optional[Extensions] = None, info: Optional[dict] = None,
                driver_files=DRIVER_VERSION_FILES, torch_cuda: Optional[str] = torch.version.cuda) -> CudaStatus:
    """Why CUDA tensors do or do not run the CUDA kernels of ``ext`` (default: this install's,
    `extensions`), from ``info`` (default: its ``_C_cuda.runtime_info()``: the driver's and the
    build's CUDA versions, cudaGetDeviceCount's count and error), the driver release in
    ``driver_files`` (`driver_release`) and ``torch_cuda``, the installed torch's CUDA version,
    which says what to rebuild with (`rebuild_advice`). Never raises."""
    ext = extensions() if ext is None else ext
    release = driver_release(driver_files)
    if ext.cuda_error is not None:
        return CudaStatus("fails to load", 0, 0, release, (
            f"drt_fast's CUDA kernels fail to load ({ext.cuda_error}); {FALLBACK}. Reinstall drt-fast "
            "(pip install .) against this torch and CUDA driver."))
    if ext.cuda is None:
        return CudaStatus("not built", 0, 0, release, (
            f"drt_fast was built without its CUDA kernels (nvcc was not found, or DRT_FAST_CUDA=0, at "
            f"install); {FALLBACK}. Rebuild with nvcc on the PATH (DRT_FAST_CUDA=1 pip install .) for "
            "the fused kernels."))
    if info is None:
        try:
            info = ext.cuda.runtime_info()
        except Exception as exc:  # noqa: BLE001 -- a build older than runtime_info, or a broken one
            info = {"error": f"runtime_info() failed: {exc}"}
    driver, runtime = int(info.get("driver_version") or 0), int(info.get("runtime_version") or 0)
    if int(info.get("device_count") or 0) > 0:
        return CudaStatus("ready", driver, runtime, release, None)
    error = info.get("error") or "no error given"
    built = f"CUDA {cuda_version_text(runtime)}" if runtime else "an unknown CUDA version"
    if driver == 0:
        module = f" (the kernel module {release} is loaded)" if release else ""
        return CudaStatus("no driver", driver, runtime, release, (
            f"drt_fast's CUDA kernels find no NVIDIA driver{module}: {error}; {FALLBACK}. Built with "
            f"{built}, they need driver {driver_needed(runtime)}."))
    if runtime and (driver // 1000 < runtime // 1000 or info.get("error_code") == CUDA_ERROR_INSUFFICIENT_DRIVER):
        return CudaStatus("driver too old", driver, runtime, release, (
            f"drt_fast's CUDA kernels were built with {built}, which needs NVIDIA driver "
            f"{driver_needed(runtime)}; this machine's driver{f' ({release})' if release else ''} supports "
            f"CUDA {cuda_version_text(driver)} at most ({error}), so {FALLBACK}. Update the driver, or "
            f"{rebuild_advice(driver, torch_cuda)}"))
    return CudaStatus("no device", driver, runtime, release, (
        f"drt_fast's CUDA kernels (built with {built}; driver {driver_text(driver, release)}) find no "
        f"usable GPU: {error}; {FALLBACK}. Check CUDA_VISIBLE_DEVICES and that nvidia-smi lists the GPU."))


def rebuild_advice(driver_version: int, torch_cuda: Optional[str]) -> str:
    """How to rebuild for a driver of CUDA ``driver_version``: with a toolkit of the installed
    torch's CUDA major version (``torch_cuda``, ``"12.4"``) where that driver runs it, else of
    the driver's own major version (cmake/pick_cuda_toolkit.py makes the choice at install)."""
    torch_major = int(torch_cuda.split(".")[0]) if torch_cuda else None
    major = driver_version // 1000
    if torch_major is not None and torch_major <= major:
        return (f"rebuild drt-fast with a CUDA {torch_major} toolkit, the major version of torch's CUDA "
                f"({torch_cuda}): `pip install .` picks it where several toolkits are installed "
                f"(DRT_FAST_TORCH_CUDA={torch_major} pip install . where torch is not installed beside the "
                "build; CUDACXX=<toolkit>/bin/nvcc names one).")
    return (f"rebuild drt-fast with a CUDA {major} toolkit, the newest CUDA this driver runs: "
            f"DRT_FAST_TORCH_CUDA={major} pip install . picks one where several toolkits are installed "
            "(CUDACXX=<toolkit>/bin/nvcc names one).")


def uncovered_gpu_message(archs: str, capability: tuple, name: str) -> str:
    """The warning for a GPU ``name`` of compute ``capability`` that a build for ``archs``
    holds no code for (`arch_covers` is False)."""
    cc = "".join(map(str, capability))
    return (f"drt_fast's CUDA kernels were built for architectures {archs}, which hold no code for "
            f"{name} (sm_{cc}); CUDA tensors there use the slower pure-torch reference implementation. "
            f"Rebuild for it with CMAKE_CUDA_ARCHITECTURES=\"{archs.replace(',', ';')};{cc}\" pip install . "
            "for the fused kernels.")


def shadowed_install(here: Path = PACKAGE_DIR) -> Optional[str]:
    """The folder of a pip-installed drt_fast with compiled kernels, when the drt_fast
    imported (``here``) is another copy (the source tree, first on sys.path for
    `python -m drt_fast` and `torchrun -m drt_fast` run from the repository root); else None."""
    from importlib import metadata

    for dist in metadata.distributions():   # the source tree's egg-info is one of them
        try:
            if (dist.metadata["Name"] or "").lower().replace("_", "-") != "drt-fast":
                continue
            installed = Path(dist.locate_file("drt_fast")).resolve()
        except Exception:
            continue
        # an editable install has no package folder of its own
        if installed != here and installed.is_dir() and any(installed.glob("_C.*")):
            return str(installed)
    return None


def missing_cpu_kernels_error(cause: Optional[BaseException] = None) -> ImportError:
    """The ImportError for a drt_fast without ``_C``: where a pip-installed copy is shadowed
    by the source tree (`shadowed_install`), how to run that one; else how to build."""
    installed = shadowed_install()
    if installed is not None:
        return ImportError(
            f"drt_fast._C (the compiled CPU kernels) is missing from the drt_fast imported "
            f"here, the source tree {PACKAGE_DIR}, which shadows the installed one in "
            f"{installed} (`python -m drt_fast` and `torchrun -m drt_fast` put the current "
            f"directory first on sys.path): run them from another directory, use the "
            f"`drt-fast` command (torchrun --no-python ... drt-fast -- certify ...), or build "
            f"the source tree too (pip install -e .)")
    return ImportError(
        "drt_fast._C (the compiled CPU kernels) is missing: drt_fast must be built and "
        "installed with `pip install .` (or `pip install -e .` for development) before "
        f"its ops run on the CPU; importing it failed with: {cause}")


def require_cpu_kernels():
    """``drt_fast._C``, or `missing_cpu_kernels_error` raised."""
    if cpu_kernels is None:
        raise missing_cpu_kernels_error(cpu_import_error)
    return cpu_kernels


_warned_cuda_fallback = False


def warn_cuda_fallback(message: Optional[str] = None) -> None:
    """Warn, once a process, that CUDA tensors run the pure-torch references (``message``,
    or why the CUDA kernels do not run: `cuda_status`)."""
    global _warned_cuda_fallback
    if _warned_cuda_fallback:
        return
    _warned_cuda_fallback = True
    if message is None:
        message = cuda_status().message or f"drt_fast's CUDA kernels do not run here; {FALLBACK}."
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def kernels_for(op: str, t: Tensor):
    """The compiled module that runs ``op`` on ``t``'s device (``_C`` or ``_C_cuda``), or None
    where the pure-torch reference runs instead (the reference switch; CUDA kernels that do
    not run on the device, with `warn_cuda_fallback`; a CUDA kernel that failed its first-use
    check there, `selfcheck.FIRST_USE`). Raises `require_cpu_kernels`' ImportError for CPU
    tensors without ``_C``, InvalidArgument for other devices."""
    if _reference:
        return None
    if t.is_cuda:
        if not kernels_run_on(t.device):
            warn_cuda_fallback()
            return None
        # the first use of noisy_draws or vote_ on the device checks them (ops/selfcheck.py)
        return cuda_kernels if selfcheck.FIRST_USE.passed(op, t.device) else None
    if t.device.type == "cpu":
        return require_cpu_kernels()
    raise InvalidArgument(f"{op} runs on cpu or cuda tensors, got device {t.device}")


def cuda_launch(t: Tensor) -> tuple:
    """The trailing ``(device index, stream handle)`` arguments of a CUDA kernel launched for
    ``t``: its device and that device's current stream (never the default stream)."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream
