"""``compress`` end to end: load -> data -> Block Influence -> plan -> init -> build -> recover -> save + report.

Every stage is a library function of its own module; this one only strings them together, handles processes
(rank 0 decides, everyone trains, rank 0 writes) and resuming. The output folder (Flexi checkpoint + report)
is written all-or-nothing; recovery checkpoints live beside it (``<out>.ckpt`` unless ``checkpoint_dir`` is
given) and are removed after a successful run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from flexi_export.compress import distributed as D
from flexi_export.compress.choose import distance_matrix
from flexi_export.compress.data import TokenData, load_corpus, prepare_tokens
from flexi_export.compress.device import resolve_device
from flexi_export.compress.distill import teacher_view
from flexi_export.compress.evaluate import evaluate_model
from flexi_export.compress.extend import extend_plan
from flexi_export.compress.influence import block_influence
from flexi_export.compress.init import initial_values
from flexi_export.compress.planner import PlanOptions, blocks_to_prune, check_rank, compression_ratio, make_plan
from flexi_export.compress.recover import RecoveryConfig, RecoveryResult, flexi_trainable, recover
from flexi_export.compress.report import build_report, write_report
from flexi_export.compress.svd import EXACT_SVD_MAX_DIM
from flexi_export.compress.train_state import has_checkpoint, read_params, read_state, remove_checkpoint
from flexi_export.errors import CheckpointError, CompressError, InputError
from flexi_export.files import atomic_output_dir, check_output_dir
from flexi_export.layouts import ModelDims
from flexi_export.model import build_flexi
from flexi_export.plan import BlockPlan, SourceInfo
from flexi_export.source import SourceModel, load_source, model_fingerprint
from flexi_export.stats import dense_parameters, plan_parameters


@dataclass(frozen=True)
class CompressOptions:
    """Everything ``flexi-export compress`` does, as data (picklable, so it can be sent to worker processes)."""

    model: str
    out: str
    plan: PlanOptions = field(default_factory=PlanOptions)
    adapter_init: str = "svd"
    ofn_init: str = "fit"
    extend: tuple[int, ...] = ()
    data: str | None = None
    text_field: str = "text"
    calib_sequences: int = 64
    seq_len: int = 256
    eval_sequences: int = 128
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    checkpoint_dir: str | None = None
    keep_checkpoints: bool = False
    evaluate: bool = True
    progress: bool = True
    exact_svd_max_dim: int = EXACT_SVD_MAX_DIM

    @property
    def pruning(self) -> bool:
        """True when blocks are pruned (``--ratio`` or ``--num-blocks``)."""
        return self.plan.ratio is not None or self.plan.num_blocks is not None

    def checkpoint_folder(self) -> Path:
        """Where recovery checkpoints go."""
        out = Path(self.out)
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.with_name(out.name + ".ckpt")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check(options: CompressOptions, source: SourceModel, dims: ModelDims) -> None:
    if source.is_flexi:
        raise InputError(f"{options.model} is a Flexi checkpoint; compress needs the original Hugging Face model")
    if not options.pruning and not options.extend:
        raise CompressError("nothing to do: give --ratio or --num-blocks to prune, and/or --extend to insert blocks")
    for name, value in (("--calib-sequences", options.calib_sequences), ("--eval-sequences", options.eval_sequences)):
        if value < 1:
            raise CompressError(f"{name} must be at least 1, got {value}")
    if options.pruning:
        options.plan.check(dims)
        # reachability does not depend on the scores: fail before the data and Block Influence passes
        blocks_to_prune([0.0] * dims.num_blocks, dims, options.plan, SourceInfo(dims.model_type, dims.num_blocks))
    if options.extend:
        check_rank(options.plan.rank, options.plan.targets, dims)
        for block in options.extend:
            if not 0 <= block < dims.num_blocks:
                raise CompressError(f"--extend: block {block} does not exist (blocks 0..{dims.num_blocks - 1})")


def _make_plan(
    source: SourceModel, data: TokenData, options: CompressOptions, device: torch.device, log: Callable[[str], None]
) -> tuple[BlockPlan, dict[str, float]]:
    """Block Influence, the pruning plan and any extension (rank 0 only)."""
    timings: dict[str, float] = {}
    model = source.model
    dims = source.layout.dims(model.config)
    started = time.perf_counter()
    scores = block_influence(model, data.calibration, progress=options.progress)
    timings["block_influence"] = time.perf_counter() - started
    info = SourceInfo(model.config.model_type, dims.num_blocks, name=options.model, sha256=_fingerprint(options.model))
    provenance = {
        "calibration": {**data.corpus, "sequences": int(data.calibration.shape[0])},
        "adapter_init": options.adapter_init,
        "ofn_init": options.ofn_init,
    }
    started = time.perf_counter()
    if options.pruning:
        opts = options.plan

        def distances(pruned: list[int], kept: list[int]) -> dict[int, dict[int, float]]:
            return distance_matrix(model, pruned, kept, opts.rank, opts.targets, device, options.progress)

        result = make_plan(info, dims, scores, opts, distances, provenance)
        plan = result.plan
        log(
            f"pruned blocks {list(result.pruned)} (BI lowest first), sources {result.sources}, ratio {result.ratio:.6f}"
        )
    else:
        plan = BlockPlan.identity(info.model_type, dims.num_blocks, info.name, info.sha256)
        plan = plan.with_provenance(**provenance, block_influence=scores)
    if options.extend:
        ofn = options.plan.ofn if options.plan.ofn != "none" else "rms"
        plan = extend_plan(plan, options.extend, options.plan.adapter(), ofn)
        plan = plan.with_provenance(
            achieved_ratio=compression_ratio(plan, dims),
            stored_parameters=plan_parameters(plan, dims),
            dense_parameters=dense_parameters(dims),
        )
    timings["plan"] = time.perf_counter() - started
    return plan, timings


def _fingerprint(path: str) -> str:
    try:
        return model_fingerprint(path)
    except OSError:
        return ""


def compress(options: CompressOptions, log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Run the whole compression; return the report (also written into ``options.out``).

    Under torchrun (or :func:`~flexi_export.compress.distributed.spawn`) every process calls this: rank 0
    scores, plans, evaluates and writes; all processes train.
    """
    device = resolve_device(options.device)
    created = not D.dist_info().distributed
    info = D.init_from_env(device.type)
    if not info.is_main:
        log = _silent
    options = replace(options, progress=options.progress and info.is_main)
    try:
        return _compress(options, device, log)
    finally:
        if created:
            D.shutdown()


