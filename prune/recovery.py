"""Recovery: train the pruned model back toward the dense one within a token budget, resumably.

Loss per batch (token-mean):  kl_weight * T^2 * KL(teacher_T || student_T)  +  nll_weight * NLL(text),
where ``X_T`` is the next-token distribution at temperature T and the teacher is the dense model
(kept as loaded: bfloat16 on CUDA by default, so no second float32 copy). ``method``:

- ``distill``: train the pruned model's own weights (all of them, or only the decoder layers);
- ``lora``: train LoRA adapters (``peft``) on every linear of the decoder layers, merged into the
  weights at the end, so that the checkpoint is a plain pruned model that loads without ``peft``.

Training data are the source's documents, each followed by the end-of-text token, joined and cut
into windows of ``seqlen`` tokens; step ``s`` takes positions ``s*B .. s*B+B-1`` of an endless
sequence of seeded permutations of the windows (one per epoch), so the data position is the step.

Every ``save_every`` steps the state (trainable weights, optimizer, scheduler, step, RNG states) is
written atomically to ``state_dir/state.pt``, then its checksum and the log to ``state_dir/state.json``;
the same call with the same arguments then continues from the last save and ends with the same weights
as an uninterrupted run. Device placement and mixed precision (bfloat16 autocast on CUDA, float32 on
CPU) go through ``accelerate``.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from prune.blocks import decoder_layers
from prune.calibration import DataSourceError, TextSource, read_documents
from prune.paths import DamagedCacheError, atomic_path, atomic_write_text, file_sha256, recomputing

if TYPE_CHECKING:
    from prune.recipe import RecoverySection

STATE_VERSION = 1
"""Format version of the resumable state; a state of another version is not used."""

SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
"""Recipe ``schedule`` -> ``transformers.get_scheduler`` name (all with linear warm-up)."""


@dataclass
class RecoveryOutcome:
    """What the stage did (the run's report gets it, the per-step log aside)."""

    steps: int
    tokens_seen: int
    training_windows: int
    epochs: float
    """Passes over the training windows (tokens_seen / training tokens)."""
    seconds: float
    """Wall time of the training loop in this process (after a resume: since the resume)."""
    tokens_per_second: float
    """Training tokens per second of this process's steps (held-out evaluations excluded)."""
    resumed_from_step: int
    curve: list[dict]
    """``{"step", "tokens", "perplexity"}`` on the held-out slice, from step 0 to the last step."""
    log: list[dict]
    """One entry per step (loss and its parts, learning rate, tokens/s) and per held-out evaluation."""
    device: str


def training_windows(tokenizer: PreTrainedTokenizerBase, source: TextSource, seqlen: int) -> torch.Tensor:
    """The source's documents, each ended by the end-of-text token, joined and cut: LongTensor [n, seqlen]."""
    return document_windows(tokenizer, read_documents(source), seqlen, source.name)


def document_windows(tokenizer: PreTrainedTokenizerBase, documents: list[str], seqlen: int, name: str) -> torch.Tensor:
    """``documents``, each ended by the end-of-text token, joined and cut: LongTensor [n, seqlen]; ``name`` (their
    source) is named in the error when they hold less than one window."""
    ids: list[int] = []
    for text in documents:
        ids += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    count = len(ids) // seqlen
    if count == 0:
        raise DataSourceError(f"recovery.source: {name} has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: count * seqlen], dtype=torch.long).view(count, seqlen)


def batch_indices(step: int, batch_size: int, n_windows: int, seed: int) -> list[int]:
    """Window indices of batch ``step``: positions step*B .. step*B+B-1 of the per-epoch seeded permutations."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_windows)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(n_windows, generator=generator)[offset]))
    return indices


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the next-token distributions at temperature T, in nats, mean over positions.

    ``*_logits``: [..., vocab]; computed in float32.
    """
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def text_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL (nats) of ``ids`` [B, L] under ``logits`` [B, L, vocab]."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def training_loss(
    student: PreTrainedModel, teacher: PreTrainedModel, ids: torch.Tensor, settings: RecoverySection
) -> tuple[torch.Tensor, dict]:
    """The recovery loss of one batch ``ids`` [B, L] and its parts (floats, for the log)."""
    logits = student(input_ids=ids, use_cache=False).logits
    loss = torch.zeros((), device=logits.device)
    parts = {}
    if settings.kl_weight > 0:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids.to(next(teacher.parameters()).device), use_cache=False).logits
        kl = distillation_loss(logits, teacher_logits.to(logits.device), settings.temperature)
        loss = loss + settings.kl_weight * kl
        parts["kl"] = float(kl.detach())
    if settings.nll_weight > 0:
        nll = text_nll(logits, ids)
        loss = loss + settings.nll_weight * nll
        parts["nll"] = float(nll.detach())
    return loss, parts


