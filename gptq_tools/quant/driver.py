"""The quantization driver: calibration, layer-by-layer streaming, resume, and the checkpoint at the end.

Flow: build the model skeleton on meta; load only the modules before the first layer and run the
calibration batch until it reaches layer 0 (a pre-hook records the layer's inputs and stops the
forward); then for each layer: read its tensors from the source, quantize its linears group by group
(true-sequential, each group's Hessians taken with the earlier groups already quantized), run the
calibration through the quantized layer to get the next layer's inputs, persist the layer and those
inputs in the work folder, free the layer. Everything is written into a staging folder next to the
output and renamed to the output at the very end.

Resume: the work folder's ``state.json`` is the commit record; a layer counts as done only once its
packed tensors and the next inputs are on disk. A resumed run recomputes the (cheap) layer-0 call
arguments, loads the saved inputs and continues, giving byte-identical tensors.

Memory: blocks of 1 MiB or more get mappings of their own, returned to the OS when freed (a process-wide
glibc setting made at the start of a run), and after each layer the allocator's free pages are returned too
(:mod:`.memory` explains why that, not a held reference, made memory grow with depth); the source files
are closed after each module and the final shards are streamed one tensor at a time, so a run needs one
layer's working set plus a constant, whatever the depth.

Distributed (``torchrun``): the same loop runs on every rank over its share of the calibration
windows; Hessians are reduced onto owner ranks that solve and broadcast (:mod:`.distributed`). Only
rank 0 reads and writes the work folder and the output. Without a launcher nothing changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.packing import pack_qweight, pack_qzeros
from ..errors import CalibrationError, DistributedError, GptqToolsError, QuantizationError, UsageError
from ..files.fileio import check_free_space, rmtree, unlink, work_lock
from ..progress import tqdm
from ..units import parse_size
from . import distributed
from . import reference as fp_reference
from .calibration import check_token_ids, load_calibration
from .config import METHODS, QuantizeConfig
from .fp_target import CrossAccumulator, fp_target_quantize
from .gptq import CholeskyFailure, HessianAccumulator, QuantResult, gptq_quantize, output_error
from .group_inputs import group_inputs
from .memory import map_large_blocks, release_free_memory
from .rtn import rtn_quantize
from .save import (
    MANIFEST_NAME,
    TensorRef,
    check_output_folder,
    copy_tokenizer,
    finished_checkpoint,
    publish,
    single_file_name,
    write_checksums,
    write_json,
    write_tensors,
)
from .source import SourceModel

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
WORK_DIR = ".work"


@dataclass(frozen=True)
class LinearReport:
    """How one linear was quantized."""

    layer: int
    name: str
    method: str  # "gptq", "fp-target", or "rtn" (the baseline, or the fallback after Cholesky failed)
    error: float  # mean squared output error per calibration token
    rtn_error: float  # the same for round-to-nearest, for comparison
    damp_percent: float
    seconds: float


@dataclass(frozen=True)
class QuantizeSummary:
    """The result of :func:`quantize_model`."""

    output: Path
    config: QuantizeConfig
    linears: tuple[LinearReport, ...]
    files: tuple[str, ...]
    seconds: float
    resumed_from_layer: int = 0
    fallbacks: tuple[str, ...] = field(default=())
    already_done: bool = False  # --resume found the output complete and verified; nothing was computed
    #: Wall time of each layer quantized in this run (load, Hessians, solve, forward pass, save); with
    #: ``setup_seconds`` (model, calibration, layer-0 inputs) and ``write_seconds`` (shards, configs,
    #: publishing) it adds up to ``seconds``.
    layer_seconds: dict[int, float] = field(default_factory=dict)
    setup_seconds: float = 0.0
    write_seconds: float = 0.0
    rank: int = 0  # distributed runs: this process's rank (only rank 0 writes; its summary is the run's)
    world_size: int = 1
    comm_seconds: float = 0.0  # time spent in collectives, waiting for other ranks included

    @property
    def raised_damping(self) -> tuple[str, ...]:
        """Linears whose Hessian needed more dampening than asked (Cholesky failed at ``damp_percent``);
        each was logged once when it happened. RTN fallbacks are in ``fallbacks``."""
        return tuple(entry.name for entry in self.linears
                     if entry.method != "rtn" and entry.damp_percent > self.config.damp_percent)


class _Captured(Exception):
    """Raised by the layer-0 pre-hook to stop the forward once the inputs are recorded."""


@dataclass
class _Calibration:
    hidden: list[torch.Tensor]  # one (1, seq, hidden) tensor per sample
    args: list[tuple[Any, ...]]  # positional arguments after hidden_states, per sample
    kwargs: list[dict[str, Any]]  # keyword arguments, per sample
    #: fp-target: the full-precision model's inputs to the same layer, per sample (see .reference)
    reference: list[torch.Tensor] | None = None


def _staging_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.gptq-tools-partial"


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _capture_layer0(source: SourceModel, ids: torch.Tensor, device: torch.device,
                    store: torch.device) -> _Calibration:
    """Run ``ids`` through the modules before layer 0 and record layer 0's call arguments per sample."""
    before = source.existing_modules(source.spec.before_layers)
    for path in before:
        source.load_module(path, device)
    layer0 = source.model.get_submodule(source.spec.layers_path)[0]

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args, kwargs)

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    captured = _Calibration([], [], [])
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    source.model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
                except _Captured as stop:
                    args, kwargs = stop.args
                    if "hidden_states" in kwargs:
                        hidden, rest = kwargs.pop("hidden_states"), tuple(args)
                    else:
                        hidden, rest = args[0], tuple(args[1:])
                    captured.hidden.append(hidden.to(store))
                    captured.args.append(rest)
                    captured.kwargs.append(kwargs)
                else:
                    raise QuantizationError(f"{source.folder}: the forward never reached layer 0; the "
                                            f"architecture table entry for {source.spec.name!r} is wrong")
    finally:
        handle.remove()
        for path in before:
            source.unload_module(path)
    return captured


