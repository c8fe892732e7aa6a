"""Zero-shot accuracy of a saved checkpoint on a local task file, computed without this toolkit or lm-eval.

    python benchmarks/independent_zeroshot.py MODEL_DIR TASK_FILE [LIMIT]

TASK_FILE: ``{"query", "choices", "gold"}`` per line (the data directory's ``zeroshot/*.jsonl``).
Each choice is the continuation of the query, joined by a space unless it starts with punctuation;
whitespace at the end of the query moves to the start of the continuation. The query is tokenized
alone and run once; every continuation is the tokens that tokenizing query + continuation adds after
the query's, scored in one batch on the query's KV cache. ``acc``: the choice of highest
log-likelihood is the gold one; ``acc_norm``: the same with the log-likelihood divided by the
continuation's length in characters. Prints one JSON line.
"""

import json
import string
import sys

sys.modules["prune"] = None  # the toolkit must not be importable here
sys.modules["eval"] = None
sys.modules["lm_eval"] = None

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def continuation_log_likelihoods(model, tokenizer, query: str, continuations: list[str]) -> list[float]:
    stripped = query.rstrip()
    trailing = query[len(stripped) :]
    continuations = [trailing + c for c in continuations]
    context = tokenizer(stripped).input_ids
    tails = [tokenizer(stripped + c).input_ids[len(context) :] for c in continuations]
    with torch.no_grad():
        out = model(torch.tensor([context]), use_cache=True)
        cache = out.past_key_values
        first = torch.log_softmax(out.logits[0, -1].double(), -1)  # predicts each tail's first token
        width = max(len(t) for t in tails)
        batch = torch.tensor([t + [0] * (width - len(t)) for t in tails])
        cache.batch_repeat_interleave(len(tails))
        mask = torch.tensor([[1] * len(context) + [1] * len(t) + [0] * (width - len(t)) for t in tails])
        logits = model(batch, past_key_values=cache, attention_mask=mask, use_cache=True).logits.double()
        log_probs = torch.log_softmax(logits, -1)
    totals = []
    for i, tail in enumerate(tails):
        total = float(first[tail[0]])
        total += sum(float(log_probs[i, k - 1, tail[k]]) for k in range(1, len(tail)))
        totals.append(total)
    return totals


def main(model_dir: str, task_file: str, limit: int | None) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(task_file, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f][:limit]
    correct = correct_norm = 0
    for doc in docs:
        continuations = [c if c[:1] in string.punctuation else " " + c for c in doc["choices"]]
        lls = continuation_log_likelihoods(model, tokenizer, doc["query"], continuations)
        norm = [ll / len(c) for ll, c in zip(lls, continuations, strict=True)]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == doc["gold"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == doc["gold"])
    return {
        "task_file": task_file,
        "items": len(docs),
        "acc": correct / len(docs),
        "acc_norm": correct_norm / len(docs),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)))
