"""dkm-param: weight clustering (differentiable k-means) for PyTorch models.

Each chosen weight becomes a small codebook plus one low-bit index per weight
(or per short vector of weights), learnt while the network trains (DKM) or
clustered once after training, and is saved as one safetensors file.

The main entry points:

- ``Policy``, ``LayerSpec``: which layers are clustered, and how;
  ``policy.plan(model)`` prints the decision without touching the model.
- ``register_dkm(model, policy)``, then the usual training loop, then
  ``finalize(model)``: the snapped weights and a ``CompressedModel``
  (``.save(path)``, ``.summary()``).
- ``palettize(model, policy)``: k-means once, without training.
- ``load_compressed(path, model)``, ``read_compressed(path)``: read a file back.
- ``cluster_filters``, ``CentripetalSGD``, ``thin``: fewer filters (C-SGD).
- ``to_coreml``, ``export_program`` (and ``save_program``), ``load_compressed(..., keep_compressed=True)``:
  the file's codebooks and indices in Core ML, torch.export, and memory.

Every public name is documented in docs/api.md of the source repository
(generated from these docstrings); ``help(dkm_param.register_dkm)`` shows one,
``dkm-param --help`` the command line.
"""

from .deploy import CoreMLExport, export_program, save_program, to_coreml
from .dkm.anneal import scale_temperature, snapped
from .dkm.codebooks import CodebookParametrization, finetune_codebooks
from .dkm.finalize import finalize
from .dkm.parametrization import DKMParametrization
from .dkm.register import register_dkm, remove_dkm
from .errors import DKMError, ExportError, FormatError, RegistrationError, SpecError, SurgeryError
from .filters.csgd import CentripetalSGD, CSGDSpec, FilterPlan, FilterRow, cluster_filters, collapse_
from .filters.thinning import ThinReport, count_macs, thin
from .format import CompressedLayer, CompressedModel, Summary, load_compressed, read_compressed
from .policy import LayerPlan, Plan, Policy
from .posttrain.palettize import palettize
from .posttrain.sensitivity import fisher
from .spec import LayerSpec, StorageSpec, TrainingSpec

__version__ = "0.1.0.dev0"

__all__ = [
    "scale_temperature",
    "snapped",
    "CodebookParametrization",
    "finetune_codebooks",
    "CSGDSpec",
    "CentripetalSGD",
    "FilterPlan",
    "FilterRow",
    "SurgeryError",
    "ThinReport",
    "cluster_filters",
    "collapse_",
    "count_macs",
    "thin",
    "CompressedLayer",
    "CompressedModel",
    "DKMError",
    "DKMParametrization",
    "FormatError",
    "LayerPlan",
    "LayerSpec",
    "StorageSpec",
    "TrainingSpec",
    "Plan",
    "Policy",
    "RegistrationError",
    "SpecError",
    "Summary",
    "finalize",
    "fisher",
    "load_compressed",
    "palettize",
    "read_compressed",
    "register_dkm",
    "remove_dkm",
    "CoreMLExport",
    "ExportError",
    "export_program",
    "save_program",
    "to_coreml",
]