def _silent(message: str) -> None:
    del message


def _compress(options: CompressOptions, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    info = D.dist_info()
    resuming = _prepare_folders(options)
    source = load_source(options.model, device=_home(options, device))
    dims = source.layout.dims(source.model.config)
    _check(options, source, dims)
    data = _data(options, source, log)
    plan, timings, init, evaluations = _plan_and_init(options, source, data, resuming, device, log)
    student = build_flexi(source.model, plan, init=init, seed=options.recovery.seed)
    teacher = teacher_view(source.model, student)
    if not resuming and options.evaluate and info.is_main:
        evaluations.update(_evaluate_before(source, student, data, options.progress, log))
    extra = {"plan": plan.to_json(), "timings": timings, "evaluation": evaluations, "options": _decisions(options)}
    if not flexi_trainable(student):  # a ShortGPT removal plan has nothing of its own to train
        log("no replacement or inserted blocks: nothing to recover")
        options = replace(options, recovery=replace(options.recovery, tokens=0))
    result = recover(
        student,
        teacher,
        data.train,
        options.recovery,
        checkpoint_dir=options.checkpoint_folder(),
        resume=options.resume,
        progress=options.progress,
        extra=extra,
        device=device,
    )
    timings["recovery"] = result.seconds
    if D.choose_strategy(options.recovery.strategy) == "fsdp" and info.distributed:
        # fully_shard changed the modules in place: rebuild a plain model from the trained tensors
        source = load_source(options.model, device=_home(options, device))
        student = build_flexi(source.model, plan, init=result.params, seed=options.recovery.seed)
    report: dict[str, Any] = {}
    if info.is_main:
        report = _finish(options, source, student, plan, data, result, evaluations, timings, started, log)
    D.barrier()
    return report


def _data(options: CompressOptions, source: SourceModel, log: Callable[[str], None]) -> TokenData:
    """Calibration, training (enough rows for the token budget) and held-out sequences."""
    rows = -(-options.recovery.tokens // options.seq_len) if options.recovery.tokens > 0 else 0
    corpus = load_corpus(options.data, options.text_field)
    data = prepare_tokens(
        corpus,
        source.tokenizer,
        options.seq_len,
        options.calib_sequences,
        rows,
        options.eval_sequences,
        options.recovery.seed,
    )
    log(
        f"data: {corpus.name}, {data.calibration.shape[0]} calibration / {data.train.shape[0]} training / "
        f"{data.heldout.shape[0]} held-out sequences of {options.seq_len} tokens"
    )
    return data


def _home(options: CompressOptions, device: torch.device) -> torch.device:
    """Where the whole model lives: the compute device, except under multi-process FSDP, where it stays in host
    memory and only each process's shards move to its GPU (the model need not fit one GPU)."""
    fsdp = D.choose_strategy(options.recovery.strategy) == "fsdp" and D.dist_info().distributed
    return torch.device("cpu") if fsdp else device


def _plan_and_init(
    options: CompressOptions,
    source: SourceModel,
    data: TokenData,
    resuming: bool,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[BlockPlan, dict[str, float], dict[str, torch.Tensor], dict[str, Any]]:
    """A fresh plan and initial tensors, or, when resuming, those stored in the recovery checkpoint."""
    if not resuming:
        plan, timings, init = _decide(source, data, options, device, log)
        return plan, timings, init, {}
    ckpt = options.checkpoint_folder()
    state = read_state(ckpt)
    if state.extra.get("options") != _decisions(options):
        raise CheckpointError(
            f"the recovery checkpoint in {ckpt} was made with other compression options "
            f"({_differences(state.extra.get('options') or {}, _decisions(options))}); run the same command, or "
            "--overwrite to start over"
        )
    plan = BlockPlan.from_json(state.extra["plan"]).validate()
    log(f"resuming recovery from step {state.step} in {ckpt}")
    return plan, dict(state.extra["timings"]), read_params(ckpt), dict(state.extra["evaluation"])


def _decisions(options: CompressOptions) -> dict[str, Any]:
    """The options that decide the plan and the initial tensors (a resume must use the same ones)."""
    return json.loads(
        json.dumps(
            {
                "model": options.model,
                "plan": dataclasses.asdict(options.plan),
                "adapter_init": options.adapter_init,
                "ofn_init": options.ofn_init,
                "extend": list(options.extend),
                "data": options.data,
                "text_field": options.text_field,
                "calib_sequences": options.calib_sequences,
                "seq_len": options.seq_len,
                "eval_sequences": options.eval_sequences,
            }
        )
    )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


def _evaluate_before(
    source: SourceModel, student: torch.nn.Module, data: TokenData, progress: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    dense = evaluate_model(source.model, data.heldout, progress=progress).to_json()
    before = evaluate_model(student, data.heldout, progress=progress).to_json()
    log(f"held-out perplexity: dense {dense['perplexity']:.3f}, compressed before recovery {before['perplexity']:.3f}")
    return {"dense": dense, "before_recovery": before}


def _prepare_folders(options: CompressOptions) -> bool:
    """Check the output and checkpoint folders; return True when resuming from a checkpoint."""
    ckpt = options.checkpoint_folder()
    if D.dist_info().is_main:
        check_output_dir(options.out, options.overwrite)
    if has_checkpoint(ckpt) and not options.resume:
        if not options.overwrite:
            raise CompressError(
                f"a recovery checkpoint exists in {ckpt}: pass --resume to continue it, or --overwrite to start over"
            )
        D.barrier()
        if D.dist_info().is_main:
            remove_checkpoint(ckpt)
        D.barrier()
    return options.resume and has_checkpoint(ckpt)


def _decide(
    source: SourceModel, data: TokenData, options: CompressOptions, device: torch.device, log: Callable[[str], None]
) -> tuple[BlockPlan, dict[str, float], dict[str, torch.Tensor]]:
    """Rank 0 scores, plans and initialises; every process gets the plan and the initial tensors."""
    info = D.dist_info()
    plan_json, timings, init = None, {}, None
    if info.is_main:
        plan, timings = _make_plan(source, data, options, device, log)
        started = time.perf_counter()
        init = initial_values(
            source.model,
            plan,
            data.calibration,
            options.adapter_init,
            options.ofn_init,
            options.exact_svd_max_dim,
            options.progress,
            log=log,
        )
        timings["init"] = time.perf_counter() - started
        plan_json = plan.to_json()
    plan = BlockPlan.from_json(D.broadcast_object(plan_json)).validate()
    timings = D.broadcast_object(timings)
    return plan, timings, D.broadcast_tensors(init, device)


def _finish(
    options: CompressOptions,
    source: SourceModel,
    student: torch.nn.Module,
    plan: BlockPlan,
    data: TokenData,
    result: RecoveryResult,
    evaluations: dict[str, Any],
    timings: dict[str, float],
    started: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Evaluate after recovery, then write the Flexi checkpoint and the report in one atomic folder."""
    from flexi_export.checkpoint import save_flexi

    if options.evaluate and result.steps > 0:
        evaluations["after_recovery"] = evaluate_model(student, data.heldout, progress=options.progress).to_json()
        log(f"held-out perplexity after recovery: {evaluations['after_recovery']['perplexity']:.3f}")
    timings["total"] = time.perf_counter() - started
    recovery = {
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
        "resumed_from_step": result.resumed_from,
        "final_loss": result.losses[-1] if result.losses else None,
        "losses": result.losses,
        "processes": D.dist_info().world_size,
        "config": options.recovery.identity(),
    }
    settings = {
        "device": str(next(student.parameters()).device),
        "adapter_init": options.adapter_init,
        "ofn_init": options.ofn_init,
        "plan_options": options.plan.__dict__,
        "calib_sequences": options.calib_sequences,
        "seq_len": options.seq_len,
    }
    report = build_report(options.model, plan, evaluations, recovery, timings, data.corpus, settings)
    with atomic_output_dir(options.out, overwrite=options.overwrite) as tmp:
        save_flexi(student, tmp, tokenizer=source.tokenizer, overwrite=True)
        write_report(tmp, report)
    if options.checkpoint_dir is None and not options.keep_checkpoints:
        remove_checkpoint(options.checkpoint_folder())
    log(f"wrote {options.out} (achieved ratio {report['ratio']['achieved']:.6f})")
    return report
