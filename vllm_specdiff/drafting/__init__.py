"""Drafters: propose draft tokens and the exact law each was drawn from (shared/docs/lossless.md)."""
