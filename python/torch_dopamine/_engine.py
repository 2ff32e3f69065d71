"""What a step and its replay share: a group's tensors as the step ops take
them, moved between perturbations and finished (docs/DESIGN.md, "The step
protocol")."""

from typing import Any, Dict, List, Optional, Sequence

import torch


class GroupTensors:
    """One group's trainable parameters, their global indices (which key
    their noise), master weights and state, the keyword arguments of its
    perturbation (seed, sigma, noise), and the perturbation the parameters
    carry: ``carried`` times sigma times the noise of direction
    ``carried_direction``. A tensor that is a piece of a sharded parameter
    has the place of its first element in ``element_offsets`` (else 0)."""

    def __init__(self, params: List[torch.Tensor], indices: List[int], masters: List[torch.Tensor],
                 state: torch.Tensor, perturb: Dict[str, Any], element_offsets: Optional[List[int]] = None):
        self.params = params
        self.indices = indices
        self.element_offsets = element_offsets if element_offsets is not None else [0] * len(params)
        self.masters = masters
        self.state = state
        self.perturb_arguments = perturb
        self.carried = 0
        self.carried_direction = 0

    def carries(self, offset: int, direction: int = 0) -> bool:
        """Whether the parameters carry offset * sigma * z_direction (any
        direction carries offset 0)."""
        return self.carried == offset and (not offset or self.carried_direction == direction)

    def come_to(self, offset: int, direction: int = 0) -> None:
        """The parameters come to carry offset * sigma * z_direction, through
        theta when they carry another direction (nothing to do if they
        already do)."""
        if self.carries(offset, direction):
            return
        if self.carried and self.carried_direction != direction:
            self._perturb(0, self.carried_direction)
        if self.carried != offset:
            self._perturb(offset, direction)

    def _perturb(self, offset: int, direction: int) -> None:
        torch.ops.dopamine.perturb_(
            self.params,
            self.masters,
            self.state,
            indices=self.indices,
            previous=self.carried,
            offset=offset,
            direction=direction,
            element_offsets=self.element_offsets,
            **self.perturb_arguments,
        )
        self.carried = offset
        self.carried_direction = direction


def finish(groups: Sequence[GroupTensors], plans: List[torch.Tensor]) -> torch.Tensor:
    """finish_step_ over every group at once; returns whether it was taken."""
    return torch.ops.dopamine.finish_step_(
        [p for group in groups for p in group.params],
        [m for group in groups for m in group.masters],
        [group.state for group in groups],
        plans,
        indices=[i for group in groups for i in group.indices],
        group_sizes=[len(group.params) for group in groups],
        element_offsets=[o for group in groups for o in group.element_offsets],
    )
