"""Bad input gets a clear error and loses nothing (docs/DESIGN.md, "Guarantees")."""

import math
import re

import pytest
import torch

import torch_dopamine
from reference import move, quadratic, same_bits, snapshot, state_at


def fresh(device, **options):
    params, loss = quadratic([4, 3], device)
    opt = torch_dopamine.Dopamine(params, **options)
    opt.step(lambda: loss(params))  # a step already taken, so state exists
    return params, loss, opt


def state_of(opt):
    """Every parameter's state as Python numbers."""
    return {k: {name: v.tolist() for name, v in record.items()} for k, record in opt.state.items()}


def test_step_without_closure_raises_and_changes_nothing(device):
    params, _, opt = fresh(device)
    before, state = snapshot(params), state_of(opt)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    assert same_bits(params, before) and state_of(opt) == state


# The second evaluation of a step: along the first of the default four
# directions, as the errors name it.
PERTURBED = "theta + sigma z_0"


def closure_returning(bad, which, loss, params):
    """A closure that returns bad() at the unperturbed (first) or PERTURBED
    (second) evaluation and the true loss otherwise; .calls counts calls."""

    def closure():
        closure.calls += 1
        if which == "unperturbed" or closure.calls == 2:
            return bad()
        return loss(params)

    closure.calls = 0
    return closure


BAD_LOSSES = {
    "non-scalar": lambda: torch.ones(3),
    "string": lambda: "0.5",
    "None": lambda: None,
    "integer tensor": lambda: torch.tensor(1),
}


@pytest.mark.parametrize("which", ["unperturbed", PERTURBED])
@pytest.mark.parametrize("bad", BAD_LOSSES, ids=list(BAD_LOSSES))
def test_bad_loss_raises_and_restores(device, which, bad):
    params, loss, opt = fresh(device)
    before, state = snapshot(params), state_of(opt)
    closure = closure_returning(BAD_LOSSES[bad], which, loss, params)
    with pytest.raises(RuntimeError, match=f"closure must return a scalar.*{re.escape(which)} loss"):
        opt.step(closure)
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert state_of(opt) == state


class ClosureFailure(Exception):
    pass


def failing_at(failing_call, loss_fn):
    """A closure that raises ClosureFailure at call `failing_call` and returns
    loss_fn() otherwise; .calls counts its calls."""

    def closure():
        closure.calls += 1
        if closure.calls == failing_call:
            raise ClosureFailure("data loader broke")
        return loss_fn()

    closure.calls = 0
    return closure


@pytest.mark.parametrize("failing_call", [1, 2])
def test_closure_exception_propagates_and_restores(device, failing_call):
    params, loss, opt = fresh(device)
    before, state = snapshot(params), state_of(opt)
    with pytest.raises(ClosureFailure, match="data loader broke"):
        opt.step(failing_at(failing_call, lambda: loss(params)))
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert state_of(opt) == state
    # The next step is the step that would have been taken.
    twin_params, _, twin = fresh(device)
    opt.step(lambda: loss(params))
    twin.step(lambda: loss(twin_params))
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(params, twin_params))


def test_antithetic_non_scalar_loss_names_the_evaluation(device):
    params, loss = quadratic([4, 3], device)
    opt = torch_dopamine.Dopamine(params, antithetic=True, num_perturbations=1)
    before = snapshot(params)
    closure = closure_returning(lambda: torch.ones(3), PERTURBED, loss, params)
    with pytest.raises(RuntimeError, match="closure must return a scalar.*theta - sigma z loss"):
        opt.step(closure)
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert opt.group_state(0) is None


