"""Benchmarks of the pipeline: run each as `python -m benchmarks.<name>` from the project root."""
