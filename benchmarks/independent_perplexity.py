"""Perplexity of a saved checkpoint, computed without this toolkit (it is made unimportable first).

    python benchmarks/independent_perplexity.py MODEL_DIR TEXT_FILE SEQLEN WINDOWS

Loads the checkpoint with plain transformers (``trust_remote_code=True``), tokenizes the whole text
once, and scores the first WINDOWS non-overlapping windows of SEQLEN tokens. Also checks that greedy
generation with and without the KV cache agree. Prints one JSON line.
"""

import json
import math
import sys

sys.modules["prune"] = None  # the toolkit must not be importable here
sys.modules["eval"] = None

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main(model_dir: str, text_path: str, seqlen: int, windows: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(text_path, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(windows):
            window = ids[k * seqlen : (k + 1) * seqlen][None]
            nll += F.cross_entropy(model(window).logits[0, :-1], window[0, 1:], reduction="sum").item()
            count += seqlen - 1
        prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    return {
        "perplexity": math.exp(nll / count),
        "seqlen": seqlen,
        "windows": windows,
        "class": type(model).__name__,
        "cache_agrees": bool(torch.equal(cached, uncached)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "continuation": tokenizer.decode(cached[0, prompt.shape[1] :]),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