@pytest.mark.parametrize(
    "antithetic,directions,failing_call",
    [(True, 1, 1), (True, 1, 2), (False, 3, 1), (False, 3, 3), (False, 3, 4), (True, 3, 1), (True, 3, 4)],
)
def test_a_closure_failing_at_any_evaluation_restores_every_parameter(device, antithetic, directions, failing_call):
    """The closure fails at one evaluation (with antithetic at theta + sigma
    z or theta - sigma z; with three directions along the first, second or
    third): every parameter is restored (a bfloat16 one with a master weight
    exactly), the state is unchanged, and the next step is the one a twin
    that never failed takes."""
    params, loss = quadratic([4, 3], device)
    half = torch.randn(6, device=device).to(torch.bfloat16).requires_grad_()
    everything = params + [half]

    def full_loss(ps):
        return loss(ps[:2]) + ps[2].double().square().sum()

    options = dict(antithetic=antithetic, num_perturbations=directions, master_weights=True)
    opt = torch_dopamine.Dopamine(everything, **options)
    opt.step(lambda: full_loss(everything))
    before, state = snapshot(everything), state_of(opt)
    closure = failing_at(failing_call, lambda: full_loss(everything))
    with pytest.raises(ClosureFailure, match="data loader broke"):
        opt.step(closure)
    assert closure.calls == failing_call
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert same_bits([half], before[2:])
    assert state_of(opt) == state
    twin_everything = [b.detach().clone().requires_grad_() for b in before]
    twin = torch_dopamine.Dopamine(twin_everything, **options)
    twin.load_state_dict(opt.state_dict())
    opt.step(lambda: full_loss(everything))
    twin.step(lambda: full_loss(twin_everything))
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(everything, twin_everything))


def test_a_non_finite_loss_along_a_direction_names_it(device):
    params, loss, opt = fresh(device, non_finite_loss="raise", num_perturbations=3)
    before = snapshot(params)
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(math.inf) if len(calls) == 3 else loss(params)

    with pytest.raises(RuntimeError, match=re.escape("the theta + sigma z_1 loss is inf; parameters restored")):
        opt.step(closure)
    assert len(calls) == 4
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert opt.group_state(0)["step"] == 1


def test_num_perturbations_must_agree_across_groups():
    params, loss = quadratic([4, 3], "cpu")
    opt = torch_dopamine.Dopamine([{"params": params[:1]}, {"params": params[1:], "num_perturbations": 3}])
    before = snapshot(params)
    with pytest.raises(ValueError, match="invalid num_perturbations: 3 in parameter group 1.*same in every group"):
        opt.step(lambda: loss(params))
    assert same_bits(params, before) and opt.group_state(0) is None


def test_antithetic_must_agree_across_groups():
    params, loss = quadratic([4, 3], "cpu")
    opt = torch_dopamine.Dopamine([{"params": params[:1]}, {"params": params[1:], "antithetic": True}])
    before = snapshot(params)
    with pytest.raises(ValueError, match="invalid antithetic: True in parameter group 1.*same in every group"):
        opt.step(lambda: loss(params))
    assert same_bits(params, before) and opt.group_state(0) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["unperturbed", PERTURBED])
def test_non_finite_loss_is_skipped(device, value, which):
    params, loss, opt = fresh(device)
    before, state = snapshot(params), opt.group_state(0)
    closure = closure_returning(lambda: torch.tensor(value), which, loss, params)
    returned = opt.step(closure)
    # Every evaluation runs (the unperturbed one and one along each default
    # direction): the losses are checked together, on the device.
    assert closure.calls == 1 + opt.defaults["num_perturbations"] == 3
    if which == "unperturbed":
        assert math.isnan(returned.item()) if math.isnan(value) else returned.item() == value
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert opt.group_state(0) == dict(state, step=state["step"] + 1, skipped_steps=1)


@pytest.mark.parametrize("which", ["unperturbed", PERTURBED])
def test_non_finite_loss_raises_when_asked(device, which):
    params, loss, opt = fresh(device, non_finite_loss="raise")
    before, state = snapshot(params), state_of(opt)
    closure = closure_returning(lambda: float("nan"), which, loss, params)
    with pytest.raises(RuntimeError, match=f"the {re.escape(which)} loss is nan.*non_finite_loss='raise'"):
        opt.step(closure)
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert state_of(opt) == state


def test_antithetic_non_finite_loss_raises_naming_the_evaluation(device):
    params, loss, opt = fresh(device, non_finite_loss="raise", antithetic=True, num_perturbations=1)
    before, state = snapshot(params), state_of(opt)
    closure = closure_returning(lambda: float("inf"), PERTURBED, loss, params)
    with pytest.raises(RuntimeError, match=r"the theta - sigma z loss is inf.*non_finite_loss='raise'"):
        opt.step(closure)
    assert all(torch.allclose(p, b, rtol=0, atol=1e-12) for p, b in zip(params, before))
    assert state_of(opt) == state


