"""Tiny random-weight models of the supported families, built in code, and shared fixtures."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from eval.report import (
    AllocationReport,
    ExportReport,
    LayerReport,
    MethodReport,
    ModelReport,
    ParameterCounts,
    ParametersReport,
    Report,
    WidthsReport,
)
from eval.stages import EVALUATIONS
from prune.pruner import LayerPlan
from prune.recipe import Recipe, recipe_to_dict
from prune.statistics import Statistic

REPO = Path(__file__).resolve().parents[1]
ALL_STATISTICS = frozenset(Statistic)
BASIC_STATISTICS = ALL_STATISTICS - {Statistic.SECOND_MOMENTS, Statistic.SUMMED_GRADIENTS}
"""Everything but the two costly extras: gradient products, input sums and layer cosines."""


SLIDING_WINDOW_FAMILIES = ("gemma2", "gemma3_text")
MIXED_PLANS = [
    LayerPlan((0, 1, 2), (0,), tuple(range(0, 64, 2))),
    None,
    LayerPlan((0, 2, 3, 5), (0, 1), tuple(range(40))),
    LayerPlan(tuple(range(6)), (0, 1), tuple(range(64))),
]
"""Plans for a 4-layer tiny model (6 query heads, 2 KV heads, 64 FFN channels) whose layers end with different
widths: one KV group gone, a removed layer, query heads gone, FFN channels only."""
FAMILY_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
"""Every dense family the toolkit prunes (``prune.families.FAMILIES``), for tests parametrized over them."""
EXPERT_FAMILY_TYPES = ("mixtral", "qwen3_moe")
"""The mixture-of-experts families; their tiny configs have 4 experts of ``ffn`` channels, 2 per token."""


def tiny_config(
    family: str = "llama",
    layers: int = 3,
    hidden: int = 96,
    heads: int = 6,
    kv_heads: int = 2,
    ffn: int = 64,
    vocab: int = 128,
    tie: bool = True,
    rope: dict | None = None,
):
    """A small config of ``family`` (a model type of ``prune.families.FAMILIES``) with grouped-query attention and
    head_dim 16. Gemma's sliding-window layers get a window of 4 tokens and alternate with full-attention
    layers, so that the two kinds of layer see different attention masks in tests. ``rope``: the configuration's
    ``rope_parameters`` (e.g. Llama 3's scaling)."""
    extra: dict = {} if rope is None else {"rope_parameters": rope}
    if family == "phi3":  # its default token ids lie beyond a tiny vocabulary
        extra |= {"pad_token_id": vocab - 1, "eos_token_id": vocab - 1, "bos_token_id": 0}
    if family in EXPERT_FAMILY_TYPES:  # Qwen3-MoE renormalises the picked experts' weights, as Mixtral does
        extra |= {"num_experts_per_tok": 2, "moe_intermediate_size": ffn, "norm_topk_prob": True}
        extra |= {"num_local_experts" if family == "mixtral" else "num_experts": 4}
    if family in SLIDING_WINDOW_FAMILIES:
        extra |= {
            "sliding_window": 4,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        }
    return AutoConfig.for_model(
        family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        **extra,
    )


def tiny_model(family: str = "llama", seed: int = 0, **config_kwargs):
    """A float32 model in eval mode; weights drawn with std 0.2 so that pruning visibly changes logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # linears, and experts' [experts, out, in]
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def random_tokens(batch: int, length: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


class CharTokenizer:
    """Minimal tokenizer for data tests: one id per character (mod ``vocab``)."""

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text: str):
        class Encoding:
            input_ids = [ord(c) % self.vocab for c in text]

        return Encoding()


def benchmark_script(name: str):
    """The module of ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass of the script looks its module up there
    spec.loader.exec_module(module)
    return module


def shared_dir(name: str) -> Path | None:
    """$PRUNE_DATA_DIR / $PRUNE_MODELS_DIR style directories, if set and present."""
    value = os.environ.get(name)
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture
def fresh_output(tmp_path) -> Path:
    return tmp_path / "out"


def layer_row(index: int, dense: tuple[int, int, int], pruned: tuple[int, int, int] | None, **facts) -> LayerReport:
    """A report row: (query heads, KV groups, FFN channels) dense and pruned (None: the layer was removed)."""
    return LayerReport(
        index,
        WidthsReport(*dense),
        None if pruned is None else WidthsReport(*pruned),
        facts.pop("requested_sparsity", 0.3),
        **facts,
    )


def make_report(**sections) -> Report:
    """A report of a made-up run (3 layers, 100 -> 70 parameters); ``sections`` replace its fields, or are its
    evaluations when named like an evaluation stage (``perplexity=PerplexityReport(...)``)."""
    evaluations = {name: sections.pop(name) for name in EVALUATIONS if name in sections}
    fields = {
        "recipe": recipe_to_dict(Recipe()),
        "model": ModelReport("tiny", "directory", "/models/tiny", "llama", "tiny", "apache-2.0", None),
        "method": MethodReport(
            0.3, "activation-obs", "max_logit", "sum", "activation-density", "query_head", 8, "lstsq"
        ),
        "parameters": ParametersReport(ParameterCounts(100, 80), ParameterCounts(70, 50), 30, 30, 0.3),
        "layers": [layer_row(i, (6, 2, 64), (4, 2, 32)) for i in range(3)],
        "allocation": AllocationReport("activation-density", None),
        "statistics": None,
        "evaluations": {name: section for name, section in evaluations.items() if section is not None},
        "recovery": None,
        "exports": [ExportReport("hf", "model", 1000, remote_code=True)],
        "stage_seconds": {},
        "notes": [],
    }
    return Report(**(fields | sections))


WORDS = [
    "the",
    "cat",
    "dog",
    "runs",
    "over",
    "a",
    "small",
    "green",
    "field",
    "while",
    "birds",
    "sing",
    "in",
    "trees",
    "and",
    "rain",
    "falls",
    "on",
    "quiet",
    "roads",
]


def word_text(words: int, seed: int) -> str:
    """Seeded text of ``words`` words from a small lexicon, with a full stop now and then."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words))


def byte_level_tokenizer(
    vocab: int = 300, split_regex: str | None = None, ignore_merges: bool = False, extra_text: str = ""
):
    """A GPT-2 style byte-level BPE tokenizer trained in code on :func:`word_text` and ``extra_text`` (``vocab``
    ids, EOS last special).

    With ``split_regex``, the text is split by that regular expression before byte-level BPE (the pre-tokenizer of
    Llama 3 and Qwen2 tokenizers); ``ignore_merges`` takes a whole word in the vocabulary as one token (Llama 3)."""
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = _byte_level(models.BPE(ignore_merges=ignore_merges), split_regex)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([word_text(3000, seed=0), extra_text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def word_beyond_its_merges_tokenizer(split_regex: str, ignore_merges: bool):
    """A byte-level BPE tokenizer (the 256 byte symbols, then ``bc``, ``ab``, ``abc``, then EOS) whose merges join
    ``b c`` before ``a b``, so that they split the word ``abc`` into ``a``, ``bc`` although ``abc`` is in the
    vocabulary: with ``ignore_merges`` the word is one token, without it two."""
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in ("bc", "ab", "abc"):
        vocab[token] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("ab", "c")]
    tokenizer = _byte_level(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges), split_regex)
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _byte_level(model, split_regex: str | None):
    """A ``tokenizers.Tokenizer`` of ``model`` with byte-level pre-tokenizer and decoder, after a split by
    ``split_regex`` when given."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers

    tokenizer = Tokenizer(model)
    if split_regex is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_style_tokenizer(vocab: int = 400):
    """A Llama 2 tokenizer (transformers' ``LlamaTokenizer``: SentencePiece-style BPE with byte fallback, ``▁`` for
    spaces and before the text, ``<s>`` first) of pieces trained in code on :func:`word_text`, with a vocabulary and
    merges as transformers converts a SentencePiece model: ``<unk>``, ``<s>``, ``</s>``, the 256 ``<0xXX>`` byte
    tokens, the pieces; every split of a piece into two pieces a merge, ranked by the piece's id."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(
        [word_text(3000, seed=0)], trainers.BpeTrainer(vocab_size=vocab - 259, show_progress=False)
    )
    pieces = sorted(trained.get_vocab(), key=trained.get_vocab().get)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    ids = {piece: i for i, piece in enumerate(specials + pieces)}
    merges = [
        (piece[:cut], piece[cut:])
        for piece in pieces
        for cut in range(1, len(piece))
        if piece[:cut] in ids and piece[cut:] in ids
    ]
    return LlamaTokenizer(vocab=ids, merges=merges, add_bos_token=True)  # as Llama 2's tokenizer_config.json says


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny random-weight LLaMA checkpoint with a real tokenizer (``model``), and calibration and evaluation
    texts (``calibration``, ``evaluation``): what a run of the whole pipeline needs, in seconds."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), layers=3, ffn=64)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "calibration.txt").write_text(word_text(4000, seed=1))
    (root / "evaluation.txt").write_text(word_text(2000, seed=2))
    return {"model": root / "model", "calibration": root / "calibration.txt", "evaluation": root / "evaluation.txt"}


def tiny_recipe(files: dict[str, Path], output: Path, cache: Path) -> dict:
    """A recipe mapping that runs every stage on :func:`tiny_files` in seconds (zero-shot off)."""
    return {
        "output": str(output),
        "cache_dir": str(cache),
        "model": {"source": str(files["model"]), "dtype": "float32", "device": "cpu"},
        "calibration": {"source": str(files["calibration"]), "samples": 4, "seqlen": 32},
        "pruning": {"target": 0.2, "round_to": 8, "min_ffn_channels": 8},
        "evaluation": {
            "perplexity": {"dataset": str(files["evaluation"]), "seqlen": 64, "windows": 2},
            "zeroshot": {"enabled": False},
            "speed": {"prompt_tokens": 8, "new_tokens": 4, "warmup": 0, "repeats": 1},
            "engine": {"threads": 1, "prompt_tokens": 8, "new_tokens": 4, "warmup": 0, "repeats": 1},
        },
    }


RELOAD = """
import sys
sys.modules["prune"] = None  # the toolkit must not be importable here
import torch
from transformers import AutoModelForCausalLM
directory = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code={remote}, dtype=torch.float32)
x = torch.load(directory + "/x.pt")
torch.save({{"logits": model(x).logits, "generated": model.generate(x, max_new_tokens=8, do_sample=False),
            "class": type(model).__name__}}, directory + "/reloaded.pt")
"""


def reload_in_fresh_process(directory, remote: bool) -> dict:
    """Logits and 8 greedy tokens for ``directory/x.pt`` from the checkpoint in ``directory``, loaded in a fresh
    process where the toolkit cannot be imported, and the class it loaded as."""
    subprocess.run([sys.executable, "-c", RELOAD.format(remote=remote), str(directory)], check=True, cwd="/")
    return torch.load(directory / "reloaded.pt")


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m prune.run`` with ``args`` in a fresh process, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "prune.run", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def assert_refused(result, output: Path, *fragments: str) -> None:
    """A command that ended with exit code 2 and one ``error:`` line holding every fragment, leaving no output."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), lines[-1]
    assert "Traceback" not in result.stderr
    assert not output.exists() and not output.with_name(output.name + ".partial").exists()


def run_outputs(run: Path) -> tuple:
    """What must not depend on interruptions or on other runs: the weights' bytes, the widths and the measured
    perplexities of a run directory."""
    report = json.loads((run / "report.json").read_text())
    weights = hashlib.sha256((run / "model" / "model.safetensors").read_bytes()).hexdigest()
    return weights, report["layers"], report["perplexity"]["dense"], report["perplexity"]["pruned"]
