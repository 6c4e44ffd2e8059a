"""Distributed quantization on ``torch.distributed``: the streaming driver, run on every rank.

Started by ``torchrun --nproc-per-node N -m gptq_tools quantize ...`` (or across nodes with torchrun's
rendezvous; any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
works). Each rank:

* takes a contiguous share of the calibration windows (:func:`share`) and runs the layer forward on it
  only, accumulating its own Hessian sums and row counts;
* reduces every linear's Hessian sum onto the linear's owner rank (owners balanced by solve cost,
  ``in_features ** 3``, greedy bin-packing: :func:`assign_owners`) and all-reduces the row counts;
* the owners solve their linears at the same time (the math is :mod:`gptq_tools.quant.gptq`'s, unchanged)
  and broadcast the integer weights, scales, zeros, ``g_idx`` and the report numbers;
* every rank then applies the quantized weights and computes its share of the layer's outputs, the
  next layer's inputs.

Only rank 0 touches the work folder and the output: it receives the next inputs (:func:`gather_rows`) to
commit each layer, and on ``--resume`` it reads the commit record and hands every rank its share of
the saved inputs (:func:`scatter_rows`), so the other ranks (other nodes) need the model and the
calibration file but no shared file system. A rank that dies or hangs makes the next collective fail
(at once for a closed connection, after ``GPTQ_TOOLS_DIST_TIMEOUT`` seconds for a hang): every rank
raises :class:`~gptq_tools.errors.DistributedError` naming what it was waiting for, and the same command
with ``--resume`` continues from the last layer rank 0 committed.

NCCL is used when the compute device is a GPU, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..constants import dist_timeout_s, distributed_env
from ..errors import DistributedError
from .config import METHODS
from .fp_target import CrossAccumulator
from .gptq import HessianAccumulator, QuantResult

logger = logging.getLogger(__name__)


@dataclass
class DistributedRun:
    """This process's place in a distributed run, and the time it has spent in collectives.

    Attributes:
        rank: global rank (0 writes the work folder and the output).
        world_size: number of ranks.
        local_rank: rank on this node (selects the GPU).
        device: where collectives run (the GPU for NCCL, the CPU for gloo).
        comm_seconds: wall time spent in collectives, waiting for other ranks included.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    comm_seconds: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device: torch.device) -> tuple[DistributedRun | None, torch.device]:
    """Join the process group the launcher described, or return ``(None, device)`` for a single process.

    A GPU device without an index becomes this rank's GPU (``cuda:LOCAL_RANK``).

    Returns:
        (the run or None, the compute device to use).

    Raises:
        DistributedError: the rendezvous failed (the other ranks never came, or the address is wrong).
    """
    env = distributed_env()
    if env is None:
        return None, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env["local_rank"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=dist_timeout_s())
    if not dist.is_initialized():
        # torch.distributed.nn binds group.WORLD as a default argument when first imported, and transformers
        # imports it while building a model. Imported after init_process_group, it would keep the process
        # group (and gloo's worker threads) alive past destroy_process_group, until interpreter shutdown,
        # where a worker still releasing a finished collective aborts the process (SIGABRT, exit -6).
        importlib.import_module("torch.distributed.nn")

        try:
            kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, rank=env["rank"], world_size=env["world_size"], timeout=timeout,
                                    **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {env['rank']} of {env['world_size']}: joining the process group "
                                   f"({backend}) failed ({exc}); check MASTER_ADDR/MASTER_PORT and that every "
                                   f"rank was started") from exc
    run = DistributedRun(env["rank"], env["world_size"], env["local_rank"],
                         device if backend == "nccl" else torch.device("cpu"))
    logger.info("rank %d of %d (%s, compute on %s)", run.rank, run.world_size, backend, device)
    return run, device


