import subprocess
import sys

import dkm_param as dp

PUBLIC = {
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
    "load_compressed",
    "read_compressed",
    "palettize",
    "fisher",
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
    "CodebookParametrization",
    "finetune_codebooks",
    "register_dkm",
    "remove_dkm",
    "scale_temperature",
    "snapped",
    "CoreMLExport",
    "ExportError",
    "export_program",
    "save_program",
    "to_coreml",
}


def test_public_api_surface_is_pinned():
    assert set(dp.__all__) == PUBLIC
    assert all(hasattr(dp, name) for name in PUBLIC)


def test_error_hierarchy():
    for cls in (dp.SpecError, dp.FormatError, dp.RegistrationError, dp.SurgeryError, dp.ExportError):
        assert issubclass(cls, dp.DKMError) and issubclass(cls, ValueError)


def test_import_is_light():
    # torch itself may import tqdm; count only what importing dkm_param adds
    code = (
        "import sys, torch; before = set(sys.modules); import dkm_param;"
        "added = set(sys.modules) - before;"
        "heavy = [m for m in ('torchvision', 'matplotlib', 'sklearn', 'transformers', 'hypothesis', 'tqdm', "
        "'rich') if m in added];"
        "print(heavy, torch.cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"


def test_api_reference_is_up_to_date():
    import runpy
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    render = runpy.run_path(str(docs / "make_api.py"))["render"]
    assert (docs / "api.md").read_text() == render(), "run: python docs/make_api.py"
