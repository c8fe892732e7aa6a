"""Inputs of the activation-pattern analysis: domain samples and sentence-pair data sets.

Domains are the local zero-shot tasks (each item's prompt without its answer) and the text sources
``c4`` / ``wikitext2`` (random windows). Sentence pairs come from STS-B (tab-separated: genre, file,
year, id, score 0-5, sentence1, sentence2 [, extra columns]) or SICK (tab-separated with the header
``pair_ID, sentence_A, sentence_B, relatedness_score, entailment_judgment``, score 1-5).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from eval.zeroshot import local_data_file
from prune.calibration import LOCAL_FILES, DataSourceError, calibration_samples, resolve_text_source
from prune.paths import data_dir

PAIR_DATASETS = {"stsb-test": "stsb/sts-test.csv", "stsb-dev": "stsb/sts-dev.csv"}


@dataclass(frozen=True)
class SentencePair:
    text_a: str
    text_b: str
    score: float
    """Gold relatedness (STS-B 0-5, SICK 1-5)."""


def task_prompt(task: str, item: dict) -> str:
    """An item's prompt without the answer; WinoGrande: the sentence with ``_`` for the blank."""
    if task != "winogrande":
        return item["query"]
    first, second = item["context_options"]
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    prefix = first[:common].rsplit(" ", 1)[0]  # cut back to a word boundary before the options differ
    return f"{prefix} _ {item['continuation']}"


def task_prompts(task: str) -> list[str]:
    """Every prompt of a local zero-shot task (file under $PRUNE_DATA_DIR/zeroshot)."""
    data = data_dir()
    path = local_data_file(task, data) if data else None
    if path is None or not path.is_file():
        raise DataSourceError(
            f"domains: task {task!r} needs its local file under $PRUNE_DATA_DIR/zeroshot ({data or 'unset'})"
        )
    with open(path, encoding="utf-8") as f:
        return [task_prompt(task, json.loads(line)) for line in f if line.strip()]


def domain_samples(
    tokenizer: PreTrainedTokenizerBase, domain: str, samples: int, max_tokens: int, seed: int
) -> list[torch.Tensor]:
    """``samples`` inputs of a domain as token ids [<= max_tokens], reproducible for a seed.

    Tasks: a seeded sample of distinct items, each prompt cut to its last ``max_tokens`` tokens (the
    objective reads the last position). ``c4`` / ``wikitext2``: random windows of ``max_tokens``.
    """
    if domain in LOCAL_FILES:
        windows = calibration_samples(
            tokenizer, resolve_text_source(domain, "domains.names"), samples, max_tokens, seed
        )
        return list(windows)
    prompts = task_prompts(domain)
    if samples > len(prompts):
        raise DataSourceError(f"domains.samples: {domain} has only {len(prompts)} items, asked for {samples}")
    chosen = random.Random(seed).sample(prompts, samples)
    return [torch.tensor(tokenizer(text).input_ids[-max_tokens:], dtype=torch.long) for text in chosen]


def read_sentence_pairs(path: Path) -> list[SentencePair]:
    """STS-B or SICK pairs from a tab-separated file (SICK recognised by its ``pair_ID`` header)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataSourceError(f"{path}: empty sentence-pair file")
    header = lines[0].split("\t")
    if header[0] == "pair_ID":
        columns = {name: header.index(name) for name in ("sentence_A", "sentence_B", "relatedness_score")}
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        return [
            SentencePair(r[columns["sentence_A"]], r[columns["sentence_B"]], float(r[columns["relatedness_score"]]))
            for r in rows
        ]
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) < 7:
            raise DataSourceError(
                f"{path}:{number}: expected at least 7 tab-separated fields (STS-B format), got {len(fields)}"
            )
        pairs.append(SentencePair(fields[5], fields[6], float(fields[4])))
    return pairs


def resolve_pair_dataset(name: str) -> Path:
    """``stsb-test`` / ``stsb-dev`` under $PRUNE_DATA_DIR, or a path to an STS-B or SICK file."""
    if name in PAIR_DATASETS:
        data = data_dir()
        if not data or not (data / PAIR_DATASETS[name]).is_file():
            raise DataSourceError(f"similarity.dataset: {name!r} is not in $PRUNE_DATA_DIR ({data or 'unset'})")
        return data / PAIR_DATASETS[name]
    path = Path(name).expanduser()
    if not path.is_file():
        raise DataSourceError(f"similarity.dataset: file not found: {path} (or use {', '.join(PAIR_DATASETS)})")
    return path


def sample_pairs(pairs: list[SentencePair], count: int, seed: int) -> list[SentencePair]:
    """A seeded sample of ``count`` distinct pairs (all of them, shuffled, when count >= len(pairs))."""
    return random.Random(seed).sample(pairs, min(count, len(pairs)))
