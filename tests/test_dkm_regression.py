"""Cases from real training runs that the DKM engine once got wrong."""

from pathlib import Path

import torch
from safetensors import safe_open

from dkm_param import dkm

DATA = Path(__file__).parent / "data"


def load(name):
    with safe_open(str(DATA / name), "pt") as f:
        meta = f.metadata()
        return f.get_tensor("vectors"), f.get_tensor("codebook"), float(meta["tau"]), int(meta["max_iter"]), float(meta["epsilon"])


def test_clusters_with_almost_no_mass_do_not_overflow_the_gradient():
    # 512 weights, 256 clusters: some clusters keep ~1e-38 of attention mass
    vectors, codebook, tau, max_iter, epsilon = load("dead_clusters.safetensors")
    for window in (True, False):
        for seed in range(3):
            weight = vectors.clone().requires_grad_(True)
            soft, _, _ = dkm.soft_cluster(weight, codebook.clone(), tau, max_iter, epsilon, window=window)
            probe = torch.randn(soft.shape, generator=torch.Generator().manual_seed(seed))
            (soft * probe).sum().backward()
            assert torch.isfinite(soft).all() and torch.isfinite(weight.grad).all()
            reference, _, _ = dkm.soft_cluster_reference(vectors, codebook.clone(), tau, max_iter, epsilon)
            assert torch.allclose(soft, reference, rtol=1e-4, atol=1e-6)
