"""Stage 1, the teacher side: fine-tune the teacher, then capture its outputs into a teacher cache."""

from .capture import estimate_capture, run_capture
from .train import run_teacher_train

__all__ = ["estimate_capture", "run_capture", "run_teacher_train"]
