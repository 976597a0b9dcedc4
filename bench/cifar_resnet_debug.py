"""Where does the GPU's CIFAR ResNet kernel part from its host program? (A debugging aid.)

    python3 -P bench/cifar_resnet_debug.py [--depth 20] [--variants wmma,mma] [--draws 4]

For each variant, runs the kernel on the GPU and its CTA program on the host
(`ops.cifar_resnet_snapshot`) phase by phase (1: the stem, then one per conv1 -- a stage's
entry: conv1 and the downsample -- and one per conv2), and compares the CTA's shared
memory after each phase, regions 0-2 read as bf16: the first phase whose largest difference
is more than rounding is where the GPU code goes wrong, with the region, position and
channel of the worst element. Then the logits. Not collected by pytest.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from drt_fast import fuse, ops  # noqa: E402
from test_cifar_resnet_kernel import pixels, resnet_member  # noqa: E402


def locate(index: int) -> str:
    """A bf16 element of the snapshot as (region, position, slot). Regions hold 16-channel
    planes of [position][16]; mma.sync swaps a position's two 8-channel halves at every other
    group of 4 positions of its plane (cifar_resnet.cu `at`)."""
    offset = 2 * index
    region = max(i for i, start in enumerate(ops.CIFAR_RESNET_REGIONS) if start <= offset)
    position, slot = divmod((offset - ops.CIFAR_RESNET_REGIONS[region]) // 2, 16)
    return f"region {region}, position {position} from the region's start, slot {slot}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--variants", default="wmma,mma")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest |gpu - host| / (max |host| of the phase) taken as rounding")
    args = parser.parse_args()
    device = torch.device("cuda")
    member = resnet_member(args.depth)
    x = pixels(args.draws)
    blocks = (args.depth - 2) // 6
    end = ops.CIFAR_RESNET_REGIONS[2] + 2 * 18 * 18 * 16 * 2   # regions 0-2, as bf16
    for name in args.variants.split(","):
        variant = ops.CIFAR_RESNET_VARIANTS.index(name)
        k = fuse.cifar_resnet_for_inference(member, variant).module
        k_gpu = fuse.cifar_resnet_for_inference(member, variant).module.to(device)
        host_args = (x, k.weights, k.biases, k.norm, k.fc_w, k.fc_b, blocks, variant)
        gpu_args = (x.to(device), k_gpu.weights, k_gpu.biases, k_gpu.norm, k_gpu.fc_w, k_gpu.fc_b, blocks,
                    variant)
        print(f"== {name}: depth {args.depth}, {1 + 6 * blocks} phases, {args.draws} draws", flush=True)
        bad = None
        for phase in range(1, 2 + 6 * blocks):
            host = ops.cifar_resnet_snapshot(*host_args, phase, on_host=True)[:, :end]
            gpu = ops.cifar_resnet_snapshot(*gpu_args, phase).cpu()[:, :end]
            h = host.contiguous().view(torch.bfloat16).float()
            g = gpu.contiguous().view(torch.bfloat16).float()
            diff = (g - h).abs().nan_to_num(float("inf"))
            scale = h.abs().nan_to_num(0).max().clamp_min(1e-6)
            worst = diff.max()
            draw, index = divmod(int(diff.argmax()), h.shape[1])
            status = "ok" if worst <= args.tolerance * scale else "DIFFERS"
            print(f"phase {phase:3d}: max |gpu - host| {float(worst):.3g} (max |host| {float(scale):.3g}) {status}",
                  flush=True)
            if status != "ok" and bad is None:
                bad = phase
                print(f"    worst at draw {draw}, {locate(index)}: gpu {float(g[draw, index]):.4g}, "
                      f"host {float(h[draw, index]):.4g}", flush=True)
        logits_gpu = k_gpu(x.to(device)).cpu()
        logits_ref = ops.reference_cifar_resnet(*host_args)
        err = float((logits_gpu - logits_ref).norm() / logits_ref.norm())
        print(f"{name}: logits vs the torch reference, relative error {err:.3g}; "
              f"first differing phase: {bad}", flush=True)


if __name__ == "__main__":
    main()
