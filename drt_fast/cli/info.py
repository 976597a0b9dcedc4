"""``drt-fast info``, ``drt-fast analyze`` and the ``--version`` report: describe what is
installed, what a checkpoint holds, what results files say."""
from __future__ import annotations

from .. import __version__, embedded


def build_report(extensions=None) -> str:
    """What ``drt-fast --version`` prints: the version, torch, and which kernels this install
    runs (the CPU build picked at run time; whether the CUDA kernels were built and a device
    answers), the CUDA driver and the CUDA the kernels were built with, and why no device
    answers (`ops.cuda_status`) -- the first things to look at when drt-fast is slower than it
    should be. ``extensions``: an `ops.Extensions` (default: this install's)."""
    import torch

    from .. import ops

    ext = ops.extensions() if extensions is None else extensions
    lines = [f"drt-fast {__version__}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    lines.append(f"CPU kernels: {ext.cpu.cpu_isa()}" if ext.cpu is not None
                 else "CPU kernels: not built (pip install . builds them)")
    if ext.cuda_error is not None:
        lines.append(f"CUDA kernels: built, but they fail to load: {ext.cuda_error}")
    elif ext.cuda is None:
        lines.append("CUDA kernels: not built (nvcc was not found, or DRT_FAST_CUDA=0, at install)")
    elif not ops.cuda_available():
        lines.append("CUDA kernels: built; no CUDA device answers")
    else:
        archs = getattr(ext.cuda, "architectures", lambda: "")()
        devices = []
        for i in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(i)
            covered = "" if ops.arch_covers(archs, capability) else ": not built for it (torch fallback)"
            devices.append(f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, capability))}{covered})")
        lines.append(f"CUDA kernels: built for {archs or 'unknown architectures'}; {', '.join(devices)}")
    status = ops.cuda_status(ext)
    driver = f"CUDA driver: {ops.extension.driver_text(status.driver_version, status.driver_release)}"
    if status.runtime_version:
        driver += (f"; the kernels' CUDA runtime: {ops.extension.cuda_version_text(status.runtime_version)} "
                   f"(needs driver {ops.extension.driver_needed(status.runtime_version)})")
    lines.append(driver)
    if status.state in ("no driver", "driver too old", "no device"):   # the lines above say the rest
        lines.append(status.message)
    return "\n".join(lines)


def run_info(args) -> int:
    """``drt-fast info``: a checkpoint (or member files, or the embedded default), or a results file."""
    from .. import analyze, checkpoint, io

    paths = args.checkpoint or [embedded.load().model]
    if len(paths) == 1 and io.is_results_file(paths[0]):
        print(analyze.describe(paths[0]))
        return 0
    print(checkpoint.describe_loaded(*checkpoint.open_checkpoints(paths)))
    return 0


def run_analyze(args) -> int:
    """``drt-fast analyze``: the certified-accuracy table (and plot) of results files."""
    from ..analyze import analyze

    print(analyze(args.files, args.radii, args.plot))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