def stop(run: DistributedRun | None) -> None:
    """Leave the process group (a no-op for a single process)."""
    if run is not None and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(run: DistributedRun, what: str) -> Iterator[None]:
    """Time a collective and turn a lost peer (closed connection, timeout) into DistributedError."""
    started = time.perf_counter()
    try:
        yield
    except (RuntimeError, ValueError) as exc:  # gloo/NCCL report lost peers as RuntimeError subclasses
        raise DistributedError(f"rank {run.rank} of {run.world_size}: {what} failed ({_first_line(exc)}); another "
                               f"rank died, hung or stopped with an error (see its output). Fix that and rerun "
                               f"the same command with --resume: it continues from the last committed layer"
                               ) from exc
    finally:
        run.comm_seconds += time.perf_counter() - started


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def share(run: DistributedRun | None, count: int) -> slice:
    """This rank's contiguous share of ``count`` calibration windows (shares differ by at most one)."""
    if run is None:
        return slice(0, count)
    return slice(count * run.rank // run.world_size, count * (run.rank + 1) // run.world_size)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: largest cost first onto the least-loaded rank (LPT bin-packing).

    Ties go to the lower rank, so every rank computes the same assignment.
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def broadcast_object(run: DistributedRun, value: Any, *, what: str) -> Any:
    """Rank 0's ``value`` on every rank (small picklable values: the resume point, an error message)."""
    box = [value if run.is_main else None]
    with collective(run, what):
        dist.broadcast_object_list(box, src=0, device=run.device)
    return box[0]


def reduce_hessian(run: DistributedRun, accumulator: HessianAccumulator | CrossAccumulator, owner: int, *,
                   name: str) -> None:
    """Sum every rank's Hessian sum onto ``owner`` (in place) and every rank's row count everywhere; the
    other ranks' sums are freed.

    The sums are fp64 sums of fp32 window products (:func:`~.gptq.add_window`), which add exactly, so the
    owner gets the bits one process would have, for any number of ranks.

    fp-target's cross terms (:class:`~.fp_target.CrossAccumulator`, a sum and a row count too) reduce the same way.
    """
    count = torch.tensor([float(accumulator.count)], dtype=torch.float64, device=run.device)
    summed = accumulator.sum.to(run.device)
    with collective(run, f"reducing the Hessian of {name} onto rank {owner}"):
        dist.reduce(summed, dst=owner, op=dist.ReduceOp.SUM)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    if run.rank != owner:  # this rank's partial sum is spent: free it while the owner solves
        accumulator.sum = torch.empty(0, dtype=accumulator.sum.dtype, device=accumulator.sum.device)
    elif summed is not accumulator.sum:
        accumulator.sum.copy_(summed)
    accumulator.count = int(count.item())


def broadcast_result(run: DistributedRun, owned: tuple[QuantResult, float, float] | None, owner: int, *,
                     name: str, out_features: int, in_features: int, groups: int,
                     device: torch.device) -> tuple[QuantResult, float, float]:
    """``owner``'s (result, rtn_error, seconds) for one linear on every rank, bit for bit.

    Shapes are known everywhere (``(out, in)`` integer weight, ``(groups, out)`` scales and zeros), so
    only tensors travel: no pickling.
    """
    if run.rank == owner:
        if owned is None:
            raise DistributedError(f"rank {run.rank}: owns {name} but has no result for it")
        result, rtn_error, seconds = owned
        tensors = [result.intweight.to(run.device, torch.int32), result.scales.to(run.device, torch.float16),
                   result.zeros.to(run.device, torch.int32), result.g_idx.to(run.device, torch.int32)]
        numbers = torch.tensor([result.error, result.damp_percent, rtn_error, seconds,
                                float(METHODS.index(result.method))], dtype=torch.float64, device=run.device)
    else:
        tensors = [torch.empty(out_features, in_features, dtype=torch.int32, device=run.device),
                   torch.empty(groups, out_features, dtype=torch.float16, device=run.device),
                   torch.empty(groups, out_features, dtype=torch.int32, device=run.device),
                   torch.empty(in_features, dtype=torch.int32, device=run.device)]
        numbers = torch.empty(5, dtype=torch.float64, device=run.device)
    with collective(run, f"receiving the quantized {name} from rank {owner}"):
        for tensor in (*tensors, numbers):
            dist.broadcast(tensor, src=owner)
    if run.rank == owner and owned is not None:
        return owned
    intweight, scales, zeros, g_idx = (t.to(device) for t in tensors)
    error, damp, rtn_error, seconds, method = numbers.tolist()
    result = QuantResult(intweight, scales, zeros, g_idx, error, damp, METHODS[int(method)])
    return result, rtn_error, seconds


def gather_rows(run: DistributedRun, rows: list[torch.Tensor], total: int, *,
                what: str) -> list[torch.Tensor] | None:
    """Every rank's share of the ``total`` rows (each ``(1, ...)``) on rank 0, in window order; None elsewhere."""
    widest = -(-total // run.world_size)
    sample = rows[0] if rows else None
    shape = _row_shape(run, sample, what=what)
    dtype = _row_dtype(run, sample, what=what)
    block = torch.zeros((widest, *shape), dtype=dtype, device=run.device)
    for i, row in enumerate(rows):
        block[i].copy_(row[0])
    blocks = [torch.empty_like(block) for _ in range(run.world_size)] if run.is_main else None
    with collective(run, f"gathering {what} on rank 0"):
        dist.gather(block, blocks, dst=0)
    if blocks is None:
        return None
    store = rows[0].device if rows else torch.device("cpu")
    gathered = []
    for rank, received in enumerate(blocks):
        count = total * (rank + 1) // run.world_size - total * rank // run.world_size
        gathered.extend(received[i:i + 1].to(store) for i in range(count))
    return gathered


def scatter_rows(run: DistributedRun, rows: list[torch.Tensor] | None, total: int, *,
                 store: torch.device, what: str) -> list[torch.Tensor]:
    """Rank 0's ``total`` rows (each ``(1, ...)``) handed out: every rank gets its own :func:`share`."""
    sample = rows[0] if rows else None
    shape = _row_shape(run, sample, what=what)
    dtype = _row_dtype(run, sample, what=what)
    full = (torch.cat(rows).to(run.device) if run.is_main and rows is not None
            else torch.empty((total, *shape), dtype=dtype, device=run.device))
    with collective(run, f"receiving {what} from rank 0"):
        dist.broadcast(full, src=0)
    mine = share(run, total)
    return [full[i:i + 1].to(store).clone() for i in range(mine.start, mine.stop)]


def _row_shape(run: DistributedRun, sample: torch.Tensor | None, *, what: str) -> tuple[int, ...]:
    """One row's shape, agreed by all ranks (a rank with no rows learns it from rank 0)."""
    shape = broadcast_object(run, tuple(sample.shape[1:]) if sample is not None else None, what=f"the shape of {what}")
    if shape is None:
        raise DistributedError(f"rank 0 has no {what}; use at least as many calibration windows as ranks")
    return tuple(shape)


def _row_dtype(run: DistributedRun, sample: torch.Tensor | None, *, what: str) -> torch.dtype:
    name = broadcast_object(run, str(sample.dtype).removeprefix("torch.") if sample is not None else None,
                            what=f"the dtype of {what}")
    return getattr(torch, name)
