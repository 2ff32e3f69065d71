"""Dopamine over ``torch.distributed``: the ranks exchange losses, never
parameters (docs/DESIGN.md, "Many processes").

The noise is a pure function of (seed, step, direction, parameter index,
element index), so every rank can draw every other rank's perturbation. A step
sums ``[losses..., failed]`` over the ranks in one all-reduce of float64
numbers (8 per evaluation plus 8: 32 bytes with the default two directions,
whatever the model's size), and every
rank applies the same update to its own copy of the parameters. With
``parallel="data"`` each rank's closure returns the loss of its own shard of
the batch, and the step takes the mean over the ranks. With
``parallel="population"`` every rank's closure returns the loss of the same
batch; rank 0 evaluates the unperturbed loss and rank r the directions r,
r + W, ... of the ``num_perturbations``, passing 0 for the others, so the sum
holds each loss as the one rank that evaluated it computed it.
"""

import math
from typing import Any, List, NoReturn, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch before 2.5 keeps it private; no DTensor support
    DTensor = Replicate = Shard = None

__all__ = [
    "PARALLEL_MODES", "Collective", "check_parallel", "check_sharding", "checksum", "describe", "held_alike",
    "is_dtensor", "local_pieces", "replicated",
]

PARALLEL_MODES = ("data", "population")


def check_parallel(parallel: Any, num_perturbations: int, world_size: int) -> None:
    """Raises ValueError unless ``parallel`` is a mode, and with
    ``"population"`` the directions divide evenly among the ranks."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"Dopamine: invalid parallel: {parallel!r} (expected 'data' or 'population')")
    if parallel == "population" and num_perturbations % world_size:
        raise ValueError(
            f"Dopamine: invalid num_perturbations: {num_perturbations} with parallel='population' "
            f"(expected a multiple of the process group's {world_size} ranks, each evaluating as "
            "many directions; the default is 4)"
        )


def is_dtensor(param: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(param, DTensor)


def check_sharding(param: torch.Tensor, where: str) -> None:
    """Raises ValueError unless `param` is a plain tensor or a DTensor the
    ops can update shard by shard: a 1-D mesh, placement Shard(0), Shard(1)
    or Replicate(), and a contiguous local tensor."""
    if not is_dtensor(param):
        return
    placements = tuple(param.placements)
    supported = len(placements) == 1 and (
        isinstance(placements[0], Replicate) or (isinstance(placements[0], Shard) and placements[0].dim in (0, 1))
    )
    if param.device_mesh.ndim != 1 or not supported:
        raise ValueError(
            f"{where} is a DTensor placed {placements} on a {param.device_mesh.ndim}-D mesh; Dopamine supports "
            "Shard(0), Shard(1) and Replicate() on a 1-D mesh"
        )
    if not param.to_local().is_contiguous():
        raise ValueError(f"{where} is a DTensor whose local tensor is not contiguous")


def local_pieces(param: torch.Tensor) -> List[Tuple[torch.Tensor, int]]:
    """The tensors the ops update for a parameter, each with the place of its
    first element in the whole parameter's row-major order (its noise is
    that of those places): a plain tensor is itself at 0. A DTensor's local
    shard along dim d is, for each index of the dims before d, one block
    that is contiguous both in the shard and in the whole (torch splits a
    dim of n into chunks of ceil(n / W))."""
    if not is_dtensor(param):
        return [(param, 0)]
    local = param.to_local()
    placement = param.placements[0]
    if isinstance(placement, Replicate) or local.numel() == 0:
        return [(local, 0)] if local.numel() else []
    dim, shape, rank = placement.dim, tuple(param.shape), param.device_mesh.get_local_rank()
    chunk = -(-shape[dim] // param.device_mesh.size())
    start = min(rank * chunk, shape[dim])
    expected = min(chunk, shape[dim] - start)
    if local.shape[dim] != expected:
        raise ValueError(
            f"Dopamine: a DTensor of shape {list(shape)} has a local shard of {local.shape[dim]} along dim {dim} on "
            f"mesh rank {rank}, not torch's chunk of {expected}; uneven shards of another split are not supported"
        )
    prefix, rest = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    blocks = local.view(prefix, -1)
    return [(blocks[p], (p * shape[dim] + start) * rest) for p in range(prefix)]


def replicated(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor of `param` that every rank holds alike: a plain tensor,
    or a replicated DTensor's local tensor; None for a sharded one."""
    if not is_dtensor(param):
        return param
    return param.to_local() if isinstance(param.placements[0], Replicate) else None


