"""What a step and its replay share: every group's tensors as the step ops
take them, moved between perturbations and finished (docs/DESIGN.md, "The
step protocol")."""

from typing import Any, List, Optional, Sequence, Tuple

import torch

# The fields of a group's state tensor (docs/DESIGN.md, "State").
STATE_FIELDS = ("step", "skipped_steps", "rpe_trace", "rpe_magnitude", "current_lr", "rpe_baseline")


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
        self._held: Optional[Tuple[Sequence[Any], ...]] = None

    def held(self) -> Tuple[Sequence[Any], ...]:
        """The parameters, master weights, indices and element offsets in
        lists that C++ holds (torch.ScriptList), made once: an op takes such
        a list whole, where it converts a Python list's every element at
        every call, and a tensor's reference from C++ then takes the GIL
        (docs/NOISE_AND_KERNELS.md, "Many small tensors"). An empty list
        stays a Python list, whose type a ScriptList could not infer."""
        if self._held is None:
            self._held = tuple(
                torch.ScriptList(values) if values else values
                for values in (self.params, self.masters, self.indices, self.element_offsets)
            )
        return self._held

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
        self._held = None

    def set_options(self, packed: List[List[float]]) -> None:
        """Each group's options, as pack_options returned them, anew."""
        self.packed = list(packed)
        self.options = [number for group in packed for number in group]

    def carries(self, offset: int, direction: int = 0) -> bool:
        """Whether the parameters carry offset * sigma * z_direction (any
        direction carries offset 0)."""
        return self.carried[0] == offset and (not offset or self.carried[1] == direction)

    def move_to(self, offset: int, direction: int = 0) -> None:
        """Every group comes to carry offset * sigma * z_direction, in one
        ``move_`` (nothing to do if it does)."""
        if self.carries(offset, direction):
            return
        # The overload itself: through the packet, torch matches the
        # arguments to a schema first, which doubles the cost of a call
        # over thousands of tensors (docs/NOISE_AND_KERNELS.md, "Many
        # small tensors").
        params, masters, indices, element_offsets = self.held()
        torch.ops.dopamine.move_.default(
            params,
            masters,
            self.states,
            options=self.options,
            indices=indices,
            group_sizes=self.group_sizes,
            carried=list(self.carried),
            to=[offset, direction],
            element_offsets=element_offsets,
        )
        self.carried = (offset, direction)

    def finish(self, plans: List[torch.Tensor]) -> torch.Tensor:
        """``finish_step_`` over every group at once; returns whether the
        step was taken. The parameters then carry no perturbation."""
        params, masters, indices, element_offsets = self.held()
        taken = torch.ops.dopamine.finish_step_.default(
            params,
            masters,
            self.states,
            plans,
            indices=indices,
            group_sizes=self.group_sizes,
            element_offsets=element_offsets,
        )
        self.carried = (0, 0)
        return taken