BAD_OPTIONS = [
    ("lr", -1.0),
    ("lr", math.nan),
    ("sigma", 0.0),
    ("sigma", -0.1),
    ("beta", 1.0),
    ("beta", -0.5),
    ("beta_s", 1.0),
    ("beta_eta", 1.5),
    ("beta_baseline", 1.0),
    ("beta_baseline", -0.1),
    ("beta_baseline", math.nan),
    ("beta_baseline", "slow"),
    ("eps", 0.0),
    ("weight_decay", -1.0),
    ("lr_min", -1.0),
    ("lr_max", -2.0),
    ("lr_adaptation", "adam"),
    ("non_finite_loss", "ignore"),
    ("noise", "uniform"),
    ("seed", 1.5),
    ("lr", "fast"),
    ("antithetic", 1),
    ("antithetic", "yes"),
    ("num_perturbations", 0),
    ("num_perturbations", -2),
    ("num_perturbations", 1.5),
    ("num_perturbations", 2.0),
    ("num_perturbations", True),
    ("num_perturbations", 65537),
    ("num_perturbations", 2**70),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v}" for n, v in BAD_OPTIONS])
def test_invalid_option_raises_value_error_naming_it(name, value):
    param = torch.zeros(3, requires_grad=True)
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    with pytest.raises(ValueError, match=f"invalid {name}: '?{re.escape(shown)}"):
        torch_dopamine.Dopamine([param], **{name: value})
    opt = torch_dopamine.Dopamine([param])
    with pytest.raises(ValueError, match=f"invalid {name}: "):
        opt.add_param_group({"params": [torch.zeros(2)], name: value})
    assert len(opt.param_groups) == 1


def test_lr_min_above_lr_max_is_rejected():
    with pytest.raises(ValueError, match="invalid lr_min: 2.*<= lr_max"):
        torch_dopamine.Dopamine([torch.zeros(1)], lr_min=2.0, lr_max=1.0)


def test_option_changed_to_invalid_after_construction_fails_the_step(device):
    params, loss, opt = fresh(device)
    before, state = snapshot(params), state_of(opt)
    opt.param_groups[0]["sigma"] = -1.0
    with pytest.raises(ValueError, match="invalid sigma: -1"):
        opt.step(lambda: loss(params))
    assert same_bits(params, before) and state_of(opt) == state


@pytest.mark.parametrize(
    "param,message",
    [
        (torch.zeros(3, dtype=torch.int64), "dtype torch.int64; expected a floating-point"),
        (torch.zeros(3, dtype=torch.bool), "dtype torch.bool; expected a floating-point"),
        (torch.zeros(3).to_sparse(), "sparse parameters are not supported"),
    ],
    ids=["int64", "bool", "sparse"],
)
def test_unsupported_parameter_is_rejected(param, message):
    with pytest.raises(ValueError, match=f"parameter 0 of group 0 .*{message}"):
        torch_dopamine.Dopamine([param])


def test_non_leaf_and_duplicate_parameters_are_rejected():
    leaf = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="non-leaf"):
        torch_dopamine.Dopamine([leaf * 2])
    with pytest.raises(ValueError, match="more than once"):
        torch_dopamine.Dopamine([leaf, leaf])
    opt = torch_dopamine.Dopamine([leaf])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [leaf]})
    assert len(opt.param_groups) == 1


def test_the_ops_refuse_an_integer_parameter(device):
    with pytest.raises(RuntimeError, match="must be a strided float32, float64, bfloat16 or float16"):
        move([torch.zeros(3, dtype=torch.int32, device=device)], state_at(1, device), indices=[0])


def test_parameter_made_integer_after_construction_is_refused_at_the_next_step(device):
    params, loss = quadratic([3], device)
    opt = torch_dopamine.Dopamine(params)
    opt.param_groups[0]["params"] = [torch.zeros(3, dtype=torch.int32, device=device)]
    with pytest.raises(ValueError, match="expected a floating-point tensor"):
        opt.step(lambda: loss(params))
