"""Comparison collection and labeling, independent of any model.

- `store`: `ComparisonStore`, a crash-safe directory of items (a prompt, or a conversation,
  and K responses) and labels (choice, ranking, tie, skip), and `export_preferences` to the
  JSONL the reward-model stage reads.
- `labelers`: simulated labelers driven by a programmatic gold score, and `label_store`.
- `server`: the labeling web page (`python -m rlhf_jax.feedback.server --store DIR`), and
  with `--chat --model PATH` the chat page whose two-answer turns become comparisons
  (`rlhf_jax.chat`). It is not imported here so that running it with `-m` does not import it
  twice.
"""

from rlhf_jax.feedback.labelers import (
    BradleyTerryLabeler,
    GoldLabeler,
    Labeler,
    RandomLabeler,
    label_store,
)
from rlhf_jax.feedback.store import (
    KINDS,
    ComparisonStore,
    atomic_write_text,
    normalize_ranking,
    preference_pairs,
    read_preferences,
    validate_item,
)

__all__ = [
    "KINDS",
    "BradleyTerryLabeler",
    "ComparisonStore",
    "GoldLabeler",
    "Labeler",
    "RandomLabeler",
    "atomic_write_text",
    "label_store",
    "normalize_ranking",
    "preference_pairs",
    "read_preferences",
    "validate_item",
]
