"""Serving plans for vLLM: tensor- and pipeline-parallel sizes that fit, and the exact commands.

The model's sizes come from :func:`gptq_tools.runtime.plan.load_layout` (config plus safetensors headers, or a
preset's config): the same per-block byte counts the single-process planner uses. vLLM then splits the
model its own way, and this module follows it (vLLM 0.32 source):

* tensor parallelism (TP) splits every decoder layer's quantized linears and the vocabulary-parallel
  embedding and head across the TP ranks of a stage; layer norms and biases of row-parallel linears are
  replicated (counted whole on every rank);
* pipeline parallelism (PP) gives each stage a run of layers as ``vllm.distributed.utils.get_pp_indices``
  does (the remainder goes to the stages before the last); the embedding lives on the first stage, the
  final norm and the head on the last, and a tied head is a second copy there when PP > 1;
* constraints: TP divides the attention heads (``ModelConfig.verify_with_parallel_config``) and the KV
  heads (or is a multiple of them: KV heads are then replicated), and the vocabulary padded to 64
  (``VocabParallelEmbedding``); GPTQ shapes per partition: column-parallel outputs a multiple of the
  packing factor, row-parallel inputs a multiple of the group size; Marlin, the fast kernel, also needs
  outputs % 64 and inputs % 128 per partition (otherwise vLLM falls back to a slower kernel, which the
  plan says); act-order with groups is refused by vLLM 0.32 ("no longer supported"), act-order without
  groups is a no-op there; 2/3-bit and asymmetric checkpoints have no vLLM GPTQ kernel;
* memory per GPU: ``--gpu-memory-utilization`` x the card holds the stage's weights / TP, the CUDA
  context (and NCCL buffers), the activations of one ``--max-num-batched-tokens`` step, and the KV cache
  of ``--max-num-seqs`` sequences of ``--max-model-len`` tokens for the stage's layers.

Multi-node plans follow vLLM's advice: TP = GPUs per node, PP = nodes.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..runtime.plan import GiB, ModelLayout, PlanOptions, load_layout, parse_gpus
from ..units import format_size, size_arg_at_least

#: vLLM pads the vocabulary to a multiple of this before splitting it across TP ranks.
VOCAB_PADDING = 64
#: Marlin's per-partition minimums (``marlin_utils.GPTQ_MARLIN_MIN_THREAD_N`` / ``_K``).
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128
#: The last name component of linears vLLM shards by input (row-parallel); all others shard by output.
ROW_PARALLEL = frozenset({"out_proj", "o_proj", "dense", "fc2", "down_proj", "dense_4h_to_h", "c_proj"})
HEAD_ADDRESS = "HEAD_IP"


@dataclass(frozen=True)
class ServingOptions:
    """What vLLM is asked for (its own flag names, with its defaults where it has one)."""

    max_model_len: int | None = None  # default: the model's maximum, 2048 when it has none (ALiBi)
    max_num_seqs: int = 1  # sequences whose full-length KV cache must fit at once
    max_num_batched_tokens: int = 8192  # tokens of one scheduler step: the activation peak
    gpu_memory_utilization: float = 0.92  # vLLM 0.32 default
    cuda_context_bytes: int = GiB
    port: int = 8000


@dataclass(frozen=True)
class StageMemory:
    """One pipeline stage's needs on each of its GPUs."""

    stage: int
    layers: tuple[int, int]  # [first, last) decoder layers
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    context_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes + self.context_bytes


@dataclass(frozen=True)
class ServingPlan:
    """The chosen sizes and commands, or why nothing fits and the smallest change that would."""

    source: str
    fits: bool
    gpus_per_node: int
    nodes: int
    gpu_bytes: int
    budget_bytes: int  # gpu_memory_utilization x gpu_bytes
    max_model_len: int
    tensor_parallel_size: int = 0
    pipeline_parallel_size: int = 0
    kernel: str = ""
    stages: tuple[StageMemory, ...] = ()
    commands: dict[str, list[str]] = field(default_factory=dict)
    before: tuple[str, ...] = ()  # commands to run first (download and join, quantize) so the model exists
    notes: tuple[str, ...] = ()
    reason: str = ""
    suggestion: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [{**asdict(stage), "total_bytes": stage.total_bytes} for stage in self.stages]
        return data


