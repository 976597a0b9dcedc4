"""drt_fast.ops.extension: which implementation runs an op. A missing build raises a clear
ImportError; the reference switch (`ops.use_reference`, ``DRT_FAST_REFERENCE_OPS=1``) makes
every op, custom op and eager twin, run its pure-torch reference (ops/reference.py) -- with
the same results, noise bit for bit. (The build itself: test_build.py.)"""
import re
import subprocess
import sys

import pytest
import torch

import drt_fast
from cli_fixtures import NEUTRAL_CWD, subprocess_env
from drt_fast import ops


def _noisy_args():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 3, 3, generator=gen)
    return (x, torch.tensor([3, 9]), torch.tensor([0, 5]), 4, 0.5, 7)


def _vote_args():
    logits = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(1))
    return logits, torch.arange(12) // 4, torch.zeros(3, 5, dtype=torch.int64), "we", torch.ones(3)


def test_missing_cpu_kernels_raise_import_error(monkeypatch):
    monkeypatch.setattr(ops.extension, "cpu_kernels", None)
    monkeypatch.setattr(ops.extension, "cpu_import_error", ImportError("no module"))
    with pytest.raises(ImportError, match="pip install"):
        ops.noisy_draws(*_noisy_args())


def test_cuda_available_is_a_bool():
    assert isinstance(drt_fast.cuda_available(), bool)
    assert drt_fast.cuda_available() is ops.cuda_available()


@pytest.fixture
def spies(monkeypatch):
    """Calls of each public reference, counted by name (the ops reach them through
    `drt_fast.ops.reference`)."""
    calls = {}
    for name in ("reference_noisy_draws", "reference_vote_", "reference_bias_act_", "reference_dense_chain",
                 "reference_cifar_resnet"):
        real = getattr(ops.reference, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops.reference, name, spy)
    return calls


def _dense_plan():
    """dense_chain's arguments: a dense member's plan (fuse.DenseMember) and a batch."""
    from drt_fast import fuse

    gen = torch.Generator().manual_seed(2)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    dense = fuse.dense_for_inference(mlp, torch.rand(1, 6, generator=gen)).module
    assert dense.chained
    return torch.rand(5, 6, generator=gen), dense.chain_meta, dense.chain_params, dense.chain_out


def _run_every_cpu_op():
    """Each op with a CPU kernel, as custom op and eager twin (for bias_act_ and dense_chain:
    the direct kernel calls) -> their results."""
    noisy = [ops.noisy_draws(*_noisy_args()), ops.noisy_draws_eager(*_noisy_args())]
    counts = []
    for vote in (ops.vote_, ops.vote_eager_):
        args = _vote_args()
        vote(*args)
        counts.append(args[2])
    gen = torch.Generator().manual_seed(3)
    h, bias = torch.randn(4, 6, generator=gen), torch.randn(6, generator=gen)
    biased = h.clone()
    ops.bias_act_(biased, bias, True)
    direct = [ops.bias_act_cpu_(h.clone(), bias, True), ops.dense_chain_cpu(*_dense_plan())]
    return noisy, counts, [biased], ops.dense_chain(*_dense_plan()), direct


def test_reference_switch_runs_every_op_as_its_reference(spies):
    kernels = _run_every_cpu_op()
    assert spies == {}                                       # the C++ kernels ran
    assert not ops.reference_in_use()
    with ops.use_reference():
        assert ops.reference_in_use()
        references = _run_every_cpu_op()
    assert not ops.reference_in_use()
    # each op and its eager twin went to the reference; the direct kernel calls of dense
    # members did nothing and said so (their callers fall back to the references)
    assert spies == {"reference_noisy_draws": 2, "reference_vote_": 2, "reference_bias_act_": 1,
                     "reference_dense_chain": 1}
    assert kernels[4][0] is True and kernels[4][1] is not None
    assert references[4] == [False, None]
    for ours, ref in zip(kernels[0] + kernels[1] + kernels[2], references[0] + references[1] + references[2]):
        assert torch.equal(ours, ref)                        # noise bit for bit, the same votes
    torch.testing.assert_close(references[3], kernels[3])


