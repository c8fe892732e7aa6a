"""benchmarks/recovery_sweep.py: no recovery setting is measured on text it trained on."""

from conftest import benchmark_script, byte_level_tokenizer, word_text


def test_training_documents_leave_out_every_document_that_begins_in_the_evaluated_windows(tmp_path):
    tokenizer = byte_level_tokenizer()
    documents = [word_text(40, seed=i) for i in range(12)]
    heldin = tmp_path / "heldin.txt"
    heldin.write_text("\n\n".join(documents[4:]))  # the first 4 documents are calibration's
    tokens, training = benchmark_script("recovery_sweep").heldin_split(
        heldin, documents, tokenizer, seqlen=32, windows=5
    )
    assert tokens.shape == (160,)
    evaluated = tokenizer.decode(tokens)
    inside = [d for d in documents[4:] if heldin.read_text().find(d) < len(evaluated)]
    assert 2 <= len(inside) < 8  # the windows end inside a document, which is left out although it runs on
    assert not evaluated.endswith(inside[-1]) and inside[-1] not in training
    assert training == documents[:4] + [d for d in documents[4:] if d not in inside]
