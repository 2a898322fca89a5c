"""Post-training palettization of a torchvision model, then a look inside the file.

    python examples/palettize_torchvision.py [--model resnet18] [--policy "cv:4/1, fc:4/1"] [--out model.safetensors]

The model is randomly initialised (nothing is downloaded); load your own
weights into it first in real use.
"""

import argparse

import torch
import torchvision

import dkm_param as dp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--policy", default="cv:4/1, fc:4/1")
    parser.add_argument("--out", default="model.palettized.safetensors")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
    compressed = dp.palettize(model, dp.Policy.from_notation(args.policy))
    compressed.save(args.out)
    print(compressed.summary())
    with torch.no_grad():
        change = (model(images) - before).abs().max().item()
    print(f"largest change of the outputs: {change:.4f}")

    fresh = getattr(torchvision.models, args.model)(num_classes=10).eval()
    dp.load_compressed(args.out, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    print(f"{args.out} loads back bit for bit")


if __name__ == "__main__":
    main()