def test_reference_switch_as_a_function_and_nested():
    previous = ops.use_reference(True)         # a call sets it for the process...
    try:
        assert ops.reference_in_use()
        with ops.use_reference(False):          # ...a context restores what was before
            assert not ops.reference_in_use()
        assert ops.reference_in_use()
    finally:
        with previous:                          # exiting the first call's object restores it
            pass
    assert not ops.reference_in_use()
    with pytest.raises(RuntimeError), ops.use_reference():
        raise RuntimeError("restored on errors too")
    assert not ops.reference_in_use()


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), (None, False)])
def test_reference_switch_from_the_environment(value, on):
    """DRT_FAST_REFERENCE_OPS=1 at import: the ops run their references from the start."""
    code = ("import drt_fast.ops as o, torch\n"
            "calls = []\n"
            "real = o.reference.reference_vote_\n"
            "o.reference.reference_vote_ = lambda *a: calls.append(1) or real(*a)\n"
            "counts = torch.zeros(1, 3, dtype=torch.int64)\n"
            "o.vote_(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.int64), counts, 'mv', torch.ones(2))\n"
            "print(o.reference_in_use(), len(calls), int(counts.sum()))\n")
    # the drt_fast under test (an installed one, or a source tree built in place), from a
    # folder that holds no other
    env = {k: v for k, v in subprocess_env().items() if k != ops.extension.REFERENCE_ENV}
    if value is not None:
        env[ops.extension.REFERENCE_ENV] = value
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=NEUTRAL_CWD)
    assert out.stdout.split() == [str(on), "1" if on else "0", "4"]


def test_cuda_reference_switch_runs_the_references_on_the_gpu(cuda_device, spies):
    from test_cifar_resnet_kernel import kernel_member, pixels, resnet_member

    x, keys, first, *rest = _noisy_args()
    args = (x.to(cuda_device), keys.to(cuda_device), first.to(cuda_device), *rest)
    logits, rows, counts, agg, weights = (t.to(cuda_device) if torch.is_tensor(t) else t for t in _vote_args())
    k = kernel_member(resnet_member(8)).to(cuda_device)
    kernel_logits = ops.cifar_resnet(pixels(2).to(cuda_device), k.weights, k.biases, k.norm, k.fc_w, k.fc_b,
                                     k.blocks, k.variant)
    assert spies == {}
    with ops.use_reference():
        assert not ops.kernels_run_on(cuda_device)
        assert torch.equal(ops.noisy_draws(*args), ops.noisy_draws(*args))
        ops.vote_(logits, rows, counts, agg, weights)
        ops.vote_eager_(logits, rows, counts, agg, weights)
        ref_logits = ops.cifar_resnet(pixels(2).to(cuda_device), k.weights, k.biases, k.norm, k.fc_w, k.fc_b,
                                      k.blocks, k.variant)
    assert spies == {"reference_noisy_draws": 2, "reference_vote_": 2, "reference_cifar_resnet": 1}
    assert int(counts.sum()) == 24
    assert torch.equal(ops.noisy_draws(*args), ops.noisy_draws_eager(*args))      # kernels again
    assert float((kernel_logits - ref_logits).norm() / ref_logits.norm()) < 5e-3


# ---- the CUDA kernels' first-use check (ops/selfcheck.py), with stand-in device runners ------
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from drt_fast.errors import DrtFastError  # noqa: E402
from drt_fast.ops import selfcheck  # noqa: E402


class CpuKernels(selfcheck.EagerOps):
    """A stand-in "CUDA" that runs the CPU kernels (the tests' device is the CPU); counts its calls."""

    def __init__(self):
        self.calls = {"noisy_draws": 0, "vote_": 0}

    def noisy_draws(self, *args):
        self.calls["noisy_draws"] += 1
        return super().noisy_draws(*args)

    def vote_(self, *args):
        self.calls["vote_"] += 1
        super().vote_(*args)