def add_lora_adapters(model: PreTrainedModel, settings: RecoverySection):
    """``model`` wrapped by peft with LoRA adapters (rank ``lora_rank``, no dropout) on every decoder linear (by
    its name in the layer: ``q_proj`` ... ``down_proj``, or a family's fused ``qkv_proj`` / ``gate_up_proj``)."""
    from peft import LoraConfig, get_peft_model

    linears = sorted(
        {path.rpartition(".")[2] for path, m in decoder_layers(model).named_modules() if isinstance(m, nn.Linear)}
    )
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=linears,
        bias="none",
    )
    return get_peft_model(model, config)


def unshare_parameters(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Give ``student`` its own copy of every parameter whose storage it shares with ``teacher``.

    ``prune_model`` shares the embeddings and norms with the dense model; training them in place would
    move the teacher (and every later dense evaluation) along with the student. Tied weights stay tied.
    """
    shared = {p.data_ptr() for p in teacher.parameters()}
    with torch.no_grad():
        for parameter in student.parameters():
            if parameter.data_ptr() in shared:
                parameter.data = parameter.data.clone()


def select_trainable(model: PreTrainedModel, settings: RecoverySection) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` per the recipe and return the trainable parameters in a fixed order."""
    if settings.method == "lora":
        return [p for p in model.parameters() if p.requires_grad]  # peft froze everything but the adapters
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(settings.train == "all" or ".layers." in f".{name}")
    return [p for p in model.parameters() if p.requires_grad]


def _trainable_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_state(
    state_dir: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    log_lines: list[str],
) -> None:
    """Write the resumable state (``state.pt``), then its description (``state.json``: format version, step, the
    state file's checksum and the log so far), each atomically. A state without a matching description is
    never used."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    with atomic_path(state_dir / "state.pt") as temporary:
        torch.save(state, temporary)
        checksum = file_sha256(temporary)
    description = {"version": STATE_VERSION, "step": step, "sha256": checksum, "log": log_lines}
    atomic_write_text(state_dir / "state.json", json.dumps(description))


def load_state(
    state_dir: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, list[str]]:
    """Restore the last saved state into ``model`` / ``optimizer`` / ``scheduler``; returns (step, log lines).

    A state that fails its check (damaged, half-written, another format version) is reported in one line and
    set aside: training starts again from step 0, and ends with the weights an uninterrupted run ends with.
    """
    path = state_dir / "state.pt"
    if not path.is_file():
        return 0, []
    try:
        description = json.loads((state_dir / "state.json").read_text())
        if description["version"] != STATE_VERSION or description["sha256"] != file_sha256(path):
            raise DamagedCacheError("the state does not match its description (damaged or half-written)")
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as error:
        recomputing(path, error)
        return 0, []
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            parameters[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], list(description["log"])


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, settings: RecoverySection, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``transformers``' schedule ``settings.schedule`` over ``steps`` + 1 steps with ``warmup_steps`` of linear
    warm-up, without its first step: step s trains at the schedule's step s + 1, so that no step (the first
    warm-up step, the last cosine / linear step) trains with a learning rate of 0."""
    name = SCHEDULER_NAMES[settings.schedule]
    warmup = min(settings.warmup_steps, steps)
    schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps + 1).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step + 1))


