"""End-to-end CERTIFY of one input: drt-fast vs Cohen's loop (bench/reference.py).

Both sides run in the same process on the same ensemble, input, n0, n, alpha and batch
size, fp32 (drt-fast bf16 in the GPU cases), and are timed alternately, round by round; the
ratio is reference time / drt-fast time over the fastest round of each side (see README.md).

CPU cases: the embedded default ensemble (3 digits CNNs; WE, MME, and the batch-4000 and
bf16 levers; skipped when drt_fast/assets/default.pt is absent), 3x CIFAR ResNet-20 (fp32,
and the channels-last and bf16 levers) and 3x ResNet-110 with random weights at reduced n.
GPU cases (skipped without CUDA): 3x ResNet-110 (32x32) at n = 100,000 and 3x ResNet-50
(224x224) at n = 10,000, fp32 and bf16 (and ResNet-110 fp32 without the fused members, and
bf16 with drt-fast's whole-network ResNet kernel, DRT_FAST_CIFAR_RESNET=mma), plus the share of
certify time spent in noise + vote. drt-fast runs as `drt-fast certify` does on
CUDA (cuDNN autotuning on); the reference as Cohen's code does (off).
"""
import contextlib
import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch

import drt_fast
from drt_fast import Ensemble, SmoothedClassifier
from drt_fast import data as df_data
from drt_fast import models as df_models

from noise_check import noisy, noisy_note
from reference import ReferenceSmooth

ALPHA = 0.001
SIGMA = 0.25
ENFORCE = os.environ.get("DRT_BENCH_ENFORCE") == "1"   # turn missed targets into failures

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------
def random_ensemble(arch, members=3, mode="we", num_classes=10, seed=0, device="cpu"):
    """``members`` randomly initialised ``arch`` members behind their dataset's normalization."""
    torch.manual_seed(seed)
    means, sds = df_data.normalization(df_models.default_dataset(arch))
    return Ensemble([df_models.with_normalization(df_models.create(arch, num_classes), means, sds)
                     for _ in range(members)], mode=mode).to(device).eval()


def random_input(arch, seed=0, device="cpu"):
    """A pixel input ``[C, H, W]`` for ``arch``: a digits test image for the digits CNN,
    uniform noise otherwise."""
    if arch == "digits_cnn":
        return df_data.load("digits", "test").x[0].to(device)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(df_models.input_shape(arch), generator=generator).to(device)


def default_ensemble():
    """(ensemble, x, sigma) of the embedded default, or a pytest skip when it is absent."""
    assets = Path(drt_fast.__file__).parent / "assets"
    spec_path = assets / "default.json"
    if not spec_path.exists():
        pytest.skip(f"the embedded default ensemble is not there yet ({spec_path} missing)")
    spec = json.loads(spec_path.read_text())
    model_path, data_path = assets / spec["model"], assets / spec["data"]
    for path in (model_path, data_path):
        if not path.exists():
            pytest.skip(f"the embedded default ensemble is incomplete ({path} missing)")
    from drt_fast.checkpoint import load_checkpoint
    import numpy as np

    ensemble, meta = load_checkpoint(model_path)
    x = torch.from_numpy(np.load(data_path)["x"][0])
    return ensemble.eval(), x, float(spec.get("sigma", meta.get("sigma") or SIGMA))


# ----------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------
def compare_certify(benchmark, name, ensemble, x, *, n0, n, batch_size, rounds, sigma=SIGMA,
                    num_classes=10, precision="fp32", channels_last=None, sync=None,
                    autotune=False, fuse=None, cuda_graphs=None, extra=None):
    """Time Cohen's loop and drt-fast's certify alternately; record and print the ratio.

    One untimed warm-up of each side at small n comes first (lazy initialisation, cudnn
    autotuning); then ``rounds`` alternating rounds (``timed_pair``). ``autotune``: drt-fast
    runs with cuDNN autotuning on, as ``drt-fast certify`` sets it on CUDA; the reference
    always runs without, as Cohen's code does.
    Returns (ratio, ref_min_s, ours_min_s).
    """
    reference = ReferenceSmooth(ensemble, num_classes, sigma)
    # channels_last converts the model in place: drt-fast gets its own copy, the reference
    # keeps the model as Cohen's code would have it.
    smooth = SmoothedClassifier(copy.deepcopy(ensemble) if channels_last is not False else ensemble,
                                num_classes, sigma, seed=0, precision=precision,
                                channels_last=channels_last, fuse=fuse, cuda_graphs=cuda_graphs)
    sync = sync or (lambda: None)
    results = {}

    def ref():
        with _cudnn_autotuning(False):
            results["ref"] = reference.certify(x, n0, n, ALPHA, batch_size)

    def ours():
        with _cudnn_autotuning(autotune):
            results["ours"] = smooth.certify(x, n0, n, ALPHA, batch_size)

    warm_n = min(n, batch_size)
    with _cudnn_autotuning(False):
        reference.certify(x, min(n0, batch_size), warm_n, ALPHA, batch_size)
    with _cudnn_autotuning(autotune):
        smooth.certify(x, min(n0, batch_size), warm_n, ALPHA, batch_size)
    sync()

    ref_times, ours_times = timed_pair(benchmark, ours, ref, rounds, sync)
    cert = results["ours"]
    assert cert.n == n and (cert.label == -1 or 0 <= cert.label < num_classes)
    return record(benchmark, name, ref_times, ours_times, draws=n0 + n, extra={
        "n0": n0, "n": n, "batch_size": batch_size, "precision": precision,
        "members": len(ensemble), "mode": ensemble.mode, "fuse": str(smooth.fuse_status),
        "cuda_graphs": str(smooth.graph_status),
        "ours_certificate": [cert.label, round(cert.radius, 4)],
        "ref_certificate": [results["ref"][0], round(results["ref"][1], 4)], **(extra or {})})