class WrongNoise(CpuKernels):
    """One bit off in one element, on the channels-last fp16 path only."""

    def noisy_draws(self, *args):
        out = super().noisy_draws(*args)
        if args[7] and args[6] == torch.float16:
            out.view(torch.int16)[4, 1, 2, 3] ^= 1
        return out


class WrongVote(CpuKernels):
    """One vote of the block kernel's size in bf16 mme counted for the wrong class."""

    def vote_(self, logits, rows, counts, agg, weights):
        super().vote_(logits, rows, counts, agg, weights)
        if agg == "mme" and logits.dtype == torch.bfloat16 and logits.shape[2] > 32:
            label = int(counts[0].argmax())
            counts[0, label] -= 1
            counts[0, (label + 1) % counts.shape[1]] += 1


class Raises(CpuKernels):
    def noisy_draws(self, *args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    def vote_(self, *args):
        raise RuntimeError("CUDA error: invalid argument")


def test_the_first_use_check_passes_kernels_that_agree():
    runner = CpuKernels()
    check = selfcheck.FirstUseCheck(runner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check.passed("noisy_draws", "cpu") and check.passed("vote_", torch.device("cpu"))
        assert check.passed("noisy_draws", torch.device("cpu"))           # asked again: remembered
    assert runner.calls == {"noisy_draws": len(selfcheck.noise_case()), "vote_": len(selfcheck.vote_case())}
    results = check.results()
    assert set(results) == {("noisy_draws", "cpu"), ("vote_", "cpu")}
    assert all(r.passed and r.why is None and r.seconds > 0 for r in results.values())
    assert check.passed("cifar_resnet", "cpu") and runner.calls["noisy_draws"] == 8   # not a checked op


@pytest.mark.parametrize("runner, failing, why", [
    (WrongNoise, {"noisy_draws"},
     r"noisy_draws, call 5 \(x \[2, 3, 4, 4\], float16, channels-last\): 1 of 288 elements differ"),
    (WrongVote, {"vote_"}, r"vote_, call 30 \(mme, bfloat16, 40 classes\): 2 of 80 counts differ"),
    (Raises, {"noisy_draws", "vote_"}, r"raised RuntimeError: CUDA error: "),
])
def test_a_kernel_that_disagrees_runs_its_reference_with_one_warning(runner, failing, why):
    runner = runner()
    check = selfcheck.FirstUseCheck(runner)
    for op in selfcheck.CHECKED_OPS:
        if op in failing:
            with pytest.warns(RuntimeWarning) as caught:
                assert not check.passed(op, "cpu")
            assert len(caught) == 1
            line = str(caught[0].message)
            assert "\n" not in line and re.search(why, line), line
            assert line.startswith(f"drt_fast's {op} kernel on cpu failed its first-use check")
            assert line.endswith(f"{op} on cpu runs its slower pure-torch reference from now on.")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert check.passed(op, "cpu")
    calls = dict(runner.calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # once a (device, op): no second warning,
        for op in selfcheck.CHECKED_OPS:                 # no second run
            assert check.passed(op, "cpu") == (op not in failing)
    assert runner.calls == calls
    assert {op for (op, _), r in check.results().items() if not r.passed} == failing


def test_compare_says_what_differs_without_warning():
    assert selfcheck.compare("noisy_draws", CpuKernels(), "cpu") is None
    assert selfcheck.compare("vote_", WrongVote(), "cpu").startswith("vote_, call 30 (mme, bfloat16, 40 classes)")
    assert selfcheck.compare("vote_", Raises(), "cpu") == "vote_ raised RuntimeError: CUDA error: invalid argument"
    # the expected side is a parameter too: a kernel compared with a wrong "CPU" fails
    assert selfcheck.compare("noisy_draws", CpuKernels(), "cpu", expected=WrongNoise()) is not None


def test_the_first_use_check_runs_once_across_threads():
    class Slow(CpuKernels):
        def noisy_draws(self, *args):
            time.sleep(0.001)
            return super().noisy_draws(*args)

    runner = Slow()
    check = selfcheck.FirstUseCheck(runner)
    verdicts, start = [], threading.Barrier(8)

    def ask():
        start.wait()
        verdicts.append((check.passed("noisy_draws", "cpu"), check.passed("vote_", "cpu")))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verdicts == [(True, True)] * 8
    assert runner.calls == {"noisy_draws": len(selfcheck.noise_case()), "vote_": len(selfcheck.vote_case())}


def test_the_fixed_vote_case_has_no_near_ties():
    """CPU and GPU kernels may part at near-ties (float rounding in another order): the case's
    draws are clear of them, but for the exact tie of draw 0 (class 0 in every mode) and the
    non-finite draws 1 and 2 (no vote)."""
    from test_ops import _decision_gap, _per_draw_labels

    calls = selfcheck.vote_case()
    assert {(c[0].shape[2], c[0].dtype, c[3]) for c in calls} == {
        (k, d, a) for k in selfcheck.VOTE_CLASSES for d in ops.LOGIT_DTYPES for a in ops.AGGREGATIONS}
    for logits, rows, counts, agg, weights in calls:
        assert _decision_gap(logits[:, 3:], agg, weights).min() > 1e-4, (agg, logits.dtype, logits.shape)
        labels = _per_draw_labels(ops.reference_vote_, logits[:, :3], agg, weights)
        assert labels.tolist() == [0, -1, -1]
        assert not counts.any()


@pytest.mark.skipif(ops.extension.cuda_kernels is None, reason="drt_fast was built without its CUDA kernels")
def test_the_cuda_kernels_logic_passes_the_check_on_the_host():
    """The CUDA kernels' per-item code run on the host (test_cuda_kernels_on_host) as the
    device runner: the fixed case passes, and takes every noise path and vote kernel."""
    from test_cuda_kernels_on_host import CHANNELS_LAST, CONTIGUOUS, GENERAL, host_vote, on_host

    class OnHost:
        def __init__(self):
            self.paths, self.kernels = set(), set()

        def noisy_draws(self, x, keys, first, reps, sigma, seed, out_dtype, channels_last):
            out, path = on_host(x.float(), keys, first, reps, sigma, seed, out_dtype, channels_last)
            self.paths.add(path)
            return out

        def vote_(self, logits, rows, counts, agg, weights):
            self.kernels.add(host_vote(logits, rows, counts, agg, weights)[0])

    runner = OnHost()
    assert selfcheck.FirstUseCheck(runner).passed("noisy_draws", "cpu")
    assert selfcheck.FirstUseCheck(runner).passed("vote_", "cpu")
    assert runner.paths == {CONTIGUOUS, CHANNELS_LAST, GENERAL} and runner.kernels == {16, 32, 0}


def test_the_check_costs_a_few_milliseconds_on_the_cpu():
    """Both sides of it on the CPU (on a GPU: the CPU kernels' half, the launches, the reads)."""
    for op in selfcheck.CHECKED_OPS:
        seconds = []
        for _ in range(3):
            check = selfcheck.FirstUseCheck(CpuKernels())
            check.passed(op, "cpu")
            seconds.append(check.results()[(op, "cpu")].seconds)
        assert min(seconds) < 0.05, (op, seconds)


def test_cuda_first_use_check_runs_the_real_kernels(cuda_device):
    """The ops' first CUDA calls ran the check on the device and passed; a fresh check with the
    default runner (the ops' own launches) passes too, and says what it cost."""
    x, keys, first, *rest = _noisy_args()
    ops.noisy_draws(x.to(cuda_device), keys.to(cuda_device), first.to(cuda_device), *rest)
    logits, rows, counts, agg, weights = (t.to(cuda_device) if torch.is_tensor(t) else t for t in _vote_args())
    ops.vote_(logits, rows, counts, agg, weights)
    device = str(logits.device)
    done = selfcheck.FIRST_USE.results()
    assert done[("noisy_draws", device)].passed and done[("vote_", device)].passed, done
    check = selfcheck.FirstUseCheck()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check.passed("noisy_draws", cuda_device) and check.passed("vote_", cuda_device)
    for result in check.results().values():
        print(f"first-use check of {result.op} on {result.device}: {result.seconds * 1e3:.2f} ms")
    # no check can run inside a graph capture: a clear error, not a broken capture
    graph, fresh, step = torch.cuda.CUDAGraph(), selfcheck.FirstUseCheck(), torch.zeros(1, device=cuda_device)
    with pytest.raises(DrtFastError, match="before capturing"):
        with torch.cuda.graph(graph):
            step.add_(1)                         # (a graph with something in it)
            fresh.passed("vote_", cuda_device)
    assert fresh.results() == {}


# ---- why CUDA tensors do not run the CUDA kernels (extension.cuda_status) --------------------
class StandInCuda:
    """A stand-in ``_C_cuda`` whose runtime_info() says what a machine would."""

    def __init__(self, **info):
        self.info = {"driver_version": 0, "runtime_version": 13000, "device_count": 0, "error_code": 0,
                     "error": None, **info}

    def runtime_info(self):
        return dict(self.info)

    def architectures(self):
        return "80,90"


INSUFFICIENT = "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
PROC_535 = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
            "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")


@pytest.fixture
def driver_files(tmp_path):
    """Files as the NVIDIA driver writes them: (file of a R535 driver, a missing file)."""
    proc = tmp_path / "version"
    proc.write_text(PROC_535)
    return [str(proc)], [str(tmp_path / "absent")]


def _status(driver_files=(), torch_cuda="12.4", cuda=True, load_error=None, **info):
    ext = ops.Extensions(ops.extension.cpu_kernels, StandInCuda(**info) if cuda else None, load_error)
    return ops.cuda_status(ext, driver_files=driver_files, torch_cuda=torch_cuda)


def test_the_driver_release_is_read_from_the_drivers_files(tmp_path, driver_files):
    assert ops.extension.driver_release(driver_files[0]) == "535.104.05"
    assert ops.extension.driver_release(driver_files[1]) is None
    open_module = tmp_path / "open"
    open_module.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                           "(dvs-builder@U16-I3-B03-4-3)  Tue Jul 15 2025\nGCC version:  gcc version 13.3.0\n")
    sys_module = tmp_path / "sys"
    sys_module.write_text("570.172.08\n")
    assert ops.extension.driver_release([str(open_module)]) == "580.65.06"
    assert ops.extension.driver_release([*driver_files[1], str(sys_module)]) == "570.172.08"


def test_an_old_driver_is_named_with_what_the_build_needs_and_how_to_rebuild(driver_files):
    """Built with CUDA 13 (R580+), on a R535 driver (CUDA 12.2): cudaGetDeviceCount fails."""
    status = _status(driver_files[0], driver_version=12020, error_code=35, error=INSUFFICIENT)
    assert status[:4] == ("driver too old", 12020, 13000, "535.104.05")
    assert status.message.startswith(
        "drt_fast's CUDA kernels were built with CUDA 13.0, which needs NVIDIA driver R580 or newer; this "
        f"machine's driver (535.104.05) supports CUDA 12.2 at most ({INSUFFICIENT}), so CUDA tensors use the "
        "slower pure-torch reference implementation. Update the driver, or rebuild drt-fast with a CUDA 12 "
        "toolkit, the major version of torch's CUDA (12.4): `pip install .` picks it")
    assert "DRT_FAST_TORCH_CUDA=12 pip install ." in status.message and "\n" not in status.message
    # torch newer than the driver, or without CUDA: the driver's own major version
    for torch_cuda in ("13.0", None):
        message = _status(driver_files[1], torch_cuda, driver_version=12020, error_code=35, error=INSUFFICIENT).message
        assert "this machine's driver supports CUDA 12.2 at most" in message
        assert "rebuild drt-fast with a CUDA 12 toolkit, the newest CUDA this driver runs" in message
    # a CUDA 12 build on a CUDA 11.4 driver (R470)
    message = _status(driver_files[1], "12.1", runtime_version=12080, driver_version=11040, error_code=35,
                      error=INSUFFICIENT).message
    assert "built with CUDA 12.8, which needs NVIDIA driver R525 or newer" in message
    assert "a CUDA 11 toolkit" in message


def test_each_reason_for_no_cuda_kernels_has_its_message(driver_files):
    not_built = _status(cuda=False)
    assert not_built.state == "not built" and "DRT_FAST_CUDA=1 pip install ." in not_built.message
    broken = _status(cuda=False, load_error=ImportError("_C_cuda.so: undefined symbol: cudaFoo"))
    assert broken.state == "fails to load" and "(_C_cuda.so: undefined symbol: cudaFoo)" in broken.message
    no_driver = _status(error_code=35, error=INSUFFICIENT)
    assert no_driver.state == "no driver" and no_driver.message.startswith(
        f"drt_fast's CUDA kernels find no NVIDIA driver: {INSUFFICIENT}; CUDA tensors use")
    assert no_driver.message.endswith("Built with CUDA 13.0, they need driver R580 or newer.")
    assert "(the kernel module 535.104.05 is loaded)" in _status(driver_files[0], error_code=35,
                                                                 error=INSUFFICIENT).message
    no_device = _status(driver_files[0], driver_version=13000, error_code=100,
                        error="cudaErrorNoDevice: no CUDA-capable device is detected")
    assert no_device.state == "no device" and no_device.message.startswith(
        "drt_fast's CUDA kernels (built with CUDA 13.0; driver 535.104.05 (CUDA 13.0)) find no usable GPU: "
        "cudaErrorNoDevice: no CUDA-capable device is detected")
    assert "CUDA_VISIBLE_DEVICES" in no_device.message
    ready = _status(driver_version=13010, device_count=2)
    assert ready == ("ready", 13010, 13000, None, None)
    # a GPU the build has no code for: each device's own warning (kernels_run_on)
    uncovered = ops.extension.uncovered_gpu_message("80,90", (7, 5), "Tesla T4")
    assert "hold no code for Tesla T4 (sm_75)" in uncovered
    assert 'CMAKE_CUDA_ARCHITECTURES="80;90;75" pip install .' in uncovered
    assert {s.state for s in (not_built, broken, no_driver, no_device, ready)} | {"driver too old"} == set(
        ops.extension.CUDA_STATES)


def test_the_fallback_warning_says_why_in_a_fresh_process():
    """The one warning of CUDA tensors without CUDA kernels is `cuda_status`'s message."""
    code = ("import warnings, drt_fast.ops as o\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); o.extension.warn_cuda_fallback(); o.extension.warn_cuda_fallback()\n"
            "s = o.cuda_status()\n"
            "print(len(w), str(w[0].message) == (s.message or str(w[0].message)), s.state)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=subprocess_env(), cwd=NEUTRAL_CWD).stdout.split(maxsplit=2)
    assert out[:2] == ["1", "True"] and out[2].strip() in ops.extension.CUDA_STATES, out


def test_version_shows_the_driver_and_the_kernels_runtime():
    from drt_fast.cli import build_report

    ext = ops.extensions()
    old = ext._replace(cuda=StandInCuda(driver_version=12020, error_code=35, error=INSUFFICIENT), cuda_error=None)
    lines = build_report(old).splitlines()
    driver = [l for l in lines if l.startswith("CUDA driver: ")]
    assert len(driver) == 1 and driver[0].endswith(
        "CUDA 12.2; the kernels' CUDA runtime: 13.0 (needs driver R580 or newer)".replace(
            "CUDA 12.2", "CUDA 12.2)" if ops.extension.driver_release() else "CUDA 12.2"))
    assert lines[-1] == ops.cuda_status(old).message
    no_cuda = build_report(ext._replace(cuda=None, cuda_error=None)).splitlines()
    assert no_cuda[-1].startswith("CUDA driver: ") and "runtime" not in no_cuda[-1]
