"""dkm-param: weight clustering (differentiable k-means) for PyTorch models."""

from .codebooks import CodebookParametrization, finetune_codebooks
from .csgd import CentripetalSGD, CSGDSpec, FilterPlan, FilterRow, cluster_filters, collapse_
from .errors import DKMError, FormatError, RegistrationError, SpecError, SurgeryError
from .export import CompressedLayer, CompressedModel, finalize, load_compressed, read_compressed
from .palettize import fisher, palettize
from .parametrization import DKMParametrization
from .policy import LayerPlan, Plan, Policy
from .register import register_dkm, remove_dkm
from .report import Summary
from .spec import LayerSpec
from .surgery import ThinReport, count_macs, thin

__version__ = "0.1.0.dev0"

__all__ = [
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
]
