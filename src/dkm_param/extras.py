"""Optional extras: the pip command that installs one, for messages that say it is missing."""

from __future__ import annotations

# The packages of each extra, as pyproject.toml's [project.optional-dependencies] lists them (a test
# keeps the two equal). dkm-param is not on PyPI, so `pip install 'dkm-param[plots]'` cannot work:
# hints name the packages themselves, and the extra for a source checkout.
EXTRAS: dict[str, tuple[str, ...]] = {
    "progress": ("tqdm>=4.60",),
    "plots": ("matplotlib>=3.7",),
    "demo": ("scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60"),
    "coreml": ("coremltools>=8",),
}


def install_hint(extra: str) -> str:
    """How to install ``extra``: ``pip install`` of its packages, or of the extra in a source checkout.

    Raises KeyError for an extra that is not in ``EXTRAS``.
    """
    packages = " ".join(f"'{package}'" for package in EXTRAS[extra])
    return f"pip install {packages} (in a source checkout of dkm-param: pip install -e \".[{extra}]\")"
