"""The command line and what serves people directly: inspect, the demo, plots."""

from .main import main

__all__ = ["main"]
