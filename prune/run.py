"""Command line: ``python -m prune.run RECIPE.yaml [--set key=value ...] [--dry-run] [--overwrite]``.

Thin orchestrator over the stages: recipe -> (prepare) -> model -> activation statistics -> scores ->
allocation -> pruned model -> reconstruction -> recovery -> exports -> evaluation -> report.
Everything is validated before anything is written; the run writes into ``<output>.partial`` and
renames it to ``<output>`` only when every stage has succeeded. The pruned model is kept at a resume point
(``prune/resume.py``) before the exports and evaluations, so that a rerun after one of them failed starts there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from contextlib import nullcontext
from functools import partial as partial_call
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from eval.model_card import model_card
from eval.perplexity import perplexity, window_count
from eval.report import (
    AllocationReport,
    CurvePoint,
    ExportReport,
    LayerReport,
    MethodReport,
    ModelReport,
    ParameterCounts,
    ParametersReport,
    RecoveryReport,
    Report,
    SearchReport,
    StatisticsReport,
    WidthsReport,
    write_report,
)
from eval.stages import EVALUATIONS, dense_first
from eval.stages.base import DenseInputs, EvaluationInputs, EvaluationStage
from prune.allocation import ALLOCATIONS, Allocation, allocate, ffn_multiple, over_rounds
from prune.blocks import BlockShape, block_shape, count_parameters
from prune.calibration import DataSourceError, calibration_samples, evaluation_tokens
from prune.cli import ArgumentParser, add_recipe_arguments, printed_schema, run_command, timed
from prune.estimate import slow_dtype_note
from prune.evaluation import run_context
from prune.export import EXPORTERS, ExportInputs
from prune.memory import current_bytes, make_resident, peak_bytes, release_weights, reset_peak
from prune.models import ModelSource, ModelSourceError, base_model_facts, check_finite, load_model, resolve_device
from prune.outputs import cache_lock, output_lock, remove_stale_scratch, scratch_directory, staged_directory
from prune.paths import (
    DamagedCacheError,
    atomic_directory,
    atomic_write_text,
    link_or_copy,
    recomputing,
)
from prune.placement import input_device
from prune.prepare import (
    USER_ERRORS,
    Prepared,
    added_bias_parameters,
    check_memory_plan,
    check_processes,
    dry_run_text,
    for_device,
    inverted_input_width,
    needs_dense_after_pruning,
    prepare,
    protected_layers,
    reads_samples,
    second_moment_inverters,
    statistics_needs,
    statistics_path,
)
from prune.processes import ALONE, Processes, launched_count, launched_processes
from prune.pruner import LayerPlan, LayerRefit, compose_plans, prune_model
from prune.recipe import Recipe, load_recipe, recipe_schema, recipe_to_dict
from prune.reconstruct import RECONSTRUCTIONS, reconstructed_layer
from prune.recovery import recover, training_windows
from prune.resume import (
    OUTPUT_FILES,
    PrunedState,
    kept_evaluation,
    kept_on_failure,
    read_resume_point,
    resume_directory,
    save_resume_point,
)
from prune.scoring import score_units
from prune.sequential import sequential_refit
from prune.statistics import (
    BACKWARD,
    SUMMARY_FILE,
    ActivationStatistics,
    Statistic,
    check_statistics,
    collect_statistics,
)


def recipe_calibration(prepared: Prepared, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The recipe's calibration samples: token ids [samples, seqlen]."""
    c = prepared.recipe.calibration
    return calibration_samples(tokenizer, prepared.calibration_source, c.samples, c.seqlen, c.seed)