@contextlib.contextmanager
def _cudnn_autotuning(on):
    """``torch.backends.cudnn.benchmark = on`` for the block (False: as Cohen's code runs)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(on)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def timed_pair(benchmark, ours, ref, rounds, sync=None):
    """Time ``ref`` and ``ours`` alternately ``rounds`` times -> (ref_times, ours_times) in s.

    pytest-benchmark times ``ours`` (its rounds land in --benchmark-json); ``ref`` runs,
    timed here, in pedantic's setup before each round of ``ours``.
    """
    sync = sync or (lambda: None)
    ref_times, ours_times = [], []

    cpu = {"ref": [], "ours": []}

    def timed(fn, times, cpu_times):
        def run():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
        return run

    benchmark.pedantic(timed(ours, ours_times, cpu["ours"]),
                       setup=timed(ref, ref_times, cpu["ref"]), rounds=rounds, iterations=1,
                       warmup_rounds=0)
    # Process CPU time: steadier than the wall clock on a shared machine when single-threaded
    # (with several threads it counts their spinning too).
    benchmark.extra_info.update(ref_cpu_s=cpu["ref"], ours_cpu_s=cpu["ours"],
                                cpu_ratio=min(cpu["ref"]) / min(cpu["ours"]))
    return ref_times, ours_times


def record(benchmark, name, ref_times, ours_times, draws=None, extra=None):
    """Ratio over the fastest round of each side, into extra_info and on stdout."""
    ref_s, ours_s = min(ref_times), min(ours_times)
    ratio = ref_s / ours_s
    info = {"ratio": ratio, "ref_min_s": ref_s, "ours_min_s": ours_s,
            "ref_times_s": ref_times, "ours_times_s": ours_times,
            "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0],
            "noisy": noisy(ref_times, ours_times)}
    if draws:
        info["ours_draws_per_s"] = draws / ours_s
        info["ref_draws_per_s"] = draws / ref_s
    info.update(extra or {})
    benchmark.extra_info.update(info)
    benchmark.extra_info["case"] = name
    cpu_ratio = benchmark.extra_info.get("cpu_ratio")
    cpu_note = f", CPU-time ratio {cpu_ratio:.2f}x" if cpu_ratio else ""
    print(f"\n[ratio] {name}: reference {ref_s:.3f} s / drt-fast {ours_s:.3f} s = {ratio:.2f}x"
          f"  (load {info['loadavg_1min']:.1f}, {info['threads']} threads{cpu_note})"
          + noisy_note(ref_times, ours_times))
    return ratio, ref_s, ours_s


def check_target(what, ok):
    print(f"[target] {what}: {'met' if ok else 'MISSED'}")
    if ENFORCE:
        assert ok, f"target missed: {what}"


# ----------------------------------------------------------------------------------------
# CPU cases
# ----------------------------------------------------------------------------------------
def test_certify_digits_default(benchmark):
    """The embedded default ensemble (3 DRT digits CNNs), WE, n = 100,000."""
    ensemble, x, sigma = default_ensemble()
    ratio, *_ = compare_certify(benchmark, "certify digits default 3x WE n=1e5 b=1000",
                                ensemble, x, n0=100, n=100_000, batch_size=1000, rounds=3,
                                sigma=sigma)
    check_target("CPU >= 2x on the digits default ensemble", ratio >= 2.0)


def test_certify_digits_default_mme(benchmark):
    ensemble, x, sigma = default_ensemble()
    ensemble.mode = "mme"
    compare_certify(benchmark, "certify digits default 3x MME n=1e5 b=1000", ensemble, x,
                    n0=100, n=100_000, batch_size=1000, rounds=3, sigma=sigma)


@pytest.mark.parametrize("precision,batch_size", [("fp32", 4000), ("bf16", 4000)])
def test_certify_digits_default_levers(benchmark, precision, batch_size):
    """Levers on the default ensemble: a larger batch, and drt-fast in bf16 (AMX/AVX512-BF16
    CPUs) against the fp32 reference."""
    ensemble, x, sigma = default_ensemble()
    compare_certify(benchmark, f"certify digits default 3x WE n=1e5 b={batch_size} drt-fast "
                    f"{precision} vs ref fp32", ensemble, x, n0=100, n=100_000,
                    batch_size=batch_size, rounds=3, sigma=sigma, precision=precision)


@pytest.mark.parametrize("precision,channels_last", [("fp32", None), ("fp32", False),
                                                     ("bf16", True)],
                         ids=["fp32", "fp32-contiguous", "bf16-channels_last"])
def test_certify_resnet20_cpu(benchmark, precision, channels_last):
    """3x ResNet-20 at n=2000: the engine as it is (fp32, its default layout: channels-last
    for 3-channel inputs), contiguous NCHW, and bf16 (drt-fast only; the reference stays
    fp32 NCHW, as Cohen's code runs)."""
    ensemble = random_ensemble("cifar_resnet20")
    layout = {None: "", False: " contiguous", True: " channels_last"}[channels_last]
    ratio, *_ = compare_certify(benchmark, f"certify 3x ResNet-20 WE n=2000 b=500 drt-fast "
                                f"{precision}{layout} (cpu)", ensemble,
                                random_input("cifar_resnet20"), n0=100, n=2000, batch_size=500,
                                rounds=2, precision=precision, channels_last=channels_last)
    if precision == "fp32" and channels_last is None:
        check_target("CPU no slower than the reference on 3x ResNet-20", ratio >= 1.0)


def test_certify_resnet110_cpu(benchmark):
    ensemble = random_ensemble("cifar_resnet110")
    compare_certify(benchmark, "certify 3x ResNet-110 WE n=100 b=100 (cpu)", ensemble,
                    random_input("cifar_resnet110"), n0=100, n=100, batch_size=100, rounds=2)


# ----------------------------------------------------------------------------------------
# GPU cases (absolute times recorded too)
# ----------------------------------------------------------------------------------------
def _gpu_setup():
    if not drt_fast.cuda_available():
        pytest.skip("drt_fast was built without CUDA kernels (or no driver answers); "
                    "rebuild with DRT_FAST_CUDA=1 on the GPU machine")
    return torch.device("cuda")


GPU_CASES = [
    # arch, n, batch_size, precision, fuse (None: the engine's default, on for CUDA;
    # "kernel": the default with DRT_FAST_CIFAR_RESNET=mma, drt-fast's whole-network kernel)
    ("cifar_resnet110", 100_000, 2000, "fp32", None),
    ("cifar_resnet110", 100_000, 2000, "bf16", None),
    ("cifar_resnet110", 100_000, 2000, "bf16", "kernel"),
    ("cifar_resnet110", 100_000, 2000, "fp32", False),   # the fusion lever, off
    ("resnet50", 10_000, 400, "fp32", None),
    ("resnet50", 10_000, 400, "bf16", None),
]


@needs_cuda
@pytest.mark.parametrize("arch,n,batch_size,precision,fuse", GPU_CASES,
                         ids=[f"{a}-{p}{'-nofuse' if f is False else '-kernel' if f else ''}"
                              for a, _, _, p, f in GPU_CASES])
def test_certify_gpu(benchmark, monkeypatch, arch, n, batch_size, precision, fuse):
    device = _gpu_setup()
    kernel = fuse == "kernel"
    if kernel:
        from drt_fast.fuse import CIFAR_RESNET_ENV
        monkeypatch.setenv(CIFAR_RESNET_ENV, "mma")
        fuse = None
    num_classes = 1000 if arch == "resnet50" else 10
    ensemble = random_ensemble(arch, num_classes=num_classes, device=device)
    x = random_input(arch, device=device)
    name = (f"certify 3x {arch} WE n={n} b={batch_size} {precision}"
            f"{' no-fuse' if fuse is False else ' resnet-kernel' if kernel else ''} vs ref fp32 (cuda)")
    ratio, ref_s, ours_s = compare_certify(
        benchmark, name, ensemble, x, n0=100, n=n, batch_size=batch_size, rounds=2,
        num_classes=num_classes, precision=precision, sync=torch.cuda.synchronize,
        autotune=True, fuse=fuse, extra={"device": torch.cuda.get_device_name()})
    print(f"[abs] {name}: drt-fast {ours_s:.3f} s per image, reference {ref_s:.3f} s per image")
    # which rewrite ran: a kernel member that failed its first-batch check falls back to cuDNN
    print(f"[fuse] {name}: {benchmark.extra_info.get('fuse')}")
    if arch == "cifar_resnet110" and fuse is None:
        if precision == "fp32":
            check_target("GPU >= 1.3x fp32 on 3x ResNet-110", ratio >= 1.3)
        else:
            how = " (ResNet kernel)" if kernel else ""
            check_target(f"GPU >= 4x bf16 on 3x ResNet-110{how}", ratio >= 4.0)
            check_target(f"<= 1 s per CIFAR image, 3x ResNet-110, n=1e5{how}", ours_s <= 1.0)
    if kernel:   # else the figures above are cuDNN's fused members', under the kernel's name
        status = str(benchmark.extra_info.get("fuse"))
        assert f"{len(ensemble)} member(s) as one CIFAR ResNet kernel each" in status \
            and "given up" not in status, f"the CIFAR ResNet kernel did not run: {status}"


@needs_cuda
@pytest.mark.parametrize("graphs", [None, False], ids=["graphs", "no-graphs"])
def test_certify_digits_default_gpu(benchmark, graphs):
    """The embedded default (3 small digits CNNs) on the GPU at Cohen's batch of 1000: bound
    by launches and Python per batch, which the CUDA-graph step removes."""
    device = _gpu_setup()
    ensemble, x, sigma = default_ensemble()
    name = (f"certify digits default 3x WE n=1e5 b=1000 fp32{' no-graphs' if graphs is False else ''}"
            " (cuda)")
    compare_certify(benchmark, name, ensemble.to(device), x.to(device), n0=100, n=100_000,
                    batch_size=1000, rounds=3, sigma=sigma, sync=torch.cuda.synchronize,
                    autotune=True, cuda_graphs=graphs,
                    extra={"device": torch.cuda.get_device_name()})


SHARE_N, SHARE_BATCH = 100_000, 2000   # test_gpu_noise_vote_share


class _EventTimedOps:
    """Brackets every ``noisy_draws_eager`` and ``vote_eager_`` call the engine makes (it calls
    them through ``drt_fast.ops``) with CUDA events on the current stream.

    An event pair measures from the moment the GPU reaches the start event to the moment it
    reaches the end event, so time the GPU idles waiting for the op's launch counts as
    noise/vote time: the share is an upper bound.
    """

    def __init__(self, ops, monkeypatch):
        self.pairs = {"noisy_draws_eager": [], "vote_eager_": []}
        for name in self.pairs:
            monkeypatch.setattr(ops, name, self._timed(name, getattr(ops, name)))

    def _timed(self, name, op):
        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = op(*args, **kwargs)
            end.record()
            self.pairs[name].append((start, end))
            return out
        return timed

    def seconds(self, name):
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.pairs[name]) / 1000.0


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_noise_vote_share(benchmark, monkeypatch, precision):
    """Share of certify time in noisy_draws + vote_ for 3x ResNet-110, n = 100,000 (target <= 3%)."""
    device = _gpu_setup()
    from drt_fast import ops

    ensemble = random_ensemble("cifar_resnet110", device=device)
    x = random_input("cifar_resnet110", device=device)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)   # as drt-fast certify runs
    smooth = SmoothedClassifier(ensemble, 10, SIGMA, precision=precision)
    n0, n, batch_size = 100, SHARE_N, SHARE_BATCH
    smooth.certify(x, n0, 2 * batch_size, ALPHA, batch_size)           # warm-up, autotuning
    timed_ops = _EventTimedOps(ops, monkeypatch)
    total = []

    def run():
        torch.cuda.synchronize()
        start = time.perf_counter()
        smooth.certify(x, n0, n, ALPHA, batch_size)
        torch.cuda.synchronize()
        total.append(time.perf_counter() - start)

    benchmark.pedantic(run, rounds=1, iterations=1)
    noise_s, vote_s = timed_ops.seconds("noisy_draws_eager"), timed_ops.seconds("vote_eager_")
    share = (noise_s + vote_s) / total[-1]
    benchmark.extra_info.update({"case": f"noise+vote share 3x ResNet-110 {precision}",
                                 "certify_s": total[-1], "noise_s": noise_s, "vote_s": vote_s,
                                 "share": share, "device": torch.cuda.get_device_name()})
    print(f"\n[share] 3x ResNet-110 {precision} n={n} b={batch_size}: certify {total[-1]:.3f} s, "
          f"noise {noise_s * 1e3:.1f} ms, vote {vote_s * 1e3:.1f} ms, share {share:.2%}")
    check_target(f"noise + vote <= 3% of certify time ({precision})", share <= 0.03)
