"""Benchmarks: llmtrain's throughput against the plain HF Trainer (`python -m bench`), and the
memory estimator against measured peaks (bench/memory_validation.py)."""