def _run_layer(layer: torch.nn.Module, calib: _Calibration, device: torch.device) -> list[torch.Tensor]:
    """Outputs of ``layer`` for every calibration sample (kept where the inputs are kept)."""
    outputs = []
    with torch.no_grad():
        for hidden, args, kwargs in zip(calib.hidden, calib.args, calib.kwargs):
            out = layer(hidden.to(device), *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            outputs.append(out.to(hidden.device))
    return outputs


def _reference_outputs(layer: torch.nn.Module, calib: _Calibration, originals: dict[str, torch.Tensor],
                       device: torch.device) -> list[torch.Tensor]:
    """The full-precision model's outputs of ``layer`` (original weights on the reference inputs)."""
    with fp_reference.original_weights(layer, originals):
        return _run_layer(layer, replace(calib, hidden=calib.reference), device)


def _collect_hessians(layer: torch.nn.Module, modules: dict[str, torch.nn.Module], calib: _Calibration,
                      device: torch.device, conv1d: bool) -> dict[str, HessianAccumulator]:
    """Run the calibration through ``layer`` up to the last of ``modules`` and accumulate their Hessians."""
    accumulators = {name: HessianAccumulator(_linear_weight(m, conv1d).shape[1], device=device)
                    for name, m in modules.items()}
    with group_inputs(modules, lambda name, inputs: accumulators[name].add(inputs)) as run:
        for hidden, args, kwargs in zip(calib.hidden, calib.args, calib.kwargs):
            run(layer, hidden.to(device), args, kwargs)
    return accumulators


def _linear_weight(module: torch.nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as (out, in) (transformers' Conv1D stores (in, out)), detached: the math needs no graph."""
    weight = module.weight.detach()
    return weight.t() if conv1d else weight


def _quantize_linear(name: str, W: torch.Tensor, H: torch.Tensor, config: QuantizeConfig,
                     method: str) -> tuple[QuantResult, float]:
    """GPTQ, falling back to RTN when the Hessian cannot be inverted; returns (result, rtn_error)."""
    rtn = rtn_quantize(W, config, H=H)
    if method == "rtn":
        return rtn, rtn.error
    try:
        return gptq_quantize(W, H, config, name=name), rtn.error
    except CholeskyFailure as exc:
        logger.warning("%s; falling back to round-to-nearest for this linear", exc)
        return rtn, rtn.error


def _quantize_fp_target(name: str, W: torch.Tensor, H: torch.Tensor, D: torch.Tensor,
                        config: QuantizeConfig) -> tuple[QuantResult, float]:
    """fp-target, falling back to RTN as GPTQ does; the RTN error is measured against the same target."""
    rtn = rtn_quantize(W, config, H=H)
    try:
        result, target = fp_target_quantize(W, H, D, config, name=name)
    except CholeskyFailure as exc:
        logger.warning("%s; falling back to round-to-nearest for this linear", exc)
        return rtn, rtn.error
    return result, output_error(target, rtn.dequantized(), H)


def _solve_linear(name: str, W: torch.Tensor, hessian: HessianAccumulator, cross: CrossAccumulator | None,
                  config: QuantizeConfig, method: str) -> tuple[QuantResult, float]:
    if cross is None:
        return _quantize_linear(name, W, hessian.hessian(), config, method)
    return _quantize_fp_target(name, W, hessian.hessian(), cross.cross(), config)


def _quantize_layer(source: SourceModel, index: int, calib: _Calibration, config: QuantizeConfig,
                    device: torch.device, method: str, run: distributed.DistributedRun | None = None,
                    originals: dict[str, torch.Tensor] | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[LinearReport]]:
    """Quantize layer ``index`` in place (weights replaced by their dequantized values).

    In a distributed run each linear's Hessian is summed onto its owner rank, the owners solve, and
    the results are broadcast; every rank ends with the same layer. Returns the checkpoint tensors of
    the layer (packed on rank 0 only) and one report per linear. With ``calib.reference`` (fp-target)
    ``originals`` receives the linears' full-precision weights, for the reference pass after the layer.
    """
    spec = source.spec
    prefix = f"{spec.layers_path}.{index}"
    layer = source.load_module(prefix, device)
    if calib.reference is not None and originals is not None:
        originals.update(fp_reference.original_weights_of({n: layer.get_submodule(n)
                                                           for n in spec.quantized_linears}))
    tensors: dict[str, torch.Tensor] = {}
    reports = []
    groups = spec.sequential if config.true_sequential else (spec.quantized_linears,)
    for group in groups:
        modules = {name: layer.get_submodule(name) for name in group}
        crosses: dict[str, CrossAccumulator] = {}
        if calib.reference is None or not originals:
            accumulators = _collect_hessians(layer, modules, calib, device, spec.conv1d)
        else:
            accumulators, crosses = fp_reference.collect_paired(
                layer, modules, hidden=calib.hidden, reference=calib.reference, args=calib.args,
                kwargs=calib.kwargs, originals=originals, device=device,
                in_features=lambda m: _linear_weight(m, spec.conv1d).shape[1])
        owners, solved = _solve_owned(run, prefix, modules, accumulators, config, method, spec.conv1d, crosses)
        for name, module in modules.items():
            started = time.perf_counter()
            full = f"{prefix}.{name}"
            if run is None:
                W = _linear_weight(module, spec.conv1d).float()
                result, rtn_error = _solve_linear(full, W, accumulators.pop(name), crosses.pop(name, None), config,
                                                  method)
                seconds = None
            else:
                out_features, in_features = _linear_weight(module, spec.conv1d).shape
                groups = 1 if config.group_size == -1 else in_features // config.group_size
                result, rtn_error, seconds = distributed.broadcast_result(
                    run, solved.get(name), owners[name], name=full, out_features=out_features,
                    in_features=in_features, groups=groups, device=device)
            dequantized = result.dequantized().to(module.weight.dtype)
            module.weight.data = dequantized.t().contiguous() if spec.conv1d else dequantized
            if run is None or run.is_main:
                tensors.update(_pack(full, result, config))
            reports.append(LinearReport(index, full, result.method, result.error, rtn_error, result.damp_percent,
                                        time.perf_counter() - started if seconds is None else seconds))
    quantized = {f"{name}.weight" for name in spec.quantized_linears}
    for name, param in layer.named_parameters():
        if name not in quantized:
            tensors[f"{prefix}.{name}"] = param.detach().to("cpu", torch.float16)
    return tensors, reports


def _solve_owned(run: distributed.DistributedRun | None, prefix: str, modules: dict[str, torch.nn.Module],
                 accumulators: dict[str, HessianAccumulator], config: QuantizeConfig, method: str,
                 conv1d: bool, crosses: dict[str, CrossAccumulator] | None = None
                 ) -> tuple[dict[str, int], dict[str, tuple[QuantResult, float, float]]]:
    """Distributed runs: reduce each Hessian onto its owner, then solve the linears this rank owns.

    Owners are balanced by solve cost (``in_features ** 3``); they solve at the same time. fp-target's
    cross terms (``crosses``) are reduced onto the same owners the same way. Returns
    ``({name: owner rank}, {name: (result, rtn_error, seconds)} for the owned linears)``; both empty for
    a single process (which solves each linear as it goes, as before).
    """
    if run is None:
        return {}, {}
    names = list(modules)
    costs = [float(_linear_weight(modules[name], conv1d).shape[1]) ** 3 for name in names]
    owners = dict(zip(names, distributed.assign_owners(costs, run.world_size)))
    crosses = crosses or {}
    for name in names:
        distributed.reduce_hessian(run, accumulators[name], owners[name], name=f"{prefix}.{name}")
        if name in crosses:
            distributed.reduce_hessian(run, crosses[name], owners[name], name=f"{prefix}.{name} (cross term)")
    solved: dict[str, tuple[QuantResult, float, float]] = {}
    for name in names:
        if owners[name] != run.rank:
            continue
        started = time.perf_counter()
        W = _linear_weight(modules[name], conv1d).float()
        result, rtn_error = _solve_linear(f"{prefix}.{name}", W, accumulators.pop(name), crosses.pop(name, None),
                                          config, method)
        solved[name] = (result, rtn_error, time.perf_counter() - started)
    return owners, solved


def _pack(name: str, result: QuantResult, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """The AutoGPTQ tensors of one linear (CPU)."""
    return {
        f"{name}.qweight": pack_qweight(result.intweight.t().contiguous(), config.bits).cpu(),
        f"{name}.qzeros": pack_qzeros(result.zeros, config.bits, checkpoint_format=config.checkpoint_format).cpu(),
        f"{name}.scales": result.scales.cpu(),
        f"{name}.g_idx": result.g_idx.cpu(),
    }


# ---------------------------------------------------------------------------------------------------
# work folder (resume)


def _fingerprint(source: SourceModel, ids: torch.Tensor, config: QuantizeConfig, dtype: torch.dtype,
                 method: str) -> str:
    """What a resumed run must share with the interrupted one."""
    digest = hashlib.sha256()
    digest.update((source.folder / "config.json").read_bytes())
    for path in sorted(source.folder.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(f"{dtype} {method}".encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def _save_inputs(hidden: list[torch.Tensor], path: Path) -> None:
    from .save import _save_safetensors

    _save_safetensors({"hidden": torch.cat([h.cpu() for h in hidden])}, path)


def _load_inputs(path: Path, store: torch.device) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    hidden = load_file(str(path))["hidden"]
    return [row.unsqueeze(0).to(store) for row in hidden]


def _read_state(work: Path, fingerprint: str) -> dict[str, Any]:
    state_path = work / STATE_NAME
    if not state_path.is_file():
        return {"fingerprint": fingerprint, "done": 0, "linears": []}
    state = json.loads(state_path.read_text())
    if state.get("fingerprint") != fingerprint:
        raise QuantizationError(f"{work}: the interrupted run used another model, calibration or settings; "
                                f"delete {work.parent} to start over, or resume with the same arguments")
    return state


def _commit_layer(work: Path, state: dict[str, Any], index: int, tensors: dict[str, torch.Tensor],
                  outputs: list[torch.Tensor], reports: list[LinearReport], last: bool) -> None:
    """Persist layer ``index`` and the next inputs, then record it as done (state.json is the commit)."""
    from .save import _save_safetensors

    _save_safetensors(tensors, work / f"layer-{index:05d}.safetensors")
    if not last:
        _save_inputs(outputs, work / f"inputs-{index + 1:05d}.safetensors")
    state["done"] = index + 1
    state["linears"].extend(asdict(report) for report in reports)
    write_json(work / STATE_NAME, state)
    unlink(work / f"inputs-{index:05d}.safetensors", missing_ok=True)  # a resumed run may have removed it


# ---------------------------------------------------------------------------------------------------
# the public entry point


def quantize_model(model_dir: str | Path, output_dir: str | Path, *, calibration: str | Path,
                   config: QuantizeConfig | None = None, nsamples: int = 128, seqlen: int | None = None,
                   device: str = "cpu", resume: bool = False, max_shard_size: int | str = "5GB",
                   single_file: bool = False, autogptq_name: bool = False, seed: int = 0, method: str | None = None,
                   on_layer_done: Callable[[int], None] | None = None, wait_lock: float = 0.0) -> QuantizeSummary:
    """Quantize a Hugging Face causal LM with GPTQ, layer by layer, into an AutoGPTQ checkpoint folder.

    Args:
        model_dir: source folder (config.json, safetensors weights, tokenizer).
        output_dir: output folder; must not exist or be empty.
        calibration: calibration file (.txt, .jsonl, .safetensors, .pt).
        config: quantization settings (default :class:`QuantizeConfig`).
        nsamples: calibration windows.
        seqlen: tokens per window (default: 2048 capped by the model's maximum).
        device: compute device (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        resume: continue an interrupted run from its last finished layer.
        max_shard_size: largest shard (bytes or ``"5GB"``); ignored with ``single_file``.
        single_file: write one ``model.safetensors`` instead of shards.
        autogptq_name: write one file named as AutoGPTQ does, ``gptq_model-{bits}bit-{gs}g.safetensors``
            (implies ``single_file``; transformers does not find that name).
        seed: seeds the calibration windows.
        method: overrides ``config.method`` when given: ``"gptq"``, ``"fp-target"`` (solved against the
            full-precision model's outputs, see :mod:`.fp_target`), or ``"rtn"`` for a round-to-nearest
            baseline checkpoint (all in the same format; ``meta.method`` records which).
        on_layer_done: called with each layer index once it is persisted.
        wait_lock: seconds to wait for another run quantizing into ``output_dir`` to finish (0: refuse at
            once; ``math.inf``: without limit).

    Returns:
        A :class:`QuantizeSummary` (per-linear errors, files, time).

    Raises:
        OutputExistsError, UnsupportedArchitectureError, CalibrationError, UsageError,
        QuantizationError, InsufficientSpaceError, CheckpointError.
    """
    started = time.perf_counter()
    config = config or QuantizeConfig()
    if method is not None:
        if method not in METHODS:
            raise UsageError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
        config = replace(config, method=method)
    method = config.method
    if wait_lock < 0:
        raise UsageError(f"--wait-lock must be 0 seconds or more, got {wait_lock:g}")
    model_dir, output = Path(model_dir), Path(output_dir)
    if (done := _already_done(output, config, resume=resume, started=started)) is not None:
        return done
    with _staging_lock(output, wait_seconds=wait_lock) as waited:
        if waited and (done := _already_done(output, config, resume=resume, started=started)) is not None:
            return done  # the run we waited for finished this very checkpoint
        run, compute = distributed.start(check_compute_device(device))
        try:
            return _quantize(run, model_dir, output, calibration=calibration, config=config, nsamples=nsamples,
                             seqlen=seqlen, compute=compute, resume=resume, max_shard_size=max_shard_size,
                             single_file=single_file, autogptq_name=autogptq_name, seed=seed, method=method,
                             on_layer_done=on_layer_done, started=started)
        finally:
            distributed.stop(run)


def _already_done(output: Path, config: QuantizeConfig, *, resume: bool, started: float) -> QuantizeSummary | None:
    """With ``resume``, the summary of an output that is already complete (None: there is work to do)."""
    finished = finished_checkpoint(output) if resume and not _staging_folder(output).exists() else None
    if finished is None:
        return None
    logger.info("%s: already quantized (every file matches its SHA256SUMS); nothing to resume", output)
    return QuantizeSummary(output, config, (), finished, time.perf_counter() - started, already_done=True)


def _staging_lock(output: Path, *, wait_seconds: float = 0.0) -> contextlib.AbstractContextManager[bool]:
    """One run per output: two ``--resume`` on one output would race on its staging folder. Rank 0 (or the
    single process) holds it; without the output's parent folder there is nothing to lock yet. The context
    gives whether another run held it first."""
    from ..constants import distributed_env

    env = distributed_env()
    if (env is not None and env["rank"] != 0) or not output.parent.is_dir():
        return contextlib.nullcontext(False)
    return work_lock(output.parent / f".{output.name}.gptq-tools-lock", what=f"quantization into {output}",
                     wait_seconds=wait_seconds)


def _quantize(run: distributed.DistributedRun | None, model_dir: Path, output: Path, *, calibration: str | Path,
              config: QuantizeConfig, nsamples: int, seqlen: int | None, compute: torch.device, resume: bool,
              max_shard_size: int | str, single_file: bool, autogptq_name: bool, seed: int, method: str,
              on_layer_done: Callable[[int], None] | None, started: float) -> QuantizeSummary:
    """:func:`quantize_model` on one rank (``run`` None: a single process, exactly as before)."""
    main = run is None or run.is_main
    if run is None:
        check_output_folder(output)
    shard_bytes = parse_size(max_shard_size, what="--max-shard-size")
    map_large_blocks()  # freed layer temporaries go back to the OS at once, not at the next trim (quant/memory.py)
    source = SourceModel(model_dir, dtype=_compute_dtype(compute))
    ids = _calibration_ids(source, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
    check_token_ids(ids, source.model.get_input_embeddings().num_embeddings, calibration=calibration,
                    model=model_dir)
    _check_group_size(source, config)
    if run is not None and len(ids) < run.world_size:
        raise UsageError(f"{len(ids)} calibration windows for {run.world_size} ranks; use --nsamples "
                         f"{run.world_size} or more, or fewer ranks")
    staging = _staging_folder(output)
    work = staging / WORK_DIR
    state: dict[str, Any] = {"fingerprint": "", "done": 0, "linears": []}
    published = False
    prepared: str | int = 0
    if main:
        try:
            if run is not None:  # checked here so that the other ranks hear of it instead of timing out
                check_output_folder(output)
            staging = _prepare_staging(output, resume=resume)
            if resume and (staging / MANIFEST_NAME).is_file() and not work.exists():
                logger.info("%s: the interrupted run had finished writing; publishing it", staging)
                publish(staging, output)
                published = True
            else:
                work.mkdir(parents=True, exist_ok=True)
                state = _read_state(work, _fingerprint(source, ids, config, source.dtype, method))
            prepared = -1 if published else int(state["done"])
        except GptqToolsError as exc:
            prepared = str(exc)
            raise
        finally:
            if run is not None:
                distributed.broadcast_object(run, prepared, what="the resume point from rank 0")
    else:
        prepared = distributed.broadcast_object(run, None, what="the resume point from rank 0")
        if isinstance(prepared, str):
            raise DistributedError(f"rank {run.rank}: rank 0 stopped before starting: {prepared}")
        published = prepared == -1
        state["done"] = max(int(prepared), 0)
    if published:
        files = tuple(sorted(p.name for p in output.iterdir())) if main else ()
        seconds = time.perf_counter() - started
        return QuantizeSummary(output, config, (), files, seconds, source.num_layers(), write_seconds=seconds,
                               **_run_fields(run))
    first = state["done"]
    store = _activation_store(source, ids, compute)
    loop_started, layer_seconds = _run_layers(source, ids, config, compute, store, work, state, method,
                                              on_layer_done, run)
    files = (_finish(source, staging, output, config, work, model_dir, single_file=single_file or autogptq_name,
                     autogptq_name=autogptq_name, shard_bytes=shard_bytes) if main else [])
    linears = tuple(LinearReport(**entry) for entry in state["linears"])
    fallbacks = tuple(entry.name for entry in linears if entry.method == "rtn") if method != "rtn" else ()
    seconds = time.perf_counter() - started
    setup = loop_started - started
    return QuantizeSummary(output, config, linears, tuple(files), seconds, first, fallbacks,
                           layer_seconds=layer_seconds, setup_seconds=setup,
                           write_seconds=seconds - setup - sum(layer_seconds.values()), **_run_fields(run))


def _run_fields(run: distributed.DistributedRun | None) -> dict[str, Any]:
    if run is None:
        return {}
    return {"rank": run.rank, "world_size": run.world_size, "comm_seconds": run.comm_seconds}


def _calibration_ids(source: SourceModel, calibration: str | Path, *, nsamples: int, seqlen: int | None,
                     seed: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    limit = source.max_length()
    if seqlen is None:
        seqlen = min(2048, limit) if limit else 2048
    elif limit and seqlen > limit:
        raise UsageError(f"--seqlen {seqlen} is longer than {source.folder} allows ({limit} positions); "
                         f"use --seqlen {limit} or less")
    if nsamples < 1 or seqlen < 1:
        raise UsageError(f"nsamples={nsamples} and seqlen={seqlen} must both be positive")
    tokenizer = None
    if Path(calibration).suffix.lower() not in (".safetensors", ".pt", ".pth"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{source.folder}: no usable tokenizer for text calibration ({exc}); "
                                   f"pass tokenized .safetensors calibration instead") from exc
    return load_calibration(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)


def check_compute_device(device: str) -> torch.device:
    """The compute device ``device`` names, checked to exist here before any work or folder is made.

    Raises:
        UsageError: not a device name, or a device this machine (or this torch build) does not have.
    """
    try:
        compute = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--device {device!r} is not a device name ({exc}); use cpu, cuda or cuda:N") from None
    if compute.type == "cpu":
        return compute
    backend = getattr(torch, compute.type, None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    if not available:
        build = f"torch {torch.__version__}" + ("" if compute.type != "cuda" or torch.version.cuda
                                                else ", built without CUDA")
        raise UsageError(f"--device {device}: this machine has no {compute.type.upper()} device ({build}); "
                         f"use --device cpu or run where a GPU is visible")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if compute.index is not None and compute.index >= count:
        raise UsageError(f"--device {device}: this machine has {count} {compute.type} device(s) "
                         f"(0 to {count - 1}); pick one of them")
    return compute


def _check_group_size(source: SourceModel, config: QuantizeConfig) -> None:
    """Fail before any work when the group size does not divide some linear's input size."""
    if config.group_size == -1:
        return
    layer = source.model.get_submodule(source.spec.layers_path)[0]
    for name in source.spec.quantized_linears:
        inputs = _linear_weight(layer.get_submodule(name), source.spec.conv1d).shape[1]
        if inputs % config.group_size:
            raise UsageError(f"--group-size {config.group_size} does not divide the {inputs} inputs of {name}; "
                             f"use a divisor of {inputs} or -1")


def _prepare_staging(output: Path, *, resume: bool) -> Path:
    """The staging folder for ``output``, ready for this run.

    A staging folder whose run committed nothing (no layer in ``state.json``, no ``SHA256SUMS``) holds
    nothing worth resuming and is removed; one with committed work needs ``resume``. A complete one
    (``SHA256SUMS`` written) whose work folder was being removed when the run died has that removal
    finished here, so the caller publishes it.

    Raises:
        QuantizationError: committed work is there and ``resume`` is False.
    """
    staging = _staging_folder(output)
    work = staging / WORK_DIR
    if staging.exists() and not (staging / MANIFEST_NAME).is_file() and not (work / STATE_NAME).is_file():
        logger.info("%s: left by a run that committed no layer; removing it", staging)
        rmtree(staging)
    if staging.exists() and not resume:
        raise QuantizationError(f"{staging}: an interrupted run left this folder; pass --resume to continue it "
                                f"or delete it to start over")
    if resume and not staging.exists():
        logger.info("%s: nothing to resume, starting from layer 0", staging)
    if resume and (staging / MANIFEST_NAME).is_file():
        rmtree(work)  # the checkpoint was complete; the run died while removing its work folder
    output.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir(exist_ok=True)
    return staging


def _activation_store(source: SourceModel, ids: torch.Tensor, compute: torch.device) -> torch.device:
    """Keep calibration activations on the compute device when two copies fit, else on CPU."""
    if compute.type != "cuda":
        return compute
    itemsize = torch.finfo(source.dtype).bits // 8
    needed = 2 * ids.numel() * source.config.hidden_size * itemsize
    free, _ = torch.cuda.mem_get_info(compute)
    if needed < free // 2:
        return compute
    logger.info("calibration activations (%d MiB) kept on CPU", needed >> 20)
    return torch.device("cpu")


def _run_layers(source: SourceModel, ids: torch.Tensor, config: QuantizeConfig, compute: torch.device,
                store: torch.device, work: Path, state: dict[str, Any], method: str,
                on_layer_done: Callable[[int], None] | None,
                run: distributed.DistributedRun | None = None) -> tuple[float, dict[int, float]]:
    """Quantize the layers from ``state["done"]`` on (in a distributed run on this rank's windows only);
    returns when the first one started and each one's wall time (consecutive clock readings, so together
    they cover the whole loop)."""
    total = source.num_layers()
    if state["done"] >= total:
        return time.perf_counter(), {}
    calib = _capture_layer0(source, ids[distributed.share(run, len(ids))], compute, store)
    if config.method == "fp-target":
        calib.reference = list(calib.hidden)  # layer 0's inputs: no layer quantized yet, the streams agree
    if state["done"] > 0:
        saved = (_load_inputs(work / f"inputs-{state['done']:05d}.safetensors", store)
                 if run is None or run.is_main else None)
        calib.hidden = saved if run is None else distributed.scatter_rows(
            run, saved, len(ids), store=store, what=f"the saved inputs of layer {state['done']}")
        if calib.reference is not None:
            saved = (fp_reference.load_reference(work, state["done"], store) if run is None or run.is_main
                     else None)
            calib.reference = saved if run is None else distributed.scatter_rows(
                run, saved, len(ids), store=store, what=f"the saved full-precision inputs of layer {state['done']}")
        logger.info("resuming at layer %d of %d", state["done"], total)
    bar = tqdm(range(state["done"], total), desc="quantizing layers", unit="layer", dynamic_ncols=True,
               disable=None if run is None or run.is_main else True)
    loop_started = previous = time.perf_counter()
    layer_seconds: dict[int, float] = {}
    for index in bar:
        originals: dict[str, torch.Tensor] = {}
        tensors, reports = _quantize_layer(source, index, calib, config, compute, method, run, originals)
        last = index == total - 1
        layer = source.model.get_submodule(f"{source.spec.layers_path}.{index}")
        outputs = [] if last else _run_layer(layer, calib, compute)
        reference = None if last or calib.reference is None else _reference_outputs(layer, calib, originals, compute)
        source.unload_module(f"{source.spec.layers_path}.{index}")
        every = outputs if run is None or last else distributed.gather_rows(
            run, outputs, len(ids), what=f"the outputs of layer {index}")
        every_reference = reference if run is None or reference is None else distributed.gather_rows(
            run, reference, len(ids), what=f"the full-precision outputs of layer {index}")
        if run is None or run.is_main:
            if every_reference is not None:  # committed before state.json records the layer
                fp_reference.save_reference(work, index + 1, every_reference)
            _commit_layer(work, state, index, tensors, every or [], reports, last)
            fp_reference.drop_reference(work, index)
        else:
            state["done"] = index + 1
            state["linears"].extend(asdict(report) for report in reports)
        calib.hidden = outputs
        if reference is not None:
            calib.reference = reference
        del tensors, outputs, every, layer, reference, every_reference, originals
        release_free_memory()  # the allocator keeps freed layer temporaries otherwise (see quant/memory.py)
        worst = max(reports, key=lambda r: r.error)
        bar.set_postfix(err=f"{sum(r.error for r in reports):.4g}", worst=worst.name.rsplit(".", 1)[-1])
        logger.info("layer %d: error %s", index, ", ".join(f"{r.name.rsplit('.', 1)[-1]}={r.error:.4g}"
                                                          for r in reports))
        if on_layer_done is not None:
            on_layer_done(index)
        now = time.perf_counter()
        layer_seconds[index], previous = now - previous, now
    return loop_started, layer_seconds


def _finish(source: SourceModel, staging: Path, output: Path, config: QuantizeConfig, work: Path, model_dir: Path,
            *, single_file: bool, autogptq_name: bool, shard_bytes: int) -> list[str]:
    """Write tensors, configs, tokenizer and SHA256SUMS into ``staging``; rename it to ``output``."""
    from safetensors import safe_open

    refs = _outer_refs(source, before=True)
    for index in range(source.num_layers()):
        path = work / f"layer-{index:05d}.safetensors"
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shape = handle.get_slice(key).get_shape()
                dtype = handle.get_slice(key).get_dtype()
                dtype_bytes = 2 if dtype in ("F16", "BF16") else 4
                refs.append(TensorRef(key, dtype_bytes * _prod(shape), _file_loader(path, key),
                                      dtype=dtype, shape=tuple(shape)))
    refs.extend(_outer_refs(source, before=False))
    file_name = single_file_name(config.bits, config.group_size, autogptq=autogptq_name) if single_file else None
    check_free_space(staging, sum(ref.nbytes for ref in refs), what="writing the checkpoint")
    files = write_tensors(refs, staging, max_shard_size=shard_bytes, single_file=file_name)
    base = file_name.removesuffix(".safetensors") if file_name else "model"
    quantize_config = config.quantize_config_dict(model_name_or_path=None, model_file_base_name=base)
    write_json(staging / "quantize_config.json", quantize_config)
    model_config = json.loads((model_dir / "config.json").read_text())
    model_config["quantization_config"] = quantize_config
    model_config["torch_dtype"] = model_config["dtype"] = "float16"
    write_json(staging / "config.json", model_config)
    files += ["quantize_config.json", "config.json"] + copy_tokenizer(model_dir, staging)
    write_checksums(staging)  # lists files only: the work folder is not part of the checkpoint
    # From here on the staging folder is a complete checkpoint: SHA256SUMS is the commit record, and a
    # run killed while the work folder is being removed is finished by --resume (see _prepare_staging).
    rmtree(work)
    publish(staging, output)
    return sorted(files + ["SHA256SUMS"])


def _prod(shape: list[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


def _file_loader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return handle.get_tensor(key)
    return load


def _outer_refs(source: SourceModel, *, before: bool) -> list[TensorRef]:
    """Non-layer tensors in fp16: embeddings first (``before``), final norm and ``lm_head`` after."""
    after_prefixes = tuple(source.spec.after_layers) + (source.spec.lm_head,)
    refs = []
    for name in source.outer_tensor_names():
        is_after = name.startswith(after_prefixes)
        if is_after == before:
            continue
        shape = source.model.get_parameter(name).shape if _is_param(source, name) else None
        nbytes = 2 * _prod(list(shape)) if shape is not None else 0
        refs.append(TensorRef(source.checkpoint_name(name), nbytes,
                              lambda name=name: source.read(name).to(torch.float16).clone(),
                              dtype="F16" if shape is not None else None,
                              shape=tuple(shape) if shape is not None else None))
    return refs


def _is_param(source: SourceModel, name: str) -> bool:
    try:
        source.model.get_parameter(name)
    except AttributeError:
        return False
    return True
