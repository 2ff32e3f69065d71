"""What a step and its replay share: every group's tensors as the step ops
take them, moved between perturbations and finished (docs/DESIGN.md, "The
step protocol")."""

from typing import List, Sequence, Tuple

import torch


class StepTable:
    """Every group of a step, as ``move_`` and ``finish_step_`` take them:
    the trainable parameters (a piece of a sharded parameter with the place
    of its first element in ``element_offsets``), their global indices
    (which key their noise), master weights, the groups' states and sizes,
    and their options as ``pack_options`` returned them, one group after
    another. ``carried`` is the perturbation the parameters carry: (offset,
    direction), offset times sigma times the noise of that direction."""

    def __init__(self) -> None:
        self.params: List[torch.Tensor] = []
        self.masters: List[torch.Tensor] = []
        self.states: List[torch.Tensor] = []
        self.packed: List[List[float]] = []
        # The same, one group after another, as move_ takes them.
        self.options: List[float] = []
        self.indices: List[int] = []
        self.element_offsets: List[int] = []
        self.group_sizes: List[int] = []
        self.carried: Tuple[int, int] = (0, 0)

    def add_group(self, params: Sequence[torch.Tensor], indices: Sequence[int], masters: Sequence[torch.Tensor],
                  state: torch.Tensor, packed: List[float], element_offsets: Sequence[int]) -> None:
        self.params += params
        self.indices += indices
        self.masters += masters
        self.element_offsets += element_offsets
        self.group_sizes.append(len(params))
        self.states.append(state)
        self.packed.append(packed)
        self.options += packed

    def carries(self, offset: int, direction: int = 0) -> bool:
        """Whether the parameters carry offset * sigma * z_direction (any
        direction carries offset 0)."""
        return self.carried[0] == offset and (not offset or self.carried[1] == direction)

    def move_to(self, offset: int, direction: int = 0) -> None:
        """Every group comes to carry offset * sigma * z_direction, in one
        ``move_`` (nothing to do if it does)."""
        if self.carries(offset, direction):
            return
        torch.ops.dopamine.move_(
            self.params,
            self.masters,
            self.states,
            options=self.options,
            indices=self.indices,
            group_sizes=self.group_sizes,
            carried=list(self.carried),
            to=[offset, direction],
            element_offsets=self.element_offsets,
        )
        self.carried = (offset, direction)

    def finish(self, plans: List[torch.Tensor]) -> torch.Tensor:
        """``finish_step_`` over every group at once; returns whether the
        step was taken. The parameters then carry no perturbation."""
        taken = torch.ops.dopamine.finish_step_(
            self.params,
            self.masters,
            self.states,
            plans,
            indices=self.indices,
            group_sizes=self.group_sizes,
            element_offsets=self.element_offsets,
        )
        self.carried = (0, 0)
        return taken
