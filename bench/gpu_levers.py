"""GPU levers for the member forwards of 3x CIFAR ResNet-110 (and 3x ResNet-50): which pay?

    python bench/gpu_levers.py [--arch cifar_resnet110] [--batches 500,1000,2000,4000]
        [--iters 10] [--compile] [--json out.json]

The member forwards are nearly all of certify's time on a GPU (the profile in RESULTS.md), so
the levers are measured on them alone, for one batch of noisy draws through all members,
timed with CUDA events (median of ``--iters`` after warm-up): layout (NCHW/channels-last),
cuDNN autotuning, BatchNorm folded into the convolutions, bf16 (autocast or bf16 weights),
CUDA-graph replay, the CPU's dense members where they apply (``--arch digits_cnn``),
drt-fast's whole-network kernel for CIFAR ResNets (``bf16 CIFAR ResNet kernel``), the members
as one network of grouped convolutions (``GroupedCifarResNets``, an experiment), and
optionally torch.compile. Also timed: ``noisy_draws`` and ``vote_``
for the same batch (their share of a batch). The last lines are a table of ms per 1000
draws and the certify time per image this projects at n = 100,000. Not collected by pytest.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drt_fast  # noqa: E402
from drt_fast import ops  # noqa: E402
from drt_fast.errors import first_line  # noqa: E402
from drt_fast.ensemble import Ensemble  # noqa: E402
from test_certify import random_ensemble, random_input  # noqa: E402


def fold_bn(ensemble):
    """A copy of the ensemble with every Conv2d -> BatchNorm2d pair folded (eval only)."""
    from torch.fx.experimental.optimization import fuse
    members = [fuse(copy.deepcopy(m).eval(), inplace=True) for m in ensemble.members]
    return Ensemble(members, mode=ensemble.mode, weights=ensemble.weights.clone()).eval()


class GroupedCifarResNets(torch.nn.Module):
    """An experiment for the lever "members as one batched call": M CIFAR ResNets that share
    their input normalization as ONE network whose activations hold the members' channels side
    by side (member-major), so that each layer is one grouped convolution (groups=M) for all
    members instead of M convolutions: BatchNorms folded (`fuse.fold_conv_bn`), conv + bias (+ add)
    + ReLU as ``fused_ops`` calls (cuDNN's on CUDA), the first convolution shared (all members
    see the same draw), the heads as one batched matmul. Returns member logits [M, N, K] like
    an Ensemble. Not in the engine: measured here first."""

    def __init__(self, members, fused_ops, dtype):
        super().__init__()
        from drt_fast import fuse
        parts = [fuse.cifar_resnet_parts(m) for m in members]
        means, sds = parts[0][0], parts[0][1]
        if not all(torch.equal(p[0], means) and torch.equal(p[1], sds) for p in parts):
            raise ValueError("the members normalize their inputs differently")
        nets = [p[2] for p in parts]
        self.M, self.ops, self.dtype = len(nets), fused_ops, dtype
        self.register_buffer("means", means.view(1, 3, 1, 1).clone())
        self.register_buffer("sds", sds.view(1, 3, 1, 1).clone())
        self.convs = []

        def conv(pairs, shared=False):
            weights, biases = zip(*[fuse.fold_conv_bn(c, b) for c, b in pairs])
            c = pairs[0][0]
            w = torch.cat(weights).to(dtype).contiguous(memory_format=torch.channels_last)
            self.convs.append((w, torch.cat(biases).to(dtype), list(c.stride), list(c.padding),
                               [1, 1], 1 if shared else self.M))
            return len(self.convs) - 1

        self.first = conv([(n.conv1, n.bn1) for n in nets], shared=True)
        self.blocks = []
        for stage in ("layer1", "layer2", "layer3"):
            for b in range(len(nets[0].layer1)):
                blocks = [getattr(n, stage)[b] for n in nets]
                self.blocks.append((conv([(k.conv1, k.bn1) for k in blocks]),
                                    conv([(k.conv2, k.bn2) for k in blocks]),
                                    None if blocks[0].downsample is None else
                                    conv([(k.downsample[0], k.downsample[1]) for k in blocks])))
        self.fc_w = torch.stack([n.fc.weight.detach() for n in nets]).to(dtype).transpose(1, 2).contiguous()
        self.fc_b = torch.stack([n.fc.bias.detach() for n in nets]).to(dtype)[:, None]

    def forward(self, x):
        c = self.convs
        x = ((x - self.means) / self.sds).to(self.dtype)
        h = self.ops.conv_relu(x, *c[self.first])
        for a, b, down in self.blocks:
            y = self.ops.conv_relu(h, *c[a])
            w, bias, stride, padding, dilation, groups = c[down] if down is not None else c[a]
            z = h if down is None else torch.nn.functional.conv2d(h, w, bias, stride, padding, dilation, groups)
            w, bias, stride, padding, dilation, groups = c[b]
            h = self.ops.conv_add_relu(y, w, z, 1.0, bias, stride, padding, dilation, groups)
        pooled = h.mean((2, 3)).view(h.shape[0], self.M, -1).transpose(0, 1)   # [M, N, 64]
        return torch.baddbmm(self.fc_b, pooled, self.fc_w)                      # [M, N, K]


def event_time(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]   # ms


def graphed(forward, example):
    """forward(x) captured in a CUDA graph for x's shape and layout; returns replay(x)."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            forward(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_in)

    def replay(x):
        static_in.copy_(x)
        graph.replay()
        return static_out
    return replay


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="cifar_resnet110")
    parser.add_argument("--batches", default="500,1000,2000,4000")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-modes", default="default,max-autotune-no-cudagraphs")
    parser.add_argument("--freezing", action="store_true", help="inductor freezing (folds BN)")
    parser.add_argument("--only", default="", help="run only variants whose name contains this")
    parser.add_argument("--json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    device = torch.device("cuda")
    num_classes = 1000 if args.arch == "resnet50" else 10
    base = random_ensemble(args.arch, num_classes=num_classes, device=device)
    x = random_input(args.arch, device=device)
    keys = torch.zeros(1, dtype=torch.int64, device=device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, drt_fast cuda kernels "
          f"{drt_fast.cuda_available()}, tf32 conv {torch.backends.cudnn.allow_tf32}", flush=True)

    rows = []
    failed = set()   # variants whose logits check raised: not timed

    def wanted(name):
        """Whether ``--only`` keeps the variant ``name``."""
        return not args.only or any(o in name for o in args.only.split("|"))

    def add(name, batch, ms, extra=""):
        per_k = ms / batch * 1000
        rows.append({"variant": name, "batch": batch, "ms_per_batch": ms, "ms_per_1000": per_k,
                     "projected_s_per_image_n1e5": per_k * 100.1 / 1000})
        print(f"{name:<44} b={batch:<5} {ms:9.2f} ms/batch {per_k:8.2f} ms/1000 draws "
              f"-> {per_k * 0.1001:6.2f} s/image {extra}", flush=True)

    def variants(batch):
        nchw = x.expand(batch, *x.shape).contiguous()
        cl = nchw.contiguous(memory_format=torch.channels_last)
        bf_cl = cl.to(torch.bfloat16)
        m_nchw = base
        m_cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
        m_fold_cl = fold_bn(base).to(memory_format=torch.channels_last)
        m_fold_bf = copy.deepcopy(m_fold_cl).to(torch.bfloat16)

        def autocast(model):
            def fwd(inp):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(inp)
            return fwd

        def cudnn_fused(dtype):
            from drt_fast import fuse
            example = cl[:2].contiguous()
            members = [fuse.for_inference(m, fuse.cudnn_ops(), dtype, example).module
                       for m in base.members]
            return Ensemble(members, mode=base.mode).to(memory_format=torch.channels_last).eval()

        def dense():
            """The CPU's dense rewrite (`fuse.dense_for_inference`) on the GPU: None where a
            member is not lowered (ResNets; it pays on the digits CNN on the CPU)."""
            from drt_fast import fuse
            members = [fuse.dense_for_inference(m, nchw[:1]) for m in base.members]
            if not all(r.dense for r in members):
                return []
            m_dense = Ensemble([r.module for r in members], mode=base.mode).eval()
            return [("fp32 dense members", True, m_dense, nchw),
                    ("bf16 autocast dense members", True, autocast(m_dense), nchw.to(torch.bfloat16))]

        def cifar_resnet_kernel():
            """drt-fast's whole-network CIFAR ResNet kernel, both variants
            (`fuse.cifar_resnet_for_inference`, bf16 inside; what certify runs with
            DRT_FAST_CIFAR_RESNET=mma|wmma): none where a member is not a CIFAR ResNet."""
            from drt_fast import fuse
            out = []
            for variant, name in enumerate(ops.CIFAR_RESNET_VARIANTS):
                members = [fuse.cifar_resnet_for_inference(m, variant) for m in base.members]
                if not all(r.fused for r in members):
                    return []
                m_kernel = Ensemble([r.module for r in members], mode=base.mode).eval()
                label = f"bf16 CIFAR ResNet kernel, {name} (drt_fast)"
                if label in failed:
                    continue
                if batch == first_batch and wanted(label):
                    # the kernel has not run on a GPU before: an error in its first call is
                    # reported and the variant dropped, so the other variants are still timed
                    try:
                        check_logits(label, m_kernel, torch.bfloat16)
                    except Exception as err:  # noqa: BLE001 -- reported, not timed
                        print(f"{label}: failed: {type(err).__name__}: {first_line(err)}", flush=True)
                        failed.add(label)
                        continue
                out.append((label, True, m_kernel, nchw.to(torch.bfloat16)))
            return out

        def check_logits(label, model, dtype, channels_last=False):
            """A timing is only worth reading if the logits are right: 64 noisy draws through
            ``model`` (in ``dtype``) against the fp32 members, draw by draw."""
            draws = (x + 0.25 * torch.randn(64, *x.shape, device=device,
                                            generator=torch.Generator(device).manual_seed(0))).clamp(0, 1)
            if channels_last:
                draws = draws.contiguous(memory_format=torch.channels_last)
            got, want = model(draws.to(dtype)).float(), base(draws).float()
            err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).flatten()
            print(f"{label}: logits vs the fp32 members on 64 noisy draws: relative error "
                  f"max {err.max():.2e}, median {err.median():.2e}, argmax agreement "
                  f"{(got.argmax(-1) == want.argmax(-1)).float().mean():.3f}", flush=True)

        def grouped():
            """`GroupedCifarResNets` in fp32 and bf16, checked against the fp32 members first:
            none where the members are not CIFAR ResNets."""
            from drt_fast import fuse
            out = []
            for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                label = f"{name} channels-last cudnn-fused members grouped (experiment)"
                try:
                    model = GroupedCifarResNets(base.members, fuse.cudnn_ops(), dtype)
                except Exception as err:  # noqa: BLE001 -- reported, not timed
                    if batch == first_batch and wanted(label):
                        print(f"{label}: not built: {err}", flush=True)
                    return []
                inp = cl.to(dtype)
                if batch == first_batch and wanted(label):
                    check_logits(label, model, dtype, channels_last=True)
                out.append((label, True, model, inp))
            return out

        m_vmap = copy.deepcopy(m_cl)
        m_vmap.batch_members = True              # members as one vmapped call (fp32 only)
        m_fused32 = cudnn_fused(torch.float32)
        m_fused16 = cudnn_fused(torch.bfloat16)
        out = [
            ("fp32 channels-last cudnn-fused", True, m_fused32, cl),
            ("bf16 autocast channels-last cudnn-fused", True, autocast(m_fused16), bf_cl),
            ("fp32 NCHW (reference: no autotune)", False, m_nchw, nchw),
            ("fp32 NCHW autotune", True, m_nchw, nchw),
            ("fp32 channels-last autotune", True, m_cl, cl),
            ("fp32 channels-last BN-folded", True, m_fold_cl, cl),
            ("fp32 channels-last members vmapped", True, m_vmap, cl),
            ("bf16 autocast channels-last", True, autocast(m_cl), bf_cl),
            ("bf16 autocast channels-last BN-folded", True, autocast(m_fold_cl), bf_cl),
            ("bf16 weights channels-last BN-folded", True, m_fold_bf, bf_cl),
        ] + grouped() + dense() + cifar_resnet_kernel()
        return out

    first_batch = int(args.batches.split(",")[0])
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            for name, autotune, model, inp in variants(batch):
                if not wanted(name):
                    continue
                torch.backends.cudnn.benchmark = autotune
                try:
                    add(name, batch, event_time(lambda: model(inp), args.iters),
                        f"(vmap used: {model._batching_works})" if getattr(model, "batch_members", False) else "")
                except torch.OutOfMemoryError:
                    print(f"{name} b={batch}: out of memory", flush=True)
                    continue
                if autotune and batch <= 2000:
                    try:
                        replay = graphed(model, inp)
                        add(name + " +graph", batch, event_time(lambda: replay(inp), args.iters))
                    except Exception as err:  # noqa: BLE001 -- a lever that fails is reported
                        print(f"{name} +graph b={batch}: {type(err).__name__}: {err}", flush=True)
                torch.cuda.empty_cache()
            # noise and vote for the same batch
            torch.backends.cudnn.benchmark = True
            first = torch.zeros(1, dtype=torch.int64, device=device)
            for dtype in (torch.float32, torch.bfloat16):
                ms = event_time(lambda: ops.noisy_draws(x[None], keys, first, batch, 0.25, 0,
                                                        out_dtype=dtype, channels_last=True),
                                args.iters)
                print(f"noisy_draws {dtype} b={batch}: {ms:.3f} ms", flush=True)
            logits = torch.randn(3, batch, num_classes, device=device)
            rows_idx = torch.zeros(batch, dtype=torch.int64, device=device)
            counts = torch.zeros(1, num_classes, dtype=torch.int64, device=device)
            w = torch.full((3,), 1 / 3, device=device)
            for dtype in (torch.float32, torch.bfloat16):
                lg = logits.to(dtype)
                ms = event_time(lambda: ops.vote_(lg, rows_idx, counts, "we", w), args.iters)
                print(f"vote_ we {dtype} b={batch}: {ms:.3f} ms", flush=True)

        if args.compile:
            batch = 2000 if args.arch != "resnet50" else 256
            inp = x.expand(batch, *x.shape).contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
            model = copy.deepcopy(base).to(memory_format=torch.channels_last)
            if args.freezing:
                import torch._inductor.config as inductor_config
                inductor_config.freezing = True
            for mode in args.compile_modes.split(","):
                torch._dynamo.reset()
                start = time.perf_counter()
                compiled = torch.compile(model, mode=mode)

                def fwd():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        return compiled(inp)
                fwd()
                torch.cuda.synchronize()
                print(f"torch.compile {mode}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
                add(f"bf16 autocast CL torch.compile({mode}{', freezing' if args.freezing else ''})",
                    batch, event_time(fwd, args.iters))

    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
