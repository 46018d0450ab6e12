"""Runs under ``torchrun`` (DistributedDataParallel): the few rank-aware helpers that the runner
and the one training loop (``cilearn.train.fit``) use. In a single process every helper is the
identity (or a no-op), so a run without torchrun computes exactly what it always did.

The scheme (README, "Multi-GPU and clusters"):

* **one source of truth, rank 0**: the process group is ``gloo`` on CPU machines and
  ``cpu:gloo,cuda:nccl`` where CUDA is available (CUDA tensors over NCCL, small control messages
  and pickled objects over gloo); process ``r`` trains on ``cuda:LOCAL_RANK``. Every stage of
  ``fit`` starts from rank 0's model and RNG state, and every phase ends with rank 0's model, RNG
  state and exemplar memory broadcast to all ranks.
* **global batch = ``--batch-size``**: every rank holds the whole (uint8) data set and draws the same
  seeded permutation and the same augmentation parameters for each global batch; rank ``r`` takes
  its contiguous part of that batch (``shard_span``). The union of the ranks' parts is the batch a
  single process would train on; the loss of each part is weighted by its share so that DDP's
  average of the gradients is the gradient of the global batch's mean loss. BatchNorm statistics
  are per rank (no SyncBatchNorm), the one difference from a single-process run.
* **evaluation and embeddings are sharded and gathered** (``gather_rows``): each rank predicts its
  contiguous part of the test set (or of the images to embed), all-gathered in rank order, so every
  rank holds the same outputs and computes the same metrics and the same exemplar selection.
* **outputs by rank 0 only**: log, config, checkpoints, metrics, figures, progress bars.
* refusals: ``check_config`` names what does not run distributed yet.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Any, Callable, Iterable, NoReturn, TypeVar

import torch

from .errors import CilearnError, ConfigError

T = TypeVar("T")


# ---------------------------------------------------------------- who am I
def launched() -> bool:
    """True in a process started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialized() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the job (1 without torchrun or before ``init``)."""
    if not initialized():
        return 1
    import torch.distributed as dist
    return dist.get_world_size()


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK`` (0 alone)."""
    if initialized():
        import torch.distributed as dist
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes outputs, logs and shows progress bars."""
    return rank() == 0


def init() -> None:
    """Join torchrun's process group (env:// rendezvous) once; a no-op without torchrun. Where CUDA is
    available, binds this process to ``cuda:LOCAL_RANK``."""
    if not launched() or initialized():
        return
    import torch.distributed as dist
    if not dist.is_available():
        raise ConfigError("torchrun started several processes, but this PyTorch build has no torch.distributed")
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")


def backend() -> str | None:
    if not initialized():
        return None
    import torch.distributed as dist
    return str(dist.get_backend())


def shutdown() -> None:
    """Leave the process group in order: a barrier (no rank tears down while another still
    communicates), then ``destroy_process_group``. A no-op without one."""
    if initialized():
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with exit code ``code``, after ``shutdown``.

    Under torchrun the interpreter is not finalized (``os._exit`` after flushing stdout/stderr):
    DistributedDataParallel keeps references to the gloo process group that ``destroy_process_group``
    cannot drop, so the group's worker threads (``pt_gloo_runloop``) outlive it; a worker that
    releases the tensors of a finished collective needs the GIL, and if that happens while the
    interpreter finalizes, it is killed inside a C++ destructor and the process aborts with SIGABRT
    ("terminate called without an active exception"; pytorch/pytorch#190489). Seen at exit of a
    torchrun rank about one run in three on 2 busy cores (benchmarks/RESULTS.md, "torchrun exit").
    Every output is written, fsynced and closed before this point. Without torchrun: ``sys.exit``."""
    if launched():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


# ---------------------------------------------------------------- config
def check_config(cfg, components: list[type]) -> None:
    """Refuse, with one line naming the component, what cannot run correctly in several processes
    yet (a component's ``single_process`` says why). Called on every rank before anything is written."""
    if not launched():
        return
    n = os.environ.get("WORLD_SIZE")
    for c in components:
        if c.single_process:
            raise ConfigError(f"{c.kind} component {c.name} (method {cfg.method}) does not run under torchrun yet "
                              f"({n} processes): {c.single_process}; run it in one process")


