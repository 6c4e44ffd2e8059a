"""``plan --engine vllm``: tensor/pipeline sizes that fit, vLLM's constraints, the exact commands."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from gptq_tools.checkpoint.presets import load_preset
from gptq_tools.cli import main as cli_main
from gptq_tools.constants import vllm_python
from gptq_tools.runtime.plan import GiB, ModelLayout, PlanOptions, load_layout
from gptq_tools.serving.plan import (
    ServingOptions,
    ServingPlan,
    _linear_shapes,
    plan_for_layout,
    pp_partition,
    tp_problem,
)
from gptq_tools.units import parse_size

REPO_ROOT = Path(__file__).resolve().parent.parent
GPU_SETS = [("2x80GB", 1), ("3x48GB", 1), ("8x24GB", 1), ("4x24GB", 2)]


@pytest.fixture(scope="module")
def layouts() -> dict[str, tuple[ModelLayout, dict]]:
    return {name: (load_layout(name, options=PlanOptions())[0], dict(load_preset(name).model_config))
            for name in ("bloomz-176b-gptq", "opt-iml-30b")}


def _plan(layouts: dict, name: str, gpus: str, nodes: int = 1, **options: object) -> ServingPlan:
    layout, config = layouts[name]
    return plan_for_layout(layout, config, gpus=gpus, nodes=nodes, options=ServingOptions(**options),
                           model_ref=load_preset(name).repo_id)


@pytest.mark.parametrize(("name", "gpus", "nodes", "sizes"), [
    ("bloomz-176b-gptq", "2x80GB", 1, (2, 1)),
    ("bloomz-176b-gptq", "3x48GB", 1, (1, 3)),  # 112 heads: TP 3 is refused, so 3 pipeline stages
    ("bloomz-176b-gptq", "8x24GB", 1, (8, 1)),
    ("bloomz-176b-gptq", "4x24GB", 2, (4, 2)),  # multi-node: TP = GPUs per node, PP = nodes
    ("opt-iml-30b", "2x80GB", 1, (2, 1)),
    ("opt-iml-30b", "3x48GB", 1, (1, 3)),  # 56 heads
    ("opt-iml-30b", "8x24GB", 1, (8, 1)),
    ("opt-iml-30b", "4x24GB", 2, (4, 2)),
])
def test_chosen_sizes_fit_and_follow_vllm(layouts: dict, name: str, gpus: str, nodes: int,
                                          sizes: tuple[int, int]) -> None:
    plan = _plan(layouts, name, gpus, nodes)
    assert plan.fits
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size) == sizes
    assert all(stage.total_bytes <= plan.budget_bytes for stage in plan.stages)
    assert plan.kernel == "marlin"
    layout = layouts[name][0]
    covered = [layer for stage in plan.stages for layer in range(*stage.layers)]
    assert covered == list(range(sum(block.is_layer for block in layout.blocks)))
    serve = [line for lines in plan.commands.values() for line in lines if line.startswith("vllm serve")]
    assert serve and all(f"--tensor-parallel-size {sizes[0]} --pipeline-parallel-size {sizes[1]}" in line
                         for line in serve)
    if nodes == 1:
        assert list(plan.commands) == ["single_node"]
    else:
        assert list(plan.commands) == ["ray", "multiprocessing"]
        assert "ray start --head --port 6379" in plan.commands["ray"]
        assert serve[0].endswith("--distributed-executor-backend ray")
        assert serve[-1].endswith("--nnodes 2 --node-rank 1 --master-addr HEAD_IP --headless")


def test_weights_split_by_tp_and_stages(layouts: dict) -> None:
    one = _plan(layouts, "bloomz-176b-gptq", "1x200GB")
    two = _plan(layouts, "bloomz-176b-gptq", "2x200GB")
    assert (one.tensor_parallel_size, two.tensor_parallel_size) == (1, 2)
    # TP halves the weights (layer norms are replicated: a little more than half)
    assert one.stages[0].weight_bytes / 2 < two.stages[0].weight_bytes < one.stages[0].weight_bytes * 0.51
    three = _plan(layouts, "bloomz-176b-gptq", "3x48GB")
    # PP > 1 with a tied head: the last stage holds its own copy of the 7.2 GB embedding
    middle, last = three.stages[1], three.stages[2]
    assert last.weight_bytes - middle.weight_bytes > 5 * 1024**3 - 2 * 1.2 * 1024**3


def test_pp_partition_matches_vllm() -> None:
    # vllm.distributed.utils.get_pp_indices: the remainder goes to the stages before the last
    assert pp_partition(70, 3) == [(0, 23), (23, 47), (47, 70)]
    assert pp_partition(48, 5) == [(0, 9), (9, 19), (19, 29), (29, 39), (39, 48)]
    assert pp_partition(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_tp_constraints_name_the_cause(layouts: dict) -> None:
    bloom, _ = layouts["bloomz-176b-gptq"]
    opt, _ = layouts["opt-iml-30b"]
    linears, kv_heads = _linear_shapes(bloom)
    assert tp_problem(bloom, linears, 3, kv_heads=kv_heads) == "TP 3 does not divide the 112 attention heads"
    assert tp_problem(bloom, linears, 16, kv_heads=kv_heads) is None
    linears, kv_heads = _linear_shapes(opt)
    assert tp_problem(opt, linears, 7, kv_heads=kv_heads) == "TP 7 does not divide the vocabulary padded to 50304"
    assert tp_problem(opt, linears, 8, kv_heads=kv_heads) is None
    coarse = replace(opt, settings=replace(opt.settings, group_size=1024))
    assert tp_problem(coarse, linears, 8, kv_heads=kv_heads) == (
        "TP 8 splits the 7168 inputs of self_attn.out_proj into 896, not a multiple of the group size 1024")


def test_refusal_names_the_smallest_change(layouts: dict) -> None:
    plan = _plan(layouts, "bloomz-176b-gptq", "2x40GB")
    assert not plan.fits
    assert plan.reason.startswith("no tensor/pipeline split fits 1 x 2 GPUs of 37.25 GiB: TP 2 x PP 1: stage 0 needs")
    # 3 cards cannot be TP 3 (112 heads): TP 1 x PP 3 needs 39.7 GiB a card, so 4 cards (TP 4), or bigger ones
    assert plan.suggestion.startswith("smallest change that fits: --gpus 4x37.25GiB or GPUs of ")
    exact = int(plan.suggestion.split("; ")[-1].split(" bytes exactly")[0])  # to the byte, not in 1 GiB steps
    printed = plan.suggestion.split("(--gpus 2x")[1].split(";")[0]
    assert _plan(layouts, "bloomz-176b-gptq", f"2x{exact}").fits and _plan(layouts, "bloomz-176b-gptq",
                                                                           f"2x{printed}").fits
    assert not _plan(layouts, "bloomz-176b-gptq", f"2x{exact - 1}").fits
    assert parse_size(printed) - exact < 0.01 * GiB  # rounded up to the printed precision, no further
    short = _plan(layouts, "opt-iml-30b", "1x24GB", max_model_len=2048, max_num_seqs=4)
    assert not short.fits  # the weights fit one card; four sequences' KV cache of 2048 tokens does not
    assert short.suggestion.startswith("smallest change that fits: --max-model-len 512 or --gpus 2x22.35GiB")
    assert _plan(layouts, "opt-iml-30b", "1x24GB", max_model_len=512, max_num_seqs=4).fits


def test_act_order_with_groups_is_refused_like_vllm(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["plan", "bloomz-176b-gptq", "--branch", "group_size_128g", "--engine", "vllm", "--gpus",
                     "8x80GB"])
    out = capsys.readouterr().out
    assert code == 1
    assert "vLLM cannot serve this checkpoint: vLLM 0.32 refuses act-order (desc_act) with groups" in out
    assert "--static-groups or --no-desc-act" in out


def test_cli_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "opt-iml-30b", "--engine", "vllm", "--gpus", "4x24GB", "--nodes", "2"]) == 0
    text = capsys.readouterr().out
    assert "tensor-parallel-size 4, pipeline-parallel-size 2 (kernel: marlin)" in text
    assert "several nodes with Ray:" in text and "several nodes without Ray:" in text
    assert cli_main(["plan", "opt-iml-30b", "--engine", "vllm", "--gpus", "4x24GB", "--nodes", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["fits"], data["tensor_parallel_size"], data["pipeline_parallel_size"]) == (True, 4, 2)
    for line in data["commands"]["multiprocessing"]:
        assert line in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-memory", "0=80GiB"], "--engine vllm takes --gpus (8x80GB: the GPUs of one node), not --max-memory"),
    (["--gpus", "1x80GB,1x48GB"], "--gpus 1x80GB,1x48GB: vLLM runs every rank on equal GPUs"),
    (["--gpus", "2x80GB", "--nodes", "0"], "--nodes 0: give 1 or more"),
    (["--gpus", "2x80GB", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5: give a fraction"),
    (["--gpus", "2x80GB", "--max-model-len", "0"], "--max-model-len and --max-num-seqs must be positive"),
])
def test_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["plan", "opt-iml-30b", "--engine", "vllm", *argv])
    assert code == 2
    assert f"gptq-tools: error: {message}" in capsys.readouterr().err


def test_commands_parse_with_vllms_own_parser(layouts: dict) -> None:
    python = vllm_python()
    if not python.exists():
        pytest.skip(f"no vLLM venv at {python} (make venv-vllm, or set VLLM_PYTHON)")
    plans = [_plan(layouts, name, gpus, nodes) for name in layouts for gpus, nodes in GPU_SETS]
    lines = [line for plan in plans for cmds in plan.commands.values() for line in cmds if line.startswith("vllm ")]
    done = subprocess.run([str(python), str(REPO_ROOT / "tests" / "vllm_parse_commands.py")], input=json.dumps(lines),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert [r["line"] for r in results] == lines
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    for plan in plans:
        for line in (x for cmds in plan.commands.values() for x in cmds if x.startswith("vllm ")):
            args = next(r["args"] for r in results if r["line"] == line)
            assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (
                plan.tensor_parallel_size, plan.pipeline_parallel_size)
            assert args["max_model_len"] == plan.max_model_len
