"""Benchmark scripts (`python benchmarks/NAME.py`) and the device suite (`python -m benchmarks.device_suite`)."""
