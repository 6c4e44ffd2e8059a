"""Distributed quantization on CPU with gloo: ranks on 127.0.0.1 started the way torchrun starts them."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model
from gptq_tools.quant import driver as driver_module
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.distributed import assign_owners, share
from gptq_tools.quant.driver import quantize_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = TinySpec(hidden=64, layers=2, heads=2, vocab_size=512, seqlen=64, batch=8, steps=40)
# plain GPTQ: the Hessian recording below patches its solver (fp-target has its own test)
ARGS = ("--bits", "4", "--group-size", "32", "--nsamples", "12", "--seqlen", "64", "--single-file", "--method", "gptq")


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("opt", tmp_path_factory.mktemp("dist") / "opt", spec=SPEC)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(world: int, model: Path, out: Path, *, record: Path | None = None, kill: tuple[int, int] | None = None,
            resume: bool = False, timeout: float = 240, extra: tuple[str, ...] = ()
            ) -> list[subprocess.CompletedProcess[str]]:
    """Start ``world`` ranks like torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); wait."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1", "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "GPTQ_TOOLS_DIST_TIMEOUT": "60"}
        kill_at = str(kill[1]) if kill and kill[0] == rank else "-"
        argv = [sys.executable, str(REPO_ROOT / "tests" / "dist_rank.py"), str(record) if record else "-", kill_at,
                "--", "quantize", str(model), "-o", str(out), "--calibration", str(model / "train.txt"), *ARGS, *extra]
        procs.append(subprocess.Popen(argv + (["--resume"] if resume else []), env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def _single_process_hessians(model: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    hessians: dict[str, torch.Tensor] = {}
    real = driver_module._quantize_linear

    def recording(name: str, W: torch.Tensor, H: torch.Tensor, config: QuantizeConfig,  # noqa: N803
                  method: str) -> object:
        hessians[name] = H.clone()
        return real(name, W, H, config, method)

    monkeypatch.setattr(driver_module, "_quantize_linear", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: a GEMM's last bits may depend on its thread count
    try:
        quantize_model(model, out, calibration=model / "train.txt",
                       config=QuantizeConfig(group_size=32, method="gptq"), nsamples=12, seqlen=64, single_file=True)
    finally:
        torch.set_num_threads(threads)
    return hessians


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_sum_the_same_hessians_as_one_process(tiny_opt: Path, tmp_path: Path, world: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    single = _single_process_hessians(tiny_opt, tmp_path / "single", monkeypatch)
    record = tmp_path / "record"
    record.mkdir()
    results = _launch(world, tiny_opt, tmp_path / "dist", record=record)
    assert [r.returncode for r in results] == [0] * world, [r.stderr[-2000:] for r in results]
    assert "quantized 12 linears in 2 layers" in results[0].stdout
    assert f"distributed over {world} ranks: " in results[0].stdout
    assert all(r.stdout == "" for r in results[1:])  # only rank 0 reports
    distributed = {path.stem: torch.load(path) for path in record.glob("*.pt")}
    assert sorted(distributed) == sorted(single)  # every linear solved exactly once, on its owner
    for name in single:  # windows summed on other ranks, in fp64: the same bits as one process
        assert torch.equal(distributed[name], single[name]), name
    ours, theirs = _weights(tmp_path / "dist"), _weights(tmp_path / "single")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert not list(tmp_path.glob(".dist*"))  # the staging folder is gone: rank 0 published


def test_fp_target_on_two_ranks_matches_one_process(tiny_opt: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from gptq_tools.quant.evaluate import compare_to_reference, load_for_eval, log_probs

    extra = ("--method", "fp-target", "--bits", "3")
    single = _launch(1, tiny_opt, tmp_path / "one", extra=extra)
    double = _launch(2, tiny_opt, tmp_path / "two", extra=extra)
    assert [r.returncode for r in single + double] == [0, 0, 0], [r.stderr[-2000:] for r in single + double]
    assert "round-to-nearest fallback" not in double[0].stdout
    tokenizer = AutoTokenizer.from_pretrained(tiny_opt)
    ids = torch.tensor(tokenizer((tiny_opt / "eval.txt").read_text()[:8000])["input_ids"])
    reference = log_probs(load_for_eval(tiny_opt), ids, seqlen=64)
    kl_one = compare_to_reference(load_for_eval(tmp_path / "one"), ids, reference, seqlen=64)[1]
    kl_two = compare_to_reference(load_for_eval(tmp_path / "two"), ids, reference, seqlen=64)[1]
    assert kl_two <= 1.01 * kl_one, (kl_one, kl_two)  # the bar: within 1.01x of one rank
    ours, theirs = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert sorted(ours) == sorted(theirs)
    for name in ours:  # Hessians and cross terms sum to the same bits on any number of ranks
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((tmp_path / "two" / "quantize_config.json").read_text())["meta"]["method"] == "fp-target"


def test_killed_rank_fails_the_run_and_resume_matches(tiny_opt: Path, tmp_path: Path) -> None:
    clean = _launch(2, tiny_opt, tmp_path / "clean")
    assert [r.returncode for r in clean] == [0, 0], [r.stderr[-2000:] for r in clean]
    killed = _launch(2, tiny_opt, tmp_path / "out", kill=(1, 1))  # rank 1 dies as layer 1 starts
    assert killed[1].returncode == -9
    assert killed[0].returncode == 1
    assert "gptq-tools: error: rank 0 of 2:" in killed[0].stderr
    assert "another rank died" in killed[0].stderr and "--resume" in killed[0].stderr
    assert "Traceback" not in killed[0].stderr
    assert not (tmp_path / "out").exists()
    resumed = _launch(2, tiny_opt, tmp_path / "out", resume=True)
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr[-2000:] for r in resumed]
    assert "(resumed at layer 1;" in resumed[0].stdout
    names = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_fewer_windows_than_ranks_is_refused(tiny_opt: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GPTQ_TOOLS_DIST_TIMEOUT": "30"}
    argv = [sys.executable, "-m", "gptq_tools", "quantize", str(tiny_opt), "-o", str(tmp_path / "o"), "--calibration",
            str(tiny_opt / "train.txt"), "--group-size", "32", "--nsamples", "2", "--seqlen", "32"]
    others = [subprocess.Popen(argv, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(3)]
    outputs = [proc.communicate(timeout=120) for proc in others]
    for proc, (_, stderr) in zip(others, outputs):
        assert proc.returncode == 2, stderr
        assert "gptq-tools: error: 2 calibration windows for 3 ranks; use --nsamples 3 or more" in stderr
    assert not (tmp_path / "o").exists()


def test_shares_cover_every_window_once() -> None:
    from gptq_tools.quant.distributed import DistributedRun

    for world in (1, 2, 3, 5):
        runs = [DistributedRun(rank, world, rank, torch.device("cpu")) for rank in range(world)]
        covered = [i for run in runs for i in range(*share(run, 11).indices(11))]
        assert covered == list(range(11))
    assert share(None, 7) == slice(0, 7)


def test_owners_balance_solve_cost() -> None:
    # OPT's first group (three equal linears) on 2 ranks: 2 + 1; BLOOM's fc2-like 4x cost alone on its rank
    assert assign_owners([8.0, 8.0, 8.0], 2) == [0, 1, 0]
    assert assign_owners([1.0, 64.0, 1.0, 1.0], 2) == [1, 0, 1, 1]
    assert assign_owners([5.0], 3) == [0]


def test_single_process_makes_no_collective(tiny_opt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: still a plain single process
    summary = quantize_model(tiny_opt, tmp_path / "out", calibration=tiny_opt / "train.txt",
                             config=QuantizeConfig(group_size=32), nsamples=4, seqlen=32)
    assert not torch.distributed.is_initialized()
    assert (summary.rank, summary.world_size, summary.comm_seconds) == (0, 1, 0.0)


def test_rank0_refusal_reaches_every_rank(tiny_opt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    results = _launch(2, tiny_opt, out)
    assert [r.returncode for r in results] == [1, 1]
    assert "gptq-tools: error: " + str(out) + ": output folder is not empty" in results[0].stderr
    assert ("gptq-tools: error: rank 1: rank 0 stopped before starting: " + str(out) + ": output folder is not "
            "empty") in results[1].stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out*"))


_STOP_PROBE = """
import os, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from gptq_tools.quant import distributed

run, _ = distributed.start(torch.device("cpu"))
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))  # imports torch.distributed.nn
distributed.broadcast_object(run, "ready", what="a probe")
distributed.stop(run)
print(sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list threads")
def test_stop_ends_gloo_threads_after_building_a_model(tiny_opt: Path) -> None:
    # A process group kept alive past stop() leaves gloo workers running into interpreter shutdown, where
    # one releasing a finished collective aborts the process (exit -6 instead of the command's status).
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _STOP_PROBE, str(tiny_opt)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "RANK": str(rank), "WORLD_SIZE": "2",
                                   "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "OMP_NUM_THREADS": "1"})
             for rank in range(2)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        threads = ast.literal_eval(stdout.strip().splitlines()[-1])
        assert not [name for name in threads if "gloo" in name or "tcpstore" in name], threads
