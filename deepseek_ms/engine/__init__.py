"""Continuous-batching engine: paged latent cache bookkeeping, scheduling and the model runner."""
