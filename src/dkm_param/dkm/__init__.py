"""DKM on a model: the parametrization, register_dkm and remove_dkm, finalize, codebook fine-tuning, annealing."""
