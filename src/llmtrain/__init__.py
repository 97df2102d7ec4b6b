"""llmtrain: container-first, reproducible LLM fine-tuning for Slurm and PBS clusters."""

__version__ = "0.1.0"
