"""Suite-wide settings: a CPU backend and a fixed path to the golden files."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
