"""Cases from real training runs that the DKM engine once got wrong."""

from pathlib import Path

import torch
from safetensors import safe_open

from dkm_param.ops import soft

DATA = Path(__file__).parents[1] / "data"


def load(name):
    with safe_open(str(DATA / name), "pt") as f:
        meta = f.metadata()
        return (
            f.get_tensor("vectors"),
            f.get_tensor("codebook"),
            float(meta["tau"]),
            int(meta["max_iter"]),
            float(meta["epsilon"]),
        )


def test_clusters_with_almost_no_mass_do_not_overflow_the_gradient():
    # 512 weights, 256 clusters: some clusters keep ~1e-38 of attention mass
    vectors, codebook, tau, max_iter, epsilon = load("dead_clusters.safetensors")
    for window in (True, False):
        for seed in range(3):
            weight = vectors.clone().requires_grad_(True)
            out, _, _ = soft.soft_cluster(weight, codebook.clone(), tau, max_iter, epsilon, window=window)
            probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
            (out * probe).sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(weight.grad).all()
            reference, _, _ = soft.soft_cluster_reference(vectors, codebook.clone(), tau, max_iter, epsilon)
            assert torch.allclose(out, reference, rtol=1e-4, atol=1e-6)
