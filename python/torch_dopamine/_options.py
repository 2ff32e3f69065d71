"""The options of a parameter group: their names, the codes of their enums,
and their packed form (the ``dopamine::pack_options`` op, the only schema that
names them; docs/DESIGN.md, "Adding an option")."""

import numbers
from typing import Any, Dict, List, Optional

import torch

__all__ = [
    "OPTION_NAMES", "IN_EVERY_STATE", "OLDER_STATE_VALUES", "ENUM_NAMES", "PackedOptions", "code", "op_arguments", "pack",
]

OPTION_NAMES = (
    "lr",
    "sigma",
    "lr_adaptation",
    "beta",
    "beta_s",
    "beta_eta",
    "eps",
    "lr_min",
    "lr_max",
    "weight_decay",
    "seed",
    "noise",
    "non_finite_loss",
    "capturable",
    "master_weights",
    "antithetic",
    "num_perturbations",
    "restore_rng",
    "perturbation",
    "rank",
    "beta_baseline",
)
# The options of the first saved states: every Dopamine state has them, and a
# state without one is another optimizer's. Options added since may be
# missing from a state.
IN_EVERY_STATE = OPTION_NAMES[: OPTION_NAMES.index("non_finite_loss") + 1]
# The values such a state takes where this optimizer's defaults would change
# its behaviour (the others take the defaults): it was not antithetic, took
# one direction, did not restore the random generators and kept no baseline.
OLDER_STATE_VALUES = {"antithetic": False, "num_perturbations": 1, "restore_rng": False, "beta_baseline": None}
# The names of the C++ enums' values, in the order of their codes
# (include/dopamine/options.h): the ops take the codes.
ENUM_NAMES = {
    "lr_adaptation": ("none", "rpe_normalized", "rpe_tracking", "loss_spread"),
    "noise": ("gaussian", "rademacher"),
    "perturbation": ("full", "lowrank"),
    "non_finite_loss": ("skip", "raise"),
}
_FLOATS = ("lr", "sigma", "beta", "beta_s", "beta_eta", "eps", "weight_decay")
_OPTIONAL_FLOATS = ("lr_min", "lr_max", "beta_baseline")
_BOOLS = ("capturable", "master_weights", "antithetic", "restore_rng")


def code(name: str, value: Any) -> int:
    """The code of enum option ``name``'s value; raises ValueError naming it."""
    names = ENUM_NAMES[name]
    if value not in names:
        raise ValueError(f"Dopamine: invalid {name}: {value!r} (expected one of {', '.join(names)})")
    return names.index(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise ValueError(f"Dopamine: invalid {name}: {value!r} (expected a real number)")
    return float(value)


def _as_int(name: str, value: Any, low: int, high: int, expected: str) -> int:
    # The op checks the range; an int beyond 64 bits would not reach it.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise ValueError(f"Dopamine: invalid {name}: {value!r} (expected {expected})")
    return value


def op_arguments(group: Dict[str, Any]) -> Dict[str, Any]:
    """The group's options as ``dopamine::pack_options`` takes them (floats,
    ints, bools and enum codes); a ValueError names an option of the wrong
    type."""
    arguments: Dict[str, Any] = {name: _as_float(name, group[name]) for name in _FLOATS}
    for name in _OPTIONAL_FLOATS:
        arguments[name] = None if group[name] is None else _as_float(name, group[name])
    for name in _BOOLS:
        if not isinstance(group[name], bool):
            raise ValueError(f"Dopamine: invalid {name}: {group[name]!r} (expected a bool)")
        arguments[name] = group[name]
    for name in ENUM_NAMES:
        arguments[name] = code(name, group[name])
    arguments["seed"] = _as_int("seed", group["seed"], -(2**63), 2**63, "an int in [-2**63, 2**63)")
    arguments["num_perturbations"] = _as_int("num_perturbations", group["num_perturbations"], 1, 2**63, "an int >= 1")
    arguments["rank"] = _as_int("rank", group["rank"], 1, 2**63, "an int >= 1")
    return arguments


def pack(group: Dict[str, Any]) -> List[float]:
    """The group's options checked and packed by ``dopamine::pack_options``:
    a ValueError names the first invalid one and its value."""
    arguments = op_arguments(group)
    try:
        return torch.ops.dopamine.pack_options(**arguments)
    except RuntimeError as error:
        raise ValueError(str(error).splitlines()[0]) from None


class PackedOptions:
    """A group's packed options, kept while its options stay the same:
    checking and packing them is most of a small model's step otherwise."""

    def __init__(self, group: Dict[str, Any]):
        self.values = tuple(group[name] for name in OPTION_NAMES)
        self.packed = pack(group)

    @classmethod
    def of(cls, group: Dict[str, Any], cached: Optional["PackedOptions"]) -> "PackedOptions":
        """`cached` if the group's options are still the ones it was made
        from, else the options now (checked anew)."""
        if cached is not None and cached.values == tuple(group[name] for name in OPTION_NAMES):
            return cached
        return cls(group)
