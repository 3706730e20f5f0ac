"""Stage 2, the student side: distill students from a teacher cache, reading nothing else."""

from .distill import run_distill

__all__ = ["run_distill"]
