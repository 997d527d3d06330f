"""Launch scripts and sweeps (run as `python experiments/launch.py` / `python experiments/sweep.py`)."""
