"""Functions the local task definitions (``*.yaml`` beside this file) refer to with ``!function``.

The data files (``zeroshot/*.jsonl`` in the data directory) hold ``{"query", "choices", "gold"}``:
each choice is scored as the continuation of the query, joined by a space unless the choice starts
with punctuation. The join is part of the choice (the YAMLs set ``target_delimiter: ""``).
"""

import string


def joined(choice: str) -> str:
    """The continuation scored after the query: ``" " + choice``, or ``choice`` if it starts with punctuation."""
    return choice if choice[:1] in string.punctuation else " " + choice


def choices(doc: dict) -> list[str]:
    return [joined(choice) for choice in doc["choices"]]


def winogrande_continuation(doc: dict) -> str:
    """WinoGrande (partial scoring): the same continuation after each context option."""
    return joined(doc["continuation"])
