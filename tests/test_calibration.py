"""Calibration samples: seeded, reproducible, the right shape, from every kind of source."""

import json

import pytest
import torch
from conftest import CharTokenizer, shared_dir

from prune.calibration import DataSourceError, calibration_samples, evaluation_tokens, resolve_text_source


@pytest.fixture
def jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [{"text": f"document {i} " + "abcdefghij" * (3 + i)} for i in range(20)]
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return resolve_text_source(str(path), "calibration.source")


def test_samples_are_seeded_and_reproducible(jsonl_source):
    tokenizer = CharTokenizer()
    a = calibration_samples(tokenizer, jsonl_source, 6, 25, seed=3)
    b = calibration_samples(tokenizer, jsonl_source, 6, 25, seed=3)
    c = calibration_samples(tokenizer, jsonl_source, 6, 25, seed=4)
    assert a.shape == (6, 25) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_sample_is_a_window_of_one_document(jsonl_source):
    tokenizer = CharTokenizer()
    with open(jsonl_source.location) as f:
        documents = list(f)
    texts = [json.loads(line)["text"] for line in documents]
    for sample in calibration_samples(tokenizer, jsonl_source, 5, 30, seed=0):
        window = "".join(chr(i) for i in sample.tolist())
        assert any(window in text for text in texts)


def test_running_text_and_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox " * 10)
    source = resolve_text_source(str(path), "calibration.source")
    samples = calibration_samples(CharTokenizer(), source, 4, 16, seed=0)
    assert samples.shape == (4, 16)
    assert len(evaluation_tokens(CharTokenizer(), source)) == 200
    with pytest.raises(DataSourceError, match="has only 200 tokens"):
        calibration_samples(CharTokenizer(), source, 4, 500, seed=0)
    with pytest.raises(DataSourceError, match="file not found"):
        resolve_text_source(str(tmp_path / "missing.txt"), "calibration.source")
    with pytest.raises(DataSourceError, match="neither c4, wikitext2"):
        resolve_text_source("c5", "calibration.source")


@pytest.mark.skipif(shared_dir("PRUNE_DATA_DIR") is None, reason="PRUNE_DATA_DIR not set")
def test_named_sources_read_the_local_files():
    c4 = resolve_text_source("c4", "calibration.source")
    wiki = resolve_text_source("wikitext2", "evaluation.perplexity.dataset")
    assert (c4.kind, wiki.kind) == ("jsonl", "txt")
    from prune.calibration import read_documents

    assert len(read_documents(c4)) == 1000
    assert read_documents(wiki)[0].startswith(" \n = Robert Boulter = \n")