# ---------------------------------------------------------------- sharding
def shard_span(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """Rank ``rank_``'s contiguous part of ``n`` rows split over ``world`` ranks: sizes differ by at
    most one, the first ``n % world`` ranks taking one more (``torch.tensor_split``'s rule). With one
    process: ``slice(0, n)``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def gather_rows(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn(x)`` computed in parts: each rank applies ``fn`` to its ``shard_span`` of the rows of ``x``
    and the outputs (a tuple of ``[rows, ...]`` tensors) are all-gathered in rank order, so every
    rank returns the same ``[N, ...]`` tensors. One process, or fewer rows than ranks: ``fn(x)``."""
    w = world_size()
    if w == 1 or x.shape[0] < w:
        return fn(x)
    import torch.distributed as dist
    n = x.shape[0]
    mine = fn(x[shard_span(n)])
    longest = shard_span(n, 0, w).stop          # rank 0's part is the longest
    out = []
    for t in mine:
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[: len(range(n)[shard_span(n, r, w)])] for r, p in enumerate(parts)]))
    return tuple(out)


# ---------------------------------------------------------------- collectives
def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks, in place (identity in one process)."""
    if world_size() > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank (a CPU all-reduce: no GPU sync)."""
    if world_size() == 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _raise_shared(err: tuple[str, str] | None) -> None:
    if err is None:
        return
    kind, msg = err
    cls = next((c for c in _error_classes() if c.__name__ == kind), CilearnError)
    raise cls(msg)


def _error_classes() -> list[type]:
    out, todo = [], [CilearnError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def _attempt(fn: Callable[[], T]) -> tuple[T | None, tuple[str, str] | None]:
    try:
        return fn(), None
    except CilearnError as e:
        return None, (type(e).__name__, str(e))


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its (picklable) result broadcast to every rank; a ``CilearnError`` raised
    there is raised on every rank (so that no rank waits for the others forever)."""
    if world_size() == 1:
        return fn()
    got = _attempt(fn) if is_main() else (None, None)
    value, err = broadcast_object(got)
    _raise_shared(err)
    return value


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, rank 0 first (e.g. loading a data set: rank 0 builds the decoding cache,
    the others read it). Each rank keeps its own result; a ``CilearnError`` on any rank is raised on
    every rank."""
    if world_size() == 1:
        return fn()
    value, err = _attempt(fn) if is_main() else (None, None)
    _raise_shared(broadcast_object(err))
    if not is_main():
        value, err = _attempt(fn)
    _raise_shared(next((e for e in all_gather_object(err) if e is not None), None))
    return value  # type: ignore[return-value]


def broadcast_module_(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers copied into ``module`` on every rank, in place."""
    if world_size() == 1:
        return
    import torch.distributed as dist
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_contiguous():
                dist.broadcast(t.data, src=0)
            else:                       # channels-last weights: broadcast a dense copy
                c = t.data.contiguous()
                dist.broadcast(c, src=0)
                t.data.copy_(c)


def broadcast_tensors(tensors: dict[Any, torch.Tensor], device: torch.device) -> dict[Any, torch.Tensor]:
    """Rank 0's dict of tensors (keys, shapes and dtypes included) on every rank, on ``device``."""
    if world_size() == 1:
        return tensors
    import torch.distributed as dist
    meta = broadcast_object({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} if is_main() else None)
    out = {}
    for k, (shape, dtype) in meta.items():
        t = tensors[k].to(device).contiguous() if is_main() else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        out[k] = t
    return out


def broadcast_generator_(gen: torch.Generator) -> None:
    """Rank 0's state of ``gen`` on every rank (the data order and augmentation stream)."""
    if world_size() > 1:
        gen.set_state(broadcast_object(gen.get_state()))


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 (hex, first 16 digits) of the tensors' dtypes, shapes and bytes, in order: equal
    digests mean bit-identical tensors."""
    h = hashlib.sha256()
    for t in tensors:
        c = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{c.dtype}{tuple(t.shape)}".encode())
        h.update(c.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- DDP
class _Trained(torch.nn.Module):
    """What DistributedDataParallel wraps in ``fit``: exactly the parameters the stage trains, and
    the stage's loss function as ``forward``. Methods call their networks directly inside the loss
    (teachers, caches, auxiliary heads), so the loss, not the network, is the module whose forward
    DDP sees; its gradient hooks sit on the trained parameters."""

    def __init__(self, params: list[torch.nn.Parameter], loss_fn: Callable):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(batch)


def data_parallel(loss_fn: Callable, params: list[torch.nn.Parameter]) -> Callable:
    """``loss_fn`` wrapped so that ``backward`` averages the gradients of ``params`` over the ranks
    (DistributedDataParallel); ``loss_fn`` itself in one process."""
    if world_size() == 1:
        return loss_fn
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(_Trained(params, loss_fn))   # no buffers: BatchNorm stays per rank
