"""Training with DKM registered: long runs stay sane, runs repeat, resumes are exact."""

import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dkm_param as dp


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )


def test_200_steps_at_2_bits_stay_finite_with_centroids_inside_the_weights():
    torch.manual_seed(0)
    model = small_cnn()
    plan = dp.register_dkm(model, dp.Policy.from_notation("cv:2/1, fc:2/1", small_layer_bits=None))
    params = {r.name: model.get_submodule(r.name).parametrizations.weight for r in plan.clustered()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    first = None
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        for plist in params.values():
            weight, codebook = plist.original.detach(), plist[0].codebook
            assert torch.isfinite(codebook).all()
            assert weight.min() - 1e-6 <= codebook.min() and codebook.max() <= weight.max() + 1e-6
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import dkm_param as dp
    sys.path.insert(0, {tests!r})
    from test_training import small_cnn
    torch.manual_seed(0)
    model = small_cnn()
    dp.register_dkm(model, dp.Policy.from_notation("cv:3/1, fc:3/1", small_layer_bits=None))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    dp.finalize(model).save(sys.argv[1])
    """
)


def test_fixed_seed_gives_identical_files_run_to_run(tmp_path):
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    blobs = []
    for run in range(2):
        out = tmp_path / f"run{run}.safetensors"
        subprocess.run([sys.executable, str(script), str(out)], check=True)
        blobs.append(out.read_bytes())
    assert blobs[0] == blobs[1]


def test_interrupted_run_resumes_bit_for_bit_from_a_safetensors_checkpoint(tmp_path):
    def steps(model, opt, count, seed):
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(count):
            x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def fresh():
        torch.manual_seed(0)
        model = small_cnn()
        dp.register_dkm(model, dp.Policy.from_notation("cv:2/1, fc:2/1", small_layer_bits=None))
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, opt = fresh()
    uninterrupted = steps(model, opt, 4, seed=1) + steps(model, opt, 4, seed=2)

    model, opt = fresh()
    steps(model, opt, 4, seed=1)
    save_file(model.state_dict(), str(tmp_path / "ckpt.safetensors"))  # every DKM state is a tensor
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    del model, opt

    model, opt = fresh()
    model.load_state_dict(load_file(str(tmp_path / "ckpt.safetensors")))
    opt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert steps(model, opt, 4, seed=2) == uninterrupted[4:]
