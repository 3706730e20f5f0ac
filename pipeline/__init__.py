"""The stages of kdcache: teacher fine-tuning, teacher capture into a cache, distillation from it."""
