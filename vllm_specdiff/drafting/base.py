"""The contract every drafter keeps: draft token ids and the law each was sampled from."""
from ..drafter import DraftOutput, Drafter, Generators  # noqa: F401  (one definition, re-exported)
