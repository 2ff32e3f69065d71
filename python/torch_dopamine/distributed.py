"""Dopamine over ``torch.distributed``: the ranks exchange losses, never
parameters (docs/DESIGN.md, "Many processes").

The noise is a pure function of (seed, step, parameter index, element index),
so every rank can draw every other rank's perturbation. With
``parallel="data"`` each rank's closure returns the loss of its own shard of
the batch; a step sums ``[L0, L1, failed]`` over the ranks in one all-reduce
of three float64 numbers (24 bytes, whatever the model's size), and every
rank applies the same update to its own copy of the parameters.
"""

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["PARALLEL_MODES", "Collective", "checksum"]

PARALLEL_MODES = ("data", "population")


def checksum(tensors: Sequence[torch.Tensor]) -> int:
    """The ``dopamine::digest`` op (the C++ optimizer's too): a 63-bit digest
    of the tensors' sizes and bytes, in order, which a single differing word
    always changes."""
    tensors = list(tensors)
    return torch.ops.dopamine.digest(tensors) if tensors else 0


def _first_difference(ours: Any, theirs: Any, path: str = "") -> Optional[str]:
    """Where two configurations (nested dicts and lists) first differ, as
    'path: theirs there, ours on rank 0', or None when they are equal."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in [key for key in ours if key in theirs]:
            found = _first_difference(ours[key], theirs[key], f"{path} {key}".strip())
            if found:
                return found
        if ours.keys() != theirs.keys():
            return f"{path or 'keys'}: {sorted(theirs)} there, {sorted(ours)} on rank 0"
        return None
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return f"{path}: {len(theirs)} entries there, {len(ours)} on rank 0"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            found = _first_difference(a, b, f"{path} {i}")
            if found:
                return found
        return None
    return None if ours == theirs else f"{path}: {theirs!r} there, {ours!r} on rank 0"


class Collective:
    """The collectives of one distributed Dopamine optimizer: the
    configuration check at construction, the losses' all-reduce in every
    step, and the optional drift check."""

    def __init__(self, process_group: Any, parallel: str, verify_every: int):
        if not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(
                f"Dopamine: invalid process_group: {process_group!r} (expected a "
                "torch.distributed ProcessGroup, such as torch.distributed.group.WORLD, or None)"
            )
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"Dopamine: invalid parallel: {parallel!r} (expected one of {', '.join(PARALLEL_MODES)})")
        if parallel == "population":
            raise ValueError(
                "Dopamine: invalid parallel: 'population' needs num_perturbations, which this "
                "version does not implement yet; use parallel='data'"
            )
        self.group = process_group
        self.parallel = parallel
        self.verify_every = verify_every
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        # NCCL reduces only CUDA tensors; gloo (and others) take CPU ones.
        backend = str(dist.get_backend(process_group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def check_configuration(self, configuration: Any) -> None:
        """Raises ValueError on every rank unless every rank describes the
        same configuration (options, parameter shapes, dtypes and values):
        ranks built differently would otherwise drift apart silently."""
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, configuration, group=self.group)
        for rank, theirs in enumerate(gathered[1:], start=1):
            difference = _first_difference(gathered[0], theirs)
            if difference:
                raise ValueError(
                    f"Dopamine: rank {rank} of the process group was built differently from rank 0 "
                    f"({difference}); every rank must build the optimizer with the same options over "
                    "the same parameters (shapes, dtypes and values: seed the model alike, or "
                    "broadcast rank 0's parameters before building the optimizer)"
                )

    def mean_losses(self, losses: Optional[torch.Tensor], failure: Optional[BaseException]) -> torch.Tensor:
        """The mean over the ranks of this rank's losses (a float64 tensor of
        two), from one all-reduce. A rank whose evaluation failed passes
        ``failure`` instead; then every rank raises RuntimeError naming the
        failing ranks and their errors."""
        buffer = torch.zeros(3, dtype=torch.float64, device=self.device)
        if failure is None:
            buffer[:2] = losses
        else:
            buffer[2] = 1
        dist.all_reduce(buffer, group=self.group)
        # The sum is the same bits on every rank, so the ranks agree on
        # whether to fail, and the mean is the same on every rank.
        if failure is not None or buffer[2].item() != 0:
            messages: List[Any] = [None] * self.world_size
            mine = None if failure is None else f"{type(failure).__name__}: {failure}"
            dist.all_gather_object(messages, mine, group=self.group)
            failed = "; ".join(f"rank {rank}: {message}" for rank, message in enumerate(messages) if message)
            raise RuntimeError(
                f"Dopamine: the closure failed on {failed}; parameters restored on every rank, "
                "step not taken"
            ) from failure
        return (buffer[:2] / self.world_size).to(losses.device)

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
