"""Compression ratio that summary() reports for torchvision models under a few policies.

Registration and finalize only (no training needed for the sizes):
    python benchmarks/compression_ratio.py [--models resnet18 mobilenet_v2] [--policies "cv:4/1, fc:4/1"]
"""

import argparse

import torch
import torchvision

import dkm_param as dp


def measure(arch: str, notation: str, **policy_args):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    dp.register_dkm(model, dp.Policy.from_notation(notation, **policy_args))
    model.eval()
    return dp.finalize(model).summary()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--policies", nargs="+", default=["cv:4/1, fc:4/1", "cv:2/1, fc:2/1"])
    args = parser.parse_args()
    print("| model | policy | before | after | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for arch in args.models:
        for notation in args.policies:
            s = measure(arch, notation)
            print(
                f"| {arch} | `{notation}` | {s.bytes_before / 2**20:.2f} MiB | {s.bytes_after / 2**20:.2f} "
                f"MiB | {s.ratio:.2f}x |"
            )


if __name__ == "__main__":
    main()