def recover(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    windows: torch.Tensor,
    heldout_perplexity: Callable[[torch.nn.Module], float],
    settings: RecoverySection,
    state_dir: Path,
    progress: bool = True,
):
    """Train ``student`` as ``settings`` say; returns (the trained model, RecoveryOutcome).

    ``windows``: LongTensor [n, seqlen] of training text; ``heldout_perplexity(model)`` is the held-out
    perplexity of the model, logged every ``eval_every`` steps and at both ends.
    ``state_dir`` holds the resumable state; it is left in place (the caller removes it when done).
    The returned model is ``student`` itself for ``distill`` and the merged base model for ``lora``,
    in the dtype ``student`` came in.

    Under a launcher with several processes (``prune/processes.py``) training is data-parallel: each process
    takes every N-th window of each batch (the batch size must be a multiple of N) and the gradients are
    averaged across them; only the main process evaluates, logs the held-out perplexity and saves the state.
    """
    dtype = next(student.parameters()).dtype
    device = next(student.parameters()).device
    accelerator = Accelerator(  # the scheduler steps once per batch, however many processes share the batch
        cpu=device.type == "cpu",
        mixed_precision="bf16" if device.type == "cuda" else "no",
        step_scheduler_with_optimizer=False,
    )
    unshare_parameters(student, teacher)
    student = student.float()  # float32 master weights; CUDA computes under bfloat16 autocast
    torch.manual_seed(settings.seed)  # LoRA's initial adapters are drawn from it
    if settings.method == "lora":
        student = add_lora_adapters(student, settings)
    trainable = select_trainable(student, settings)
    steps = math.ceil(settings.tokens / (settings.batch_size * settings.seqlen))
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = learning_rate_schedule(optimizer, settings, steps)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    start_step, log_lines = load_state(state_dir, accelerator.unwrap_model(student), optimizer, scheduler)
    main, share = accelerator.is_main_process, slice(accelerator.process_index, None, accelerator.num_processes)
    if start_step and main:
        print(f"recovery: resuming from step {start_step} of {steps} ({state_dir})", flush=True)

    def log(entry: dict) -> None:
        log_lines.append(json.dumps(entry) + "\n")

    evaluating_seconds = 0.0

    def heldout(step: int) -> None:
        nonlocal evaluating_seconds
        evaluation_started = time.perf_counter()
        student.eval()
        value = heldout_perplexity(accelerator.unwrap_model(student))
        student.train()
        log(
            {
                "step": step,
                "tokens": step * settings.batch_size * settings.seqlen,
                "heldout_perplexity": value,
            }
        )
        evaluating_seconds += time.perf_counter() - evaluation_started

    started = time.perf_counter()
    if start_step == 0 and main:
        heldout(0)
    student.train()
    bar = tqdm(total=steps, initial=start_step, desc=f"recovery ({settings.method})", unit="step", disable=not progress)
    with bar:  # closed before an error or a signal is reported
        for step in range(start_step, steps):
            batch = windows[batch_indices(step, settings.batch_size, len(windows), settings.seed)]
            loss, parts = training_loss(student, teacher, batch[share].to(accelerator.device), settings)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            logged = accelerator.reduce(
                torch.tensor([float(loss.detach()), *parts.values()], device=accelerator.device), "mean"
            ).tolist()
            elapsed = time.perf_counter() - started - evaluating_seconds
            tokens_per_second = (done - start_step) * settings.batch_size * settings.seqlen / elapsed
            log(
                {
                    "step": done,
                    "tokens": done * settings.batch_size * settings.seqlen,
                    "loss": logged[0],
                    **dict(zip(parts, logged[1:], strict=True)),
                    "learning_rate": learning_rate,
                    "tokens_per_second": tokens_per_second,
                }
            )
            bar.set_postfix(loss=f"{logged[0]:.4f}", tok_s=f"{tokens_per_second:,.0f}")
            bar.update()
            if main and (done % settings.eval_every == 0 or done == steps):
                heldout(done)
            if main and (done % settings.save_every == 0 or done == steps):
                save_state(state_dir, accelerator.unwrap_model(student), optimizer, scheduler, done, log_lines)
    seconds = time.perf_counter() - started
    training_seconds = seconds - evaluating_seconds
    student = accelerator.unwrap_model(student)
    if settings.method == "lora":
        student = student.merge_and_unload()
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    student = student.to(dtype).eval()
    entries = [json.loads(line) for line in log_lines]
    curve = [
        {"step": e["step"], "tokens": e["tokens"], "perplexity": e["heldout_perplexity"]}
        for e in entries
        if "heldout_perplexity" in e
    ]
    tokens_seen = steps * settings.batch_size * settings.seqlen
    trained_here = (steps - start_step) * settings.batch_size * settings.seqlen
    outcome = RecoveryOutcome(
        steps,
        tokens_seen,
        len(windows),
        tokens_seen / windows.numel(),
        seconds,
        trained_here / training_seconds if training_seconds else 0.0,
        start_step,
        curve,
        entries,
        str(accelerator.device),
    )
    return student, outcome
