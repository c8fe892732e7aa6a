"""Text sources for calibration and evaluation, and seeded calibration samples.

Named sources read a local file from the data directory $PRUNE_DATA_DIR (laid out like
``shared/data``) when it is there, and otherwise the Hugging Face ``datasets`` copy:

- ``c4``: first shard of C4 ``en`` train (documents);
- ``wikitext2``: WikiText-2 raw, test split (one running text). Calibrating on it means calibrating
  on the text perplexity is measured on; the report flags that.

Any ``.jsonl`` file (one ``{"text": ...}`` document per line) or ``.txt`` file (one running text) works too.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from prune.paths import data_dir, file_identity


class DataSourceError(RuntimeError):
    """A named data source is neither local nor loadable; the message names it."""


LOCAL_FILES = {
    "c4": "c4/c4-train.00000-of-01024.first1000.jsonl",
    "wikitext2": "wikitext2/wiki.test.raw",
}


@dataclass(frozen=True)
class TextSource:
    """A text source. ``kind``: ``jsonl`` (documents), ``txt`` (one running text) or ``hub`` (``datasets``);
    ``location``: its path or name."""

    name: str
    kind: str
    location: str
    key: str = "text source"
    """The recipe key that named it (for messages)."""

    def fingerprint(self) -> str:
        """Identity of the text: path, size and modification time of a local file; the name of a hub data set."""
        return f"hub:{self.location}" if self.kind == "hub" else file_identity(Path(self.location))

    @property
    def is_documents(self) -> bool:
        return self.kind == "jsonl" or (self.kind == "hub" and self.location == "c4")


def resolve_text_source(name: str, key: str) -> TextSource:
    """Resolve a recipe's data source; ``key`` names the recipe key in error messages."""
    if name in LOCAL_FILES:
        data = data_dir()
        if data and (data / LOCAL_FILES[name]).is_file():
            path = data / LOCAL_FILES[name]
            return checked(TextSource(name, "jsonl" if path.suffix == ".jsonl" else "txt", str(path), key))
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DataSourceError(
                f"{key}: {name!r} is not in $PRUNE_DATA_DIR ({data or 'unset'}) and the 'datasets' package "
                "is not installed (pip install 'prune[online]')"
            ) from None
        return TextSource(name, "hub", name, key)
    path = Path(name).expanduser()
    if path.suffix not in (".txt", ".jsonl", ".raw"):
        raise DataSourceError(f"{key}: {name!r} is neither c4, wikitext2 nor a .txt/.jsonl file")
    if not path.is_file():
        raise DataSourceError(f"{key}: file not found: {path}")
    return checked(TextSource(name, "jsonl" if path.suffix == ".jsonl" else "txt", str(path), key))


def read_documents(source: TextSource) -> list[str]:
    """The source's texts: one per document for document corpora, a single running text otherwise.

    A local file that is not UTF-8, or a ``.jsonl`` line that is not a JSON object with a string ``text``,
    raises DataSourceError naming the file and line.
    """
    if source.kind == "jsonl":
        documents = []
        with open(source.location, encoding="utf-8") as f:
            try:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        documents.append(_document_text(line, source, number))
            except UnicodeDecodeError:
                raise DataSourceError(f"{source.key}: {source.location} is not UTF-8 text") from None
        return documents
    if source.kind == "txt":
        try:
            return [Path(source.location).read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise DataSourceError(f"{source.key}: {source.location} is not UTF-8 text") from None
    import datasets

    if source.location == "c4":
        rows = datasets.load_dataset(
            "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
        )
        return list(rows["text"])
    rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return ["".join(rows["text"])]


def _document_text(line: str, source: TextSource, number: int) -> str:
    try:
        document = json.loads(line)
    except json.JSONDecodeError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        raise DataSourceError(f'{source.key}: {source.location}:{number}: expected a JSON object with a "text" string')
    return document["text"]


def checked(source: TextSource) -> TextSource:
    """``source`` after checking that it holds text: DataSourceError for an empty or unreadable file."""
    if not any(text.strip() for text in read_documents(source)):
        raise DataSourceError(f"{source.key}: {source.location} holds no text")
    return source


def evaluation_tokens(tokenizer: PreTrainedTokenizerBase, source: TextSource) -> torch.Tensor:
    """All of the source's text joined and tokenized once: LongTensor [n_tokens]."""
    text = "\n\n".join(read_documents(source))
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase, source: TextSource, samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens: LongTensor [samples, seqlen], reproducible for a seed.

    Document corpora: a random document longer than ``seqlen`` tokens, then a random window of it
    (the GPTQ/Wanda protocol). Running text: a random window of the whole tokenized text.
    """
    rng = random.Random(seed)
    documents = read_documents(source)
    windows: list[list[int]] = []
    if source.is_documents:
        attempts = 0
        while len(windows) < samples:
            attempts += 1
            if attempts > 200 * samples:
                raise DataSourceError(
                    f"calibration.source: too few documents of more than {seqlen} tokens in {source.name} "
                    f"(found {len(windows)} of {samples}); lower calibration.seqlen"
                )
            ids = tokenizer(documents[rng.randrange(len(documents))]).input_ids
            if len(ids) > seqlen:
                start = rng.randrange(len(ids) - seqlen)
                windows.append(ids[start : start + seqlen])
    else:
        ids = tokenizer(documents[0]).input_ids
        if len(ids) <= seqlen:
            raise DataSourceError(
                f"calibration.source: {source.name} has only {len(ids)} tokens, need more than {seqlen}"
            )
        for _ in range(samples):
            start = rng.randrange(len(ids) - seqlen)
            windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)