def obtain_statistics(
    prepared: Prepared, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, processes: Processes = ALONE
) -> tuple[ActivationStatistics, StatisticsReport]:
    """The statistics the recipe needs: from the cache, else computed (only what the cache lacks) and cached.

    Returns them and their provenance; the peak memory is that of the pass run here (none when reused).
    With several ``processes`` each computes its share and the main one writes the cache. Another run computing
    the same statistics is waited for (:func:`prune.outputs.cache_lock`), and its result taken.
    """
    path = statistics_path(prepared, next(model.parameters()).dtype)
    with cache_lock(path) if processes.main else nullcontext():
        cached = None
        if processes.main and (path / SUMMARY_FILE).is_file():
            try:
                cached = ActivationStatistics.load(path)
            except DamagedCacheError as error:
                recomputing(path, error)
                shutil.rmtree(path, ignore_errors=True)
        missing = processes.from_main(prepared.needs - (cached.provides if cached else frozenset()))
        if not processes.main and missing != prepared.needs:
            cached = ActivationStatistics.load(path)  # whole: the main process checked it
        return _statistics_for(prepared, model, tokenizer, processes, path, cached, missing)


def _statistics_for(
    prepared: Prepared,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    processes: Processes,
    path: Path,
    cached: ActivationStatistics | None,
    missing: frozenset[Statistic],
) -> tuple[ActivationStatistics, StatisticsReport]:
    """:func:`obtain_statistics` once the cache at ``path`` was read: ``cached`` and the ``missing`` kinds computed."""
    recipe = prepared.recipe
    info = StatisticsReport(
        source=recipe.calibration.source,
        samples=recipe.calibration.samples,
        seqlen=recipe.calibration.seqlen,
        seed=recipe.calibration.seed,
        objective=recipe.scoring.objective,
        collected=[],
        cache_path=str(path),
        reused=not missing,
    )
    if cached is not None and not missing:
        info.collected = sorted(need.value for need in cached.provides)
        return cached, info
    samples = recipe_calibration(prepared, tokenizer)
    device = input_device(model)
    make_resident(model)
    reset_peak(device)
    before = current_bytes(device)
    path.mkdir(parents=True, exist_ok=True)
    with scratch_directory(prepared.cache / "scratch") as scratch:
        statistics = collect_statistics(
            model, samples, recipe.scoring.objective, missing, store=path, scratch=scratch, processes=processes
        )
    peak = peak_bytes(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    info.peak_memory_bytes = peak
    info.pass_added_bytes = peak - before
    info.model_weight_bytes = weights
    info.peak_over_weights = (weights + peak - before) / weights
    if cached is not None:
        statistics = cached.merged(statistics)
    if processes.main:
        statistics.save(path)
    processes.wait()  # the second moments are read from the cache directory
    info.collected = sorted(need.value for need in statistics.provides)
    return statistics, info


def check_tokenizer(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """ModelSourceError when the tokenizer lacks a token a stage of the recipe needs."""
    if tokenizer.eos_token_id is None and recipe.recovery.method != "none":
        raise ModelSourceError(
            "model.source: its tokenizer has no end-of-text token, which recovery needs between documents"
        )
    if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None and recipe.evaluation.zeroshot.enabled:
        raise ModelSourceError(
            "model.source: its tokenizer has neither a padding nor an end-of-text token, which lm-eval pads "
            "batches with; set evaluation.zeroshot.enabled: false"
        )


def perplexity_text(prepared: Prepared, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The perplexity text tokenized once [n_tokens]; DataSourceError when it holds no whole window."""
    text = evaluation_tokens(tokenizer, prepared.evaluation_source)
    seqlen = prepared.recipe.evaluation.perplexity.seqlen
    if window_count(len(text), seqlen, None) == 0:
        raise DataSourceError(
            f"evaluation.perplexity.dataset: {prepared.evaluation_source.name} has {len(text):,} tokens, "
            f"fewer than one window of {seqlen}"
        )
    return text


def layer_table(shape: BlockShape, allocation: Allocation) -> list[LayerReport]:
    """Per dense layer: dense and pruned widths (``pruned`` None for a removed layer) and allocation facts."""
    rows = []
    for i, (dense, plan) in enumerate(zip(shape.layers, allocation.plans, strict=True)):
        pruned = None
        if plan is not None:
            widths = plan.widths
            pruned = WidthsReport(widths.query_heads, widths.kv_heads, widths.ffn_channels, widths.experts)
        rows.append(
            LayerReport(
                index=i,
                dense=WidthsReport(dense.query_heads, dense.kv_heads, dense.ffn_channels, dense.experts),
                pruned=pruned,
                requested_sparsity=allocation.layer_sparsity[i],
                activated_weights=allocation.activated_weights[i] if allocation.activated_weights else None,
                block_influence=allocation.block_influence[i] if allocation.block_influence else None,
            )
        )
    return rows


def recipe_refit(
    recipe: Recipe,
    model: PreTrainedModel,
    shape: BlockShape,
    statistics: ActivationStatistics | None,
    samples: torch.Tensor | None,
    scratch: Path | None = None,
) -> LayerRefit | None:
    """The layer refit for :func:`prune.pruner.prune_model` that ``pruning.reconstruct`` names (None: no refit).

    A sequential reconstruction runs ``samples`` (calibration token ids [N, T]) through the model as it is pruned,
    keeping what it carries within a layer in files in ``scratch`` (None: in memory); the others read
    ``statistics``.
    """
    method = recipe.pruning.reconstruct
    reconstruction = RECONSTRUCTIONS[method]
    if reconstruction.sequential:
        if samples is None:
            raise ValueError(f"pruning.reconstruct {method} needs the calibration samples")
        return sequential_refit(model, list(samples), shape.head_dim, recipe.pruning.damping, scratch=scratch)
    if reconstruction.refit is None:
        return None
    assert statistics is not None  # the reconstruction's needs were collected

    def refit(index: int, layer: nn.Module, plan: LayerPlan) -> dict[str, torch.Tensor]:
        return reconstructed_layer(index, layer, plan, shape.head_dim, statistics, method, recipe.pruning.damping)

    return refit


def stage_settings(stage: EvaluationStage, recipe: Recipe) -> dict[str, dict]:
    """What an evaluation stage's result depends on in ``recipe``, by which a resumed run keeps an earlier
    attempt's result: its settings, those of the evaluations it is keyed by, and the export settings."""
    mapping = recipe_to_dict(recipe)
    evaluation = mapping["evaluation"]
    return {
        "evaluation": evaluation[stage.name],
        **{name: evaluation[name] for name in stage.keyed_by},
        "export": mapping["export"],
    }


def prune_as_recipe_says(
    recipe: Recipe,
    model: PreTrainedModel,
    params_to_remove: int,
    statistics: ActivationStatistics | None,
    stage_seconds: dict[str, float],
    in_place: bool = False,
    samples: torch.Tensor | None = None,
    processes: Processes = ALONE,
    scratch: Path | None = None,
) -> tuple[PreTrainedModel, Allocation]:
    """Scoring, allocation, physical pruning and reconstruction of ``params_to_remove`` parameters (the target)
    as ``recipe`` says, in ``pruning.rounds`` rounds: round r removes up to r / rounds of them from the model the
    rounds before left, scoring it by statistics collected on it (round 1: ``statistics``, of ``model``). ``model``
    is left untouched, unless ``in_place``: its layers are then released one by one as they are pruned
    (``prune_model``) and it is unusable after. ``samples``: the calibration token ids [N, T] a sequential
    reconstruction, a searched allocation or a later round's statistics run. Adds each stage's wall time to
    ``stage_seconds`` (a later round's as "<stage> (round r)"). With several ``processes`` every one prunes as
    the main one allocates (a search on a GPU need not end alike everywhere). ``scratch``: a directory for a later
    round's second moments and layer boundaries and a sequential reconstruction's files (None: in memory). Returns
    the pruned model and the allocation over ``model``'s layers and units.
    """
    recipe = for_device(recipe, next(model.parameters()).device)
    rounds, shape = recipe.pruning.rounds, block_shape(model.config)
    total = count_parameters(model)["total"]
    pruned, plans, first = model, None, None
    needs = statistics_needs(recipe)
    for round_ in range(1, rounds + 1):
        suffix = "" if round_ == 1 else f" (round {round_})"
        with scratch_directory(scratch if processes.main else None) as main_directory:
            directory = processes.from_main(main_directory)  # the main process writes the second moments there
            if round_ > 1 and needs:
                assert samples is not None
                boundaries = None if directory is None else directory / f"process-{processes.index}"
                if boundaries is not None:
                    boundaries.mkdir()
                with timed(stage_seconds, f"activation statistics{suffix}"):
                    statistics = collect_statistics(
                        pruned,
                        samples,
                        recipe.scoring.objective,
                        needs,
                        store=None if directory is None else directory / "statistics",
                        scratch=boundaries,
                        processes=processes,
                    )
                processes.wait()
            goal = round(params_to_remove * round_ / rounds) - (total - count_parameters(pruned)["total"])
            in_place_now = in_place or round_ > 1  # a round's input model is needed after it only in round 1
            refit_scratch = None if directory is None else directory / f"refit-{processes.index}"
            pruned, allocation = _prune_once(
                recipe, pruned, goal, statistics, stage_seconds, suffix, in_place_now, samples, processes, refit_scratch
            )
            processes.wait()  # before the main process removes the directory
        plans = allocation.plans if plans is None else compose_plans(shape, plans, allocation.plans)
        first = first or allocation
    assert first is not None and plans is not None
    if rounds == 1:
        return pruned, first
    return pruned, over_rounds(shape, first, plans, recipe.pruning.attention_unit, rounds)


def _prune_once(
    recipe: Recipe,
    model: PreTrainedModel,
    params_to_remove: int,
    statistics: ActivationStatistics | None,
    stage_seconds: dict[str, float],
    suffix: str,
    in_place: bool,
    samples: torch.Tensor | None,
    processes: Processes,
    scratch: Path | None,
) -> tuple[PreTrainedModel, Allocation]:
    """One round of :func:`prune_as_recipe_says`. The biases a reconstruction adds count towards the removal
    only where the model does not have them yet (a later round's model does). ``scratch``: a directory, not yet
    made, for a sequential reconstruction's files (None: in memory)."""
    shape = block_shape(model.config)
    has_biases = bool(getattr(model.config, "output_projection_bias", False))
    nothing = params_to_remove <= 0  # nothing to remove: no unit goes, no bias comes, no layer is refit
    budget = params_to_remove + (0 if has_biases or nothing else added_bias_parameters(recipe, shape))
    scores = None
    if ALLOCATIONS[recipe.allocation.strategy].uses_scores:
        with timed(stage_seconds, f"scoring{suffix}"):
            scores = score_units(
                model, shape, recipe.scoring.method, recipe.scoring.aggregate, statistics, recipe.pruning.damping
            )
    with timed(stage_seconds, f"allocation{suffix}"):
        allocation = allocate(
            shape,
            scores,
            budget,
            recipe.allocation,
            recipe.pruning,
            statistics,
            protected_layers(recipe, shape),
            model,
            samples,
        )
        allocation = processes.from_main(allocation)
    method = recipe.pruning.reconstruct
    refit = None if nothing else recipe_refit(recipe, model, shape, statistics, samples, scratch)
    stage = "pruning" if refit is None else f"pruning + reconstruction ({method})"
    with timed(stage_seconds, f"{stage}{suffix}"):
        pruned = prune_model(model, allocation.plans, output_bias=refit is not None, refit=refit, in_place=in_place)
    return pruned, allocation


def recovery_state_dir(prepared: Prepared) -> Path:
    """Cache directory of the resumable recovery state, keyed by everything that determines its result."""
    assert prepared.recovery_source is not None
    recipe = recipe_to_dict(prepared.recipe)
    for key in ("output", "cache_dir", "export"):
        recipe.pop(key)
    recipe["evaluation"] = {"perplexity": recipe["evaluation"]["perplexity"]}
    key = json.dumps(
        {
            "recipe": recipe,
            "model": prepared.model_source.fingerprint(),
            "calibration": prepared.calibration_source.fingerprint(),
            "recovery": prepared.recovery_source.fingerprint(),
            "evaluation": prepared.evaluation_source.fingerprint(),
        },
        sort_keys=True,
    )
    return prepared.cache / "recovery" / hashlib.sha256(key.encode()).hexdigest()[:16]


def recover_as_recipe_says(
    prepared: Prepared,
    dense: PreTrainedModel,
    pruned: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    evaluation_text: torch.Tensor,
    run_directory: Path | None,
    notes: list[str],
) -> tuple[PreTrainedModel, RecoveryReport]:
    """The recovery stage: trains ``pruned`` toward ``dense``; writes ``recovery_log.jsonl`` into ``run_directory``
    (None: a process other than the main one, which writes nothing).

    Returns the recovered model and the report's ``recovery`` section. The held-out slice of the curve is
    the last ``heldout_windows`` windows of the perplexity text ``evaluation_text`` [n_tokens].
    """
    assert prepared.recovery_source is not None
    settings, ppl = prepared.recipe.recovery, prepared.recipe.evaluation.perplexity
    windows = training_windows(tokenizer, prepared.recovery_source, settings.seqlen)
    heldout_tokens = settings.heldout_windows * ppl.seqlen
    evaluated_tokens = window_count(len(evaluation_text), ppl.seqlen, ppl.windows) * ppl.seqlen
    if evaluated_tokens + heldout_tokens > len(evaluation_text):
        notes.append("The recovery curve's held-out slice overlaps the windows the perplexity is measured on.")
    heldout = evaluation_text[-heldout_tokens:]
    state_dir = recovery_state_dir(prepared)
    recovered, outcome = recover(
        pruned,
        dense,
        windows,
        lambda model: perplexity(model, heldout, ppl.seqlen, None, progress=False)["perplexity"],
        settings,
        state_dir,
    )
    if run_directory is not None:
        atomic_write_text(run_directory / "recovery_log.jsonl", "".join(json.dumps(e) + "\n" for e in outcome.log))
    terms = []
    if settings.kl_weight:
        terms.append(f"{settings.kl_weight} x T^2 KL(dense || pruned) at T = {settings.temperature}")
    if settings.nll_weight:
        terms.append(f"{settings.nll_weight} x NLL of the text")
    trained = {"decoder_layers": "weights: decoder_layers", "all": "weights: all"}[settings.train]
    section = RecoveryReport(
        method=settings.method,
        source=settings.source,
        trained="LoRA adapters (merged into the weights)" if settings.method == "lora" else trained,
        loss=" + ".join(terms),
        optimizer=(
            f"AdamW, learning rate {settings.learning_rate}, {settings.schedule} schedule, "
            f"{settings.warmup_steps} warm-up steps"
        ),
        heldout=f"last {settings.heldout_windows} window(s) of {ppl.seqlen} tokens of {ppl.dataset}",
        steps=outcome.steps,
        batch_size=settings.batch_size,
        seqlen=settings.seqlen,
        tokens_seen=outcome.tokens_seen,
        training_windows=outcome.training_windows,
        epochs=outcome.epochs,
        seconds=outcome.seconds,
        tokens_per_second=outcome.tokens_per_second,
        resumed_from_step=outcome.resumed_from_step,
        curve=[CurvePoint(p["step"], p["tokens"], p["perplexity"]) for p in outcome.curve],
        device=outcome.device,
        log="recovery_log.jsonl",
        state_dir=str(state_dir),
    )
    return recovered, section


def allocation_report(recipe: Recipe, allocation: Allocation) -> AllocationReport:
    """The report's ``allocation`` section: the strategy, its activation threshold and, when it searched, the
    search's cost and result."""
    outcome, settings = allocation.search, recipe.allocation
    search = None
    if outcome is not None:
        search = SearchReport(
            settings.search_generations,
            settings.search_offspring,
            settings.search_samples,
            outcome.evaluations,
            outcome.seconds,
            outcome.start_kl,
            outcome.best_kl,
        )
    return AllocationReport(settings.strategy, allocation.threshold, search, allocation.rounds)


def model_report(prepared: Prepared) -> ModelReport:
    """Where the dense model came from and what its source says about it."""
    source = prepared.model_source
    facts = base_model_facts(prepared.recipe.model.source, source)
    return ModelReport(
        prepared.recipe.model.source,
        source.kind,
        source.location,
        prepared.shape.model_type,
        facts.base_model,
        facts.license,
        facts.author,
    )


def method_report(prepared: Prepared, statistics: ActivationStatistics | None) -> MethodReport:
    """What the run did, by registry names (no scorer when the allocation scores no units)."""
    recipe = prepared.recipe
    uses_scores = ALLOCATIONS[recipe.allocation.strategy].uses_scores
    gradients = statistics is not None and bool(statistics.provides & BACKWARD)
    return MethodReport(
        target=recipe.pruning.target,
        target_of=recipe.pruning.target_of,
        scoring=recipe.scoring.method if uses_scores else None,
        objective=recipe.scoring.objective if gradients else None,
        aggregate=recipe.scoring.aggregate if uses_scores else None,
        allocation=recipe.allocation.strategy,
        attention_unit=recipe.pruning.attention_unit,
        round_to=ffn_multiple(recipe.pruning),
        reconstruction=recipe.pruning.reconstruct,
    )


def execute(prepared: Prepared, processes: Processes = ALONE) -> Report | None:
    """Run every stage; returns the report (written, with the model, into the output directory).

    The pruned model is first saved at the run's resume point (``prune/resume.py``); the stages after it are kept
    there as they finish, so that a rerun after a failure starts from them. A process other than the main one
    (``prune/processes.py``) does its share of the statistics pass and of recovery, writes nothing and returns None.
    """
    with output_lock(prepared.output) if processes.main else nullcontext():
        if processes.main:
            prepared.check_output()  # as prepared, now that no other run can write it
            remove_stale_scratch(prepared.cache / "scratch")
            if note := slow_dtype_note(prepared.recipe):
                print(note, file=sys.stderr)
        with processes.watched():
            return _execute(prepared, processes)


def _execute(prepared: Prepared, processes: Processes) -> Report | None:
    """:func:`execute`, holding the output's lock in the main process."""
    recipe = prepared.recipe
    stage_seconds: dict[str, float] = {}
    resume = resume_directory(prepared)
    state = processes.from_main(read_resume_point(resume) if processes.main else None)
    if state is not None and not processes.main:
        return None
    in_place = not needs_dense_after_pruning(recipe)
    with staged_directory(prepared.output) if processes.main else nullcontext() as partial:
        with timed(stage_seconds, "load model"):
            model, tokenizer = load_model(
                prepared.model_source,
                recipe.model.dtype,
                processes.device(str(resolve_device(recipe.model.device))),
                prepared.cache,
                recipe.model.device_map,
                recipe.model.max_memory,
            )
            check_finite(model)
            check_tokenizer(recipe, tokenizer)
            text = perplexity_text(prepared, tokenizer)
        dense_parts: dict = {}
        if state is None:
            with atomic_directory(resume) if processes.main else nullcontext() as staging:
                made = prune_to_resume_point(prepared, model, tokenizer, text, staging, processes)
                if made is None:
                    return None
                pruned, state, dense_parts = made
                assert staging is not None
                save_resume_point(staging, pruned, tokenizer, state)
        else:
            print(f"[pruned model] kept from an earlier attempt ({resume}): not pruned again", file=sys.stderr)
            if in_place:  # the dense model's parts of the evaluation, then only the pruned model in memory
                dense_parts = dense_first(DenseInputs(run_context(prepared, tokenizer, text), model), stage_seconds)
                release_weights(model)
            with timed(stage_seconds, "load pruned model"):
                pruned, _ = load_model(
                    ModelSource("directory", str(resume / "model")),
                    recipe.model.dtype,
                    str(resolve_device(recipe.model.device)),
                    prepared.cache,
                    recipe.model.device_map,
                    recipe.model.max_memory,
                )
        assert partial is not None
        dense = None if in_place else model
        del model  # pruned in place, it held the tensors the pruned model shares (embeddings, norms) until now
        report = evaluated_report(
            prepared,
            dense,
            pruned,
            tokenizer,
            text,
            state,
            dense_parts,
            resume,
            partial,
            stage_seconds,
        )
    shutil.rmtree(resume, ignore_errors=True)
    if report.recovery:
        shutil.rmtree(report.recovery.state_dir, ignore_errors=True)
    return report


def prune_to_resume_point(
    prepared: Prepared,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: torch.Tensor,
    staging: Path | None,
    processes: Processes,
) -> tuple[PreTrainedModel, PrunedState, dict] | None:
    """The stages that make the pruned model: statistics, scoring, allocation, pruning, reconstruction, recovery.
    Writes the statistics and the recovery log into ``staging`` (the resume point being made; None in a process
    other than the main one, which returns None once its share is done). Returns the pruned model, what the
    report needs of these stages, and the dense model's evaluation parts computed before pruning in place."""
    recipe = prepared.recipe
    stage_seconds: dict[str, float] = {}
    notes: list[str] = []
    width = inverted_input_width(recipe, prepared.shape)
    if width is not None:
        tokens = recipe.calibration.samples * recipe.calibration.seqlen
        notes.append(
            f"Calibration: {tokens:,} tokens, {tokens / width:.1f} per dimension of the widest input ({width:,}) whose "
            f"second moment {' and '.join(second_moment_inverters(recipe))} invert."
        )
    statistics, statistics_info = None, None
    if prepared.needs:
        with timed(stage_seconds, "activation statistics"):
            statistics, statistics_info = obtain_statistics(prepared, model, tokenizer, processes)
            check_statistics(statistics)
            if staging is not None:
                statistics.save_tensors(staging / "activation_stats.safetensors")
        if recipe.calibration.source == "wikitext2" and recipe.evaluation.perplexity.dataset == "wikitext2":
            notes.append(
                "Calibration text and perplexity text are both WikiText-2 (test split): the perplexity is optimistic."
            )
    if recipe.recovery.method == "none" and recipe.pruning.rounds == 1:  # no later stage is shared
        if not processes.main:
            return None  # its share is done
        processes = ALONE  # the main process goes on by itself: the others have left
    in_place = not needs_dense_after_pruning(recipe)
    dense_parts = {}
    if in_place:  # nothing after pruning needs the whole dense model: its parts of the evaluation first
        dense_parts = dense_first(DenseInputs(run_context(prepared, tokenizer, text), model), stage_seconds)
    samples = recipe_calibration(prepared, tokenizer) if reads_samples(recipe) else None
    pruned, allocation = prune_as_recipe_says(
        recipe,
        model,
        prepared.params_to_remove,
        statistics,
        stage_seconds,
        in_place,
        samples,
        processes,
        prepared.cache / "scratch",
    )
    recovery, before_recovery = None, None
    if recipe.recovery.method != "none":
        ppl = recipe.evaluation.perplexity
        if processes.main:
            with timed(stage_seconds, "perplexity before recovery"):
                before_recovery = perplexity(pruned, text, ppl.seqlen, ppl.windows, "pruned")["perplexity"]
        with timed(stage_seconds, f"recovery ({recipe.recovery.method})"):
            pruned, recovery = recover_as_recipe_says(prepared, model, pruned, tokenizer, text, staging, notes)
    if staging is None:
        return None
    state = PrunedState(
        method=method_report(prepared, statistics),
        layers=layer_table(prepared.shape, allocation),
        allocation=allocation_report(recipe, allocation),
        statistics=statistics_info,
        recovery=recovery,
        before_recovery=before_recovery,
        notes=notes,
        stage_seconds=stage_seconds,
    )
    return pruned, state, dense_parts


def evaluated_report(
    prepared: Prepared,
    dense: PreTrainedModel | None,
    pruned: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: torch.Tensor,
    state: PrunedState,
    dense_parts: dict,
    resume: Path,
    partial: Path,
    stage_seconds: dict[str, float],
) -> Report:
    """The stages after the resume point ``resume``: exports, evaluations (each kept there as it finishes) and the
    report, written into the staged output ``partial``. ``dense``: None when pruning in place left no dense model
    (its evaluation parts are in ``dense_parts``). ``stage_seconds``: those of this attempt so far."""
    recipe = prepared.recipe
    notes = list(state.notes)
    seconds = {"load model": stage_seconds["load model"]} | state.stage_seconds | stage_seconds
    if "load pruned model" in stage_seconds:
        notes.append(
            f"Continued from the resume point an earlier attempt left ({resume}): the stages up to the pruned model "
            "(and any evaluation marked kept in the log) were not run again; their times are that attempt's."
        )
    exports: list[ExportReport] = []
    for name in recipe.export.formats:
        with kept_on_failure(f"export ({name})", resume), timed(seconds, f"export ({name})"):
            exporting = ExportInputs(pruned, tokenizer, prepared.model_source, partial, recipe.export, resume / "model")
            exports.append(EXPORTERS[name](exporting))
    context = run_context(prepared, tokenizer, text)
    inputs = EvaluationInputs(context, dense, pruned, state.before_recovery, partial, exports, notes, dense_parts)
    sections = {}
    stages = [stage for stage in EVALUATIONS.values() if stage.enabled(recipe)]
    weights_read_until = max((i + 1 for i, stage in enumerate(stages) if stage.reads_weights), default=0)
    for index, stage in enumerate(stages):
        if index == weights_read_until:  # the stages left run on files and read only the models' shapes
            release_models(inputs, stages[index:])
        section = kept_evaluation(
            resume, stage, stage_settings(stage, recipe), notes, seconds, partial_call(stage.run, inputs)
        )
        if section is not None:
            sections[stage.name] = section
    with kept_on_failure("report", resume):
        for name in OUTPUT_FILES:
            if (resume / name).is_file():
                link_or_copy(resume / name, partial / name)
        dense_parameters, pruned_parameters = prepared.dense_parameters, count_parameters(pruned)
        report = Report(
            recipe=recipe_to_dict(recipe),
            model=model_report(prepared),
            method=state.method,
            parameters=ParametersReport(
                dense=ParameterCounts(**dense_parameters),
                pruned=ParameterCounts(**pruned_parameters),
                target_removed=prepared.params_to_remove,
                removed=dense_parameters["total"] - pruned_parameters["total"],
                removed_fraction=1 - pruned_parameters["total"] / dense_parameters["total"],
            ),
            layers=state.layers,
            allocation=state.allocation,
            statistics=state.statistics,
            evaluations=sections,
            recovery=state.recovery,
            exports=exports,
            stage_seconds=seconds,
            notes=notes,
        )
        write_report(report, partial)
        if report.export("hf"):
            atomic_write_text(partial / "model" / "README.md", model_card(report, prepared.output.name))
    return report


def release_models(inputs: EvaluationInputs, stages: list[EvaluationStage]) -> None:
    """Compute the dense parts that ``stages`` still lack, then free the weights of both models: a 1.5B model's
    3.3 GB are no longer resident while llama.cpp holds its own copies of the dense and the pruned model."""
    for stage in stages:
        if stage.dense is not None and stage.name not in inputs.dense_parts:
            inputs.dense_parts[stage.name] = inputs.dense_part(stage)
    for model in (inputs.dense, inputs.pruned):
        if model is not None:
            release_weights(model)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m prune.run", description="Prune a model as a recipe says.")
    add_recipe_arguments(parser, "YAML recipe (see docs/recipes.md)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set pruning.target=0.2 (repeatable)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved recipe and its parameter budget, then stop"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--ignore-memory-estimate",
        action="store_true",
        help="run even when a stage's estimated peak memory exceeds what the device has available",
    )
    args = parser.parse_args(argv)
    if printed_schema(parser, args, recipe_schema):
        return 0

    def run() -> str:
        prepared = prepare(load_recipe(args.recipe, args.set), overwrite=args.overwrite)
        if args.dry_run:
            print(dry_run_text(prepared), end="")
            return "dry run: nothing was written"
        if not args.ignore_memory_estimate:
            check_memory_plan(prepared)
        check_processes(prepared.recipe, launched_count())
        report = execute(prepared, launched_processes(cpu=resolve_device(prepared.recipe.model.device).type == "cpu"))
        warnings = "".join(f"\n{warning}" for warning in (report.warnings if report else []))
        return f"done: {prepared.output}/report.md{warnings}"

    return run_command(run, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