# ------------------------------------------------------------------------------------- constraints
def pp_partition(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Layer ranges per stage exactly as vLLM's ``get_pp_indices`` splits them."""
    sizes = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        sizes[-i] += 1
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def tp_problem(layout: ModelLayout, linears: dict[str, tuple[int, int]], tp: int, *, kv_heads: int) -> str | None:
    """Why vLLM refuses tensor-parallel size ``tp`` for this model (None: it accepts it)."""
    if layout.num_heads % tp:
        return f"TP {tp} does not divide the {layout.num_heads} attention heads"
    if kv_heads % tp and tp % kv_heads:
        return f"TP {tp} neither divides nor is a multiple of the {kv_heads} KV heads"
    padded = _padded_vocab(layout.vocab_size)
    if padded % tp:
        return f"TP {tp} does not divide the vocabulary padded to {padded}"
    pack = 32 // layout.settings.bits if 32 % layout.settings.bits == 0 else 32
    group = layout.settings.group_size
    for name, (in_features, out_features) in linears.items():
        if name.rpartition(".")[2] in ROW_PARALLEL:
            part = in_features // tp
            if in_features % tp or part % pack or (group != -1 and part % group):
                return (f"TP {tp} splits the {in_features} inputs of {name} into {in_features / tp:g}, not a "
                        f"multiple of the group size {group}" if group != -1 else
                        f"TP {tp} splits the {in_features} inputs of {name} unevenly")
        elif out_features % tp or (out_features // tp) % pack:
            return (f"TP {tp} splits the {out_features} outputs of {name} unevenly for "
                    f"{layout.settings.bits}-bit packing")
    return None


def marlin_ok(layout: ModelLayout, linears: dict[str, tuple[int, int]], tp: int) -> bool:
    """Whether every partition meets Marlin's shape minimums (else vLLM picks a slower kernel)."""
    for name, (in_features, out_features) in linears.items():
        in_part, out_part = ((in_features // tp, out_features) if name.rpartition(".")[2] in ROW_PARALLEL
                             else (in_features, out_features // tp))
        if in_part % MARLIN_MIN_K or out_part % MARLIN_MIN_N:
            return False
    return True


def checkpoint_problem(layout: ModelLayout) -> str | None:
    """Settings vLLM 0.32 cannot serve at all, with what to do instead."""
    settings = layout.settings
    if settings.desc_act and settings.group_size != -1:
        return ("vLLM 0.32 refuses act-order (desc_act) with groups (\"no longer supported\"); use a checkpoint "
                "without groups (group_size -1, e.g. BLOOMZ's main branch), or quantize again with "
                "--static-groups or --no-desc-act")
    if settings.bits not in (4, 8) or not settings.sym:
        return (f"vLLM's GPTQ kernels take 4- or 8-bit symmetric weights, not {settings.bits}-bit "
                f"{'symmetric' if settings.sym else 'asymmetric'}; quantize again with --bits 4 --sym")
    return None


def _padded_vocab(vocab: int) -> int:
    return -(-vocab // VOCAB_PADDING) * VOCAB_PADDING


# ------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class _Sizes:
    """The layout reduced to what vLLM's split needs."""

    layer_bytes: list[int]  # per decoder layer: quantized linears (split by TP)
    layer_replicated: list[int]  # per decoder layer: norms and other small tensors (whole on every rank)
    embed_bytes: int  # every block before the layers (split by TP: vocab-parallel)
    tail_bytes: int  # blocks after the layers except the head (final norm: whole)
    head_bytes: int  # the head's own weight, or the embedding's size when tied (a copy when PP > 1)
    head_tied: bool


def _sizes(layout: ModelLayout) -> _Sizes:
    layers = [block for block in layout.blocks if block.is_layer]
    head = next((block for block in layout.blocks if block.is_head), None)
    first_layer = layout.blocks.index(layers[0])
    last_layer = layout.blocks.index(layers[-1])
    embed = sum(block.weight_bytes for block in layout.blocks[:first_layer])
    tail = sum(block.weight_bytes for block in layout.blocks[last_layer + 1:] if not block.is_head)
    item = 2
    head_own = head.weight_bytes if head is not None else 0
    tied = head is not None and head.tied_to is not None and head_own == 0
    head_bytes = layout.vocab_size * layout.hidden_size * item if tied else head_own
    norm_bytes = 4 * layout.hidden_size * item  # two layer norms (weight + bias) per layer, replicated
    return _Sizes([block.weight_bytes - norm_bytes for block in layers], [norm_bytes] * len(layers), embed, tail,
                  head_bytes, tied)


def stage_memory(layout: ModelLayout, sizes: _Sizes, tp: int, pp: int, options: ServingOptions,
                 max_model_len: int) -> list[StageMemory]:
    """Memory each GPU of each stage needs, for TP ``tp`` and PP ``pp``."""
    item = 2
    kv_heads_part = max(1, math.ceil(layout.kv_size / tp))
    tokens = options.max_num_batched_tokens
    activations = tokens * item * (6 * layout.hidden_size + 2 * layout.intermediate_size // tp)
    logits = min(tokens, options.max_num_seqs * 256) * _padded_vocab(layout.vocab_size) * 4
    stages = []
    ranges = pp_partition(len(sizes.layer_bytes), pp)
    for stage, (first, last) in enumerate(ranges):
        weights = sum(sizes.layer_bytes[first:last]) // tp + sum(sizes.layer_replicated[first:last])
        if stage == 0:
            weights += sizes.embed_bytes // tp
        if stage == pp - 1:
            weights += sizes.tail_bytes
            if not sizes.head_tied or pp > 1:
                weights += sizes.head_bytes // tp
        kv = 2 * (last - first) * options.max_num_seqs * max_model_len * kv_heads_part * item
        stages.append(StageMemory(stage, (first, last), weights, kv,
                                  activations + (logits if stage == pp - 1 else 0), options.cuda_context_bytes))
    return stages


# ---------------------------------------------------------------------------------------- planning
def plan_serving(source: str, *, gpus: str, nodes: int = 1, options: ServingOptions | None = None,
                 branch: str | None = None, model_ref: str | None = None) -> ServingPlan:
    """Choose vLLM's TP and PP sizes for ``source`` on ``nodes`` nodes of ``gpus`` each, with the commands.

    Args:
        source: a GPTQ checkpoint folder or a preset name.
        gpus: the GPUs of one node, ``8x80GB`` (all the same size).
        nodes: number of nodes (multi-node: TP = GPUs per node, PP = nodes).
        options: vLLM's memory-related settings.
        branch: the preset branch whose quantization settings apply.
        model_ref: what ``vllm serve`` is given (default: the folder, or the preset's repository id).

    Returns:
        A :class:`ServingPlan`; ``fits`` False carries the reason and the smallest change that fits.

    Raises:
        UsageError: mixed GPU sizes, a bad node count or memory utilization.
        CheckpointError: the checkpoint and its config disagree.
    """
    layout, _ = load_layout(source, options=PlanOptions(), branch=branch)
    target = ServingTarget(model_ref) if model_ref else serving_target(source, layout, branch=branch)
    plan = plan_for_layout(layout, _model_config(source, layout), gpus=gpus, nodes=nodes, options=options,
                           model_ref=target.model, revision=target.revision)
    if not plan.fits:
        return plan
    return _replace(plan, before=target.before, notes=(*target.notes, *plan.notes))


def plan_for_layout(layout: ModelLayout, model_config: dict[str, Any], *, gpus: str, nodes: int = 1,
                    options: ServingOptions | None = None, model_ref: str,
                    revision: str | None = None) -> ServingPlan:
    """:func:`plan_serving` for a layout already loaded (``model_config``: its config.json as a dict)."""
    options = options or ServingOptions()
    caps = list(parse_gpus(gpus).values())
    if len(set(caps)) != 1:
        raise UsageError(f"--gpus {gpus}: vLLM runs every rank on equal GPUs; give one size, like 8x80GB")
    if nodes < 1:
        raise UsageError(f"--nodes {nodes}: give 1 or more")
    if not 0 < options.gpu_memory_utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization {options.gpu_memory_utilization}: give a fraction in (0, 1]")
    ref = model_ref
    length = options.max_model_len or default_max_model_len(model_config)
    per_node, gpu_bytes = len(caps), caps[0]
    base = ServingPlan(layout.source, False, per_node, nodes, gpu_bytes,
                       int(gpu_bytes * options.gpu_memory_utilization), length)
    problem = checkpoint_problem(layout)
    if problem:
        return _replace(base, reason=f"vLLM cannot serve this checkpoint: {problem}", suggestion=problem)
    linears, kv_heads = _linear_shapes(layout)
    sizes = _sizes(layout)
    choice = _choose(layout, linears, sizes, per_node, nodes, gpu_bytes, options, length, kv_heads)
    if choice is None:
        return _replace(base, reason=_misfit_reason(layout, linears, sizes, per_node, nodes, gpu_bytes, options,
                                                    length, kv_heads),
                        suggestion=_smallest_fix(layout, linears, sizes, per_node, nodes, gpu_bytes, options,
                                                 length, kv_heads))
    tp, pp, stages = choice
    kernel = "marlin" if marlin_ok(layout, linears, tp) else "exllama (Marlin's shapes do not fit this TP)"
    notes = []
    if layout.settings.desc_act:
        notes.append("act-order without groups: vLLM 0.32 treats desc_act as a no-op here (one group per "
                     "output channel), so TP splits it like any other checkpoint")
    commands = serving_commands(ref, tp=tp, pp=pp, nodes=nodes, max_model_len=length, options=options,
                                revision=revision)
    return _replace(base, fits=True, tensor_parallel_size=tp, pipeline_parallel_size=pp, kernel=kernel,
                    stages=tuple(stages), commands=commands, notes=tuple(notes))


def _replace(plan: ServingPlan, **changes: Any) -> ServingPlan:
    return replace(plan, **changes)


@dataclass(frozen=True)
class ServingTarget:
    """What ``vllm serve`` is given for the checkpoint the plan sized, and what must happen first."""

    model: str  # a folder or a repository id
    revision: str | None = None  # vllm serve --revision (a repository's non-default branch)
    before: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def serving_target(source: str, layout: ModelLayout, *, branch: str | None = None) -> ServingTarget:
    """The model argument of ``vllm serve`` for the checkpoint ``layout`` describes: never another one.

    A folder is served as it is, with a note when vLLM would meet split parts there (it loads every
    ``*.safetensors`` of a folder and cannot read parts). A preset of a quantized repository is served from the
    Hub at its branch, unless the branch holds its weights only as parts: then from the folder ``gptq-tools
    download`` joins them into. A preset of an fp16 model was sized as the checkpoint ``quantize`` writes:
    quantize first.
    """
    if not layout.source.startswith("preset "):
        return ServingTarget(layout.source, notes=folder_notes(Path(layout.source)))
    from ..checkpoint.presets import parse_model_spec

    spec = parse_model_spec(source, revision=branch)
    preset = spec.preset
    if preset is None:  # pragma: no cover - load_layout only sizes presets
        raise UsageError(f"{source!r} is not a preset")
    name = preset.name if spec.revision == preset.default_branch else f"{preset.name}:{spec.revision}"
    folder = f"./{spec.local_dir()}"
    info = preset.branches.get(spec.revision, {})
    if not info.get("quantize_config"):
        output = f"{folder}-gptq"
        return ServingTarget(output, before=(
            f"gptq-tools download {name}",
            f"gptq-tools quantize {folder} -o {output} --calibration CALIBRATION.txt"), notes=(
            f"quantize first: {preset.repo_id} is the fp16 model ({format_size(layout.total_weight_bytes)} is the "
            f"4-bit checkpoint `gptq-tools quantize` writes with its defaults); vllm serve {preset.repo_id} would "
            f"serve the unquantized model this plan did not size",))
    split = [file for file, meta in info.get("files", {}).items() if meta.get("parts")]
    if split:
        return ServingTarget(folder, before=(f"gptq-tools download {name} --delete-parts",), notes=(
            f"{preset.repo_id}@{spec.revision} holds {', '.join(split)} only as split parts, which vLLM cannot "
            f"read: download joins them (--delete-parts removes the parts once the joined file is verified, as "
            f"vLLM would load them too)",))
    revision = None if spec.revision == "main" else spec.revision
    return ServingTarget(preset.repo_id, revision=revision)


def folder_notes(folder: Path) -> tuple[str, ...]:
    """What vLLM will see in ``folder`` when it holds split parts (alone, or beside their joined file)."""
    from ..files.parts import parse_part_name

    names = sorted(p.name for p in folder.glob("*.safetensors"))
    parts: dict[str, list[str]] = {}
    for name in names:
        parsed = parse_part_name(name)
        if parsed is not None:
            parts.setdefault(parsed.output_name, []).append(name)
    notes = []
    for output, members in parts.items():
        if output in names:
            notes.append(f"{folder} holds {output} and also its {len(members)} split parts; vLLM loads every "
                         f"*.safetensors in the folder, the parts too, and fails: remove the parts once "
                         f"`gptq-tools verify` passes (or download with --delete-parts)")
        else:
            notes.append(f"{folder} holds {output} only as {len(members)} split parts, which vLLM cannot read: "
                         f"join them first (gptq-tools join {folder}), then remove the parts")
    return tuple(notes)


def _model_config(source: str, layout: ModelLayout) -> dict[str, Any]:
    if layout.source.startswith("preset "):
        from ..checkpoint.presets import load_preset

        return dict(load_preset(source).model_config)
    from ..checkpoint.model_files import read_json

    return read_json(Path(layout.source) / "config.json")


def default_max_model_len(model_config: dict[str, Any]) -> int:
    """vLLM's default ``--max-model-len``: the model's position limit, 2048 when it has none (ALiBi)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = model_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _linear_shapes(layout: ModelLayout) -> tuple[dict[str, tuple[int, int]], int]:
    """(in, out) of every quantized linear of one layer (from the architecture's linear names), and the
    KV head count."""
    hidden, inter = layout.hidden_size, layout.intermediate_size
    kv_heads = max(1, layout.kv_size * layout.num_heads // hidden)
    kv_width = layout.kv_size
    shapes: dict[str, tuple[int, int]] = {}
    for name in layout.arch.quantized_linears:
        last = name.rpartition(".")[2]
        if last in ("query_key_value", "c_attn", "qkv_proj", "Wqkv"):
            shapes[name] = (hidden, hidden + 2 * kv_width)
        elif last in ("k_proj", "v_proj"):
            shapes[name] = (hidden, kv_width)
        elif last in ("fc1", "dense_h_to_4h", "up_proj", "gate_proj", "c_fc"):
            shapes[name] = (hidden, inter)
        elif last in ("fc2", "dense_4h_to_h", "down_proj") or name.endswith("mlp.c_proj"):
            shapes[name] = (inter, hidden)
        else:
            shapes[name] = (hidden, hidden)
    return shapes, kv_heads


def _candidates(per_node: int, nodes: int) -> list[tuple[int, int]]:
    """(TP, PP) pairs to try, preferred first: multi-node TP = GPUs per node and PP = nodes, else smaller
    TP with more stages; one node: every GPU used, the largest TP first."""
    total = per_node * nodes
    if nodes > 1:
        return [(tp, total // tp) for tp in range(per_node, 0, -1) if per_node % tp == 0]
    return [(tp, total // tp) for tp in range(total, 0, -1) if total % tp == 0]


def _choose(layout: ModelLayout, linears: dict[str, tuple[int, int]], sizes: _Sizes, per_node: int, nodes: int,
            gpu_bytes: int, options: ServingOptions, length: int,
            kv_heads: int) -> tuple[int, int, list[StageMemory]] | None:
    budget = int(gpu_bytes * options.gpu_memory_utilization)
    for tp, pp in _candidates(per_node, nodes):
        if pp > len(sizes.layer_bytes) or tp_problem(layout, linears, tp, kv_heads=kv_heads):
            continue
        stages = stage_memory(layout, sizes, tp, pp, options, length)
        if max(stage.total_bytes for stage in stages) <= budget:
            return tp, pp, stages
    return None


def _misfit_reason(layout: ModelLayout, linears: dict[str, tuple[int, int]], sizes: _Sizes, per_node: int,
                   nodes: int, gpu_bytes: int, options: ServingOptions, length: int, kv_heads: int) -> str:
    budget = int(gpu_bytes * options.gpu_memory_utilization)
    tried = []
    for tp, pp in _candidates(per_node, nodes):
        problem = tp_problem(layout, linears, tp, kv_heads=kv_heads)
        if problem:
            tried.append(f"TP {tp} x PP {pp}: {problem}")
            continue
        worst = max(stage_memory(layout, sizes, tp, pp, options, length), key=lambda s: s.total_bytes)
        tried.append(f"TP {tp} x PP {pp}: stage {worst.stage} needs {format_size(worst.total_bytes)} per GPU of "
                     f"{format_size(budget)} usable")
    return f"no tensor/pipeline split fits {nodes} x {per_node} GPUs of {format_size(gpu_bytes)}: " + "; ".join(tried)


def _smallest_fix(layout: ModelLayout, linears: dict[str, tuple[int, int]], sizes: _Sizes, per_node: int,
                  nodes: int, gpu_bytes: int, options: ServingOptions, length: int, kv_heads: int) -> str:
    """The smallest change that fits: a shorter --max-model-len, more GPUs of this size, or larger GPUs."""
    fixes = []
    shorter = length
    while shorter > 256:
        shorter //= 2
        if _choose(layout, linears, sizes, per_node, nodes, gpu_bytes, options, shorter, kv_heads):
            fixes.append(f"--max-model-len {shorter}")
            break
    for more in range(per_node + 1, 65):
        if nodes == 1 and _choose(layout, linears, sizes, more, 1, gpu_bytes, options, length, kv_heads):
            fixes.append(f"--gpus {more}x{_size_arg(gpu_bytes)}")
            break
        if nodes > 1 and more <= 16 and _choose(layout, linears, sizes, more, nodes, gpu_bytes, options, length,
                                                kv_heads):
            fixes.append(f"{nodes} nodes of --gpus {more}x{_size_arg(gpu_bytes)}")
            break
    bigger = _smallest_gpu(layout, linears, sizes, per_node, nodes, gpu_bytes, options, length, kv_heads)
    if bigger is not None:
        fixes.append(f"GPUs of {size_arg_at_least(bigger)} (--gpus {per_node}x{size_arg_at_least(bigger)}; "
                     f"{bigger} bytes exactly)")
    if not fixes:
        return "nothing close fits; plan with more nodes (--nodes)"
    return "smallest change that fits: " + " or ".join(fixes)


def _smallest_gpu(layout: ModelLayout, linears: dict[str, tuple[int, int]], sizes: _Sizes, per_node: int,
                  nodes: int, gpu_bytes: int, options: ServingOptions, length: int, kv_heads: int) -> int | None:
    """The smallest GPU size (to the byte) on which some split fits, up to 1 TiB more than now; None if none."""
    def fits(size: int) -> bool:
        return _choose(layout, linears, sizes, per_node, nodes, size, options, length, kv_heads) is not None

    low, high = gpu_bytes + 1, gpu_bytes + 1024 * GiB
    if not fits(high):
        return None
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _size_arg(size: int) -> str:
    """A size as a shell word that ``--gpus`` reads back (``37.25GiB``)."""
    return format_size(size).replace(" ", "")


# ---------------------------------------------------------------------------------------- commands
def serving_commands(model: str, *, tp: int, pp: int, nodes: int, max_model_len: int,
                     options: ServingOptions, revision: str | None = None) -> dict[str, list[str]]:
    """The shell lines to run: ``single_node``, or ``ray`` and ``multiprocessing`` for several nodes."""
    serve = ["vllm", "serve", model, *(["--revision", revision] if revision else []),
             "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
             "--max-model-len", str(max_model_len), "--gpu-memory-utilization", f"{options.gpu_memory_utilization:g}",
             "--max-num-seqs", str(options.max_num_seqs), "--port", str(options.port)]
    if nodes == 1:
        return {"single_node": [shlex.join(serve)]}
    ray = [f"# head node ({HEAD_ADDRESS}):", "ray start --head --port 6379"]
    ray += [f"# each of the other {nodes - 1} node(s):", f"ray start --address {HEAD_ADDRESS}:6379"]
    ray += ["# then on the head node:", shlex.join([*serve, "--distributed-executor-backend", "ray"])]
    native = [f"# head node ({HEAD_ADDRESS}):",
              shlex.join([*serve, "--nnodes", str(nodes), "--node-rank", "0", "--master-addr", HEAD_ADDRESS])]
    for rank in range(1, nodes):
        native += [f"# node {rank}:", shlex.join([*serve, "--nnodes", str(nodes), "--node-rank", str(rank),
                                                   "--master-addr", HEAD_ADDRESS, "--headless"])]
    return {"ray": ray, "multiprocessing": native}


def format_serving_plan(plan: ServingPlan) -> str:
    """The plan as text: sizes, memory per stage, commands (or the refusal)."""
    gpus = f"{plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) of {format_size(plan.gpu_bytes)}"
    lines = [f"{plan.source} on {gpus}, max-model-len {plan.max_model_len} "
             f"({format_size(plan.budget_bytes)} usable per GPU)"]
    if not plan.fits:
        return "\n".join([*lines, plan.reason, plan.suggestion])
    lines.append(f"tensor-parallel-size {plan.tensor_parallel_size}, pipeline-parallel-size "
                 f"{plan.pipeline_parallel_size} (kernel: {plan.kernel})")
    lines.append(f"{'stage':>5}  {'layers':>9}  {'weights':>11}  {'kv_cache':>11}  {'activations':>11}  "
                 f"{'context':>11}  {'total/GPU':>11}")
    for stage in plan.stages:
        lines.append(f"{stage.stage:>5}  {stage.layers[0]:>4}-{stage.layers[1] - 1:<4}  "
                     f"{format_size(stage.weight_bytes):>11}  {format_size(stage.kv_cache_bytes):>11}  "
                     f"{format_size(stage.activation_bytes):>11}  {format_size(stage.context_bytes):>11}  "
                     f"{format_size(stage.total_bytes):>11}")
    if plan.before:
        lines.append("first:")
        lines.extend(f"  {command}" for command in plan.before)
    titles = {"single_node": "command:", "ray": "several nodes with Ray:",
              "multiprocessing": "several nodes without Ray:"}
    for key, commands in plan.commands.items():
        lines.append(titles[key])
        lines.extend(f"  {command}" for command in commands)
    lines.extend(f"note: {note}" for note in plan.notes)
    return "\n".join(lines)