def held_alike(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors of `params` that every rank holds alike (what the
    configuration check and verify_every compare): not the shards of
    sharded parameters."""
    tensors = [replicated(param) for param in params]
    return [tensor for tensor in tensors if tensor is not None]


def describe(param: torch.Tensor) -> str:
    """A parameter as the configuration check compares it."""
    text = f"{list(param.shape)} {param.dtype}"
    if is_dtensor(param):
        text += f" {tuple(param.placements)}"
    return text + ("" if param.requires_grad else " frozen")


def checksum(tensors: Sequence[torch.Tensor]) -> int:
    """The ``dopamine::digest`` op (the C++ optimizer's too): a 64-bit digest
    of the tensors' sizes and bytes, in order, which a single differing word
    always changes."""
    return torch.ops.dopamine.digest(list(tensors))


def _first_difference(ours: Any, theirs: Any, path: str = "") -> Optional[str]:
    """Where two configurations (nested dicts) first differ, as 'path:
    theirs there, ours on rank 0', or None when they are equal. A key only
    one of them has reads as None in the other."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in list(ours) + [key for key in theirs if key not in ours]:
            found = _first_difference(ours.get(key), theirs.get(key), f"{path} {key}".strip())
            if found:
                return found
        return None
    return None if ours == theirs else f"{path}: {theirs!r} there, {ours!r} on rank 0"


class Collective:
    """The collectives of one distributed Dopamine optimizer: the
    configuration check at construction, the losses' all-reduce in every
    step, and the optional drift check. Every rank makes the same ones in
    the same order, whatever fails where."""

    def __init__(self, process_group: "dist.ProcessGroup", parallel: str, verify_every: int):
        self.group = process_group
        self.parallel = parallel
        self.verify_every = verify_every
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        # NCCL reduces only CUDA tensors; gloo (and others) take CPU ones.
        backend = str(dist.get_backend(process_group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def evaluates(self, offset: int, direction: int) -> bool:
        """Whether this rank evaluates the loss at ``offset * sigma *
        z_direction``: every one with ``"data"``; with ``"population"``,
        rank 0 the unperturbed loss and rank r the directions r, r + W, ..."""
        if self.parallel == "data":
            return True
        if offset == 0:
            return self.rank == 0
        return direction % self.world_size == self.rank

    def check_configuration(self, configuration: Any, refused: Optional[BaseException]) -> None:
        """Raises ValueError on every rank unless every rank describes the
        same configuration (options, parameter shapes, dtypes and values):
        ranks built differently would otherwise drift apart silently. A rank
        that ``refused`` its arguments passes its error instead; it raises
        that error, and the others name it."""
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, {"refused": f"{refused}"} if refused else configuration, group=self.group)
        failed = {rank: entry["refused"] for rank, entry in enumerate(gathered) if "refused" in entry}
        if refused:
            raise refused
        if failed:
            raise ValueError(
                "Dopamine: " + "; ".join(f"rank {rank} refused its arguments ({message})" for rank, message in failed.items())
            )
        for rank, theirs in enumerate(gathered[1:], start=1):
            difference = _first_difference(gathered[0], theirs)
            if difference:
                raise ValueError(
                    f"Dopamine: rank {rank} of the process group was built differently from rank 0 "
                    f"({difference}); every rank must build the optimizer with the same options over "
                    "the same parameters (shapes, dtypes and values: seed the model alike, or "
                    "broadcast rank 0's parameters before building the optimizer)"
                )

    def _sum(self, losses: Optional[torch.Tensor], count: int, failure: Optional[BaseException] = None) -> torch.Tensor:
        """The all-reduce of [losses..., failed] that every step makes; a
        rank whose evaluation failed passes its error and no losses."""
        buffer = torch.zeros(count + 1, dtype=torch.float64, device=self.device)
        if losses is None:
            buffer[count] = 1
        else:
            buffer[:count] = losses
        dist.all_reduce(buffer, group=self.group)
        # The sum has the same bits on every rank, so the ranks agree on
        # whether to fail, and the losses are the same on every rank.
        if buffer[count].item() != 0:
            self._raise_failures(failure)
        return buffer[:count]

    def _raise_failures(self, failure: Optional[BaseException]) -> NoReturn:
        messages: List[Any] = [None] * self.world_size
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        dist.all_gather_object(messages, mine, group=self.group)
        failed = "; ".join(f"rank {rank}: {message}" for rank, message in enumerate(messages) if message)
        raise RuntimeError(
            f"Dopamine: the closure failed on {failed}; parameters restored on every rank, step not taken"
        ) from failure

    def share_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """Every rank's losses from this rank's (a float64 tensor, 0 where
        this rank evaluates nothing): with ``"data"`` the mean over the
        ranks, with ``"population"`` each loss as the rank that evaluated it
        computed it. Raises RuntimeError on every rank if any rank's
        evaluation failed (that rank called :meth:`fail`)."""
        total = self._sum(losses, len(losses))
        return (total / self.world_size if self.parallel == "data" else total).to(losses.device)

    def fail(self, failure: BaseException, count: int) -> NoReturn:
        """This rank's evaluation failed (and it restored its parameters):
        joins the step's all-reduce of ``count`` losses, then raises
        RuntimeError naming every failing rank and its error, as every other
        rank does."""
        self._sum(None, count, failure)  # counts this rank's failure, so it raises

    def verify(self, tensors: Sequence[torch.Tensor], step: int) -> None:
        """Every ``verify_every`` steps: raises RuntimeError on every rank if
        the tensors (the parameters and master weights) differ between ranks."""
        if not self.verify_every or step % self.verify_every:
            return
        gathered = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        mine = torch.tensor([checksum(tensors)], dtype=torch.int64, device=self.device)
        dist.all_gather(gathered, mine, group=self.group)
        drifted = [rank for rank, value in enumerate(gathered) if not torch.equal(value, gathered[0])]
        if drifted:
            raise RuntimeError(
                f"Dopamine: after step {step} the parameters of rank(s) {drifted} differ from rank 0's; "
                "the ranks have drifted apart (were parameters changed outside the optimizer on some "
                "ranks, or the closures' losses not reduced as the optimizer assumes?)"
            )
