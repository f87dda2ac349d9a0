"""Drafter networks: log-score / logit computations only (no sampling)."""
