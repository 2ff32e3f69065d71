"""state_dict round trips, LR schedulers and the rest of torch's Optimizer
contract."""

import inspect
import re

import pytest
import torch
from torch.optim import lr_scheduler

import torch_dopamine
from reference import LR_ADAPTATIONS, ReferenceDopamine, isclose, quadratic, same_bits, snapshot
from test_update_rule import DEFAULTS


def two_group_optimizer(params, mode):
    return torch_dopamine.Dopamine(
        [{"params": params[:1]}, {"params": params[1:], "lr": 0.02, "seed": 9}],
        lr=0.05,
        sigma=0.05,
        lr_adaptation=mode,
    )


@pytest.mark.parametrize("through_disk", [False, True], ids=["in_memory", "disk"])
@pytest.mark.parametrize("mode", LR_ADAPTATIONS)
def test_resume_is_bit_identical(device, mode, through_disk, tmp_path):
    params, loss = quadratic([5, 4], device, dtype=torch.float32)
    opt = two_group_optimizer(params, mode)
    for _ in range(7):
        opt.step(lambda: loss(params))
    saved_params, saved_state = snapshot(params), opt.state_dict()
    if through_disk:
        torch.save({"params": saved_params, "optimizer": saved_state}, tmp_path / "checkpoint.pt")
        checkpoint = torch.load(tmp_path / "checkpoint.pt")
        saved_params, saved_state = checkpoint["params"], checkpoint["optimizer"]
    for _ in range(8):
        opt.step(lambda: loss(params))

    resumed = [p.detach().clone().requires_grad_() for p in saved_params]
    resumed_opt = two_group_optimizer(resumed, "none")
    resumed_opt.load_state_dict(saved_state)
    assert resumed_opt.param_groups[0]["lr_adaptation"] == mode
    for _ in range(8):
        resumed_opt.step(lambda: loss(resumed))
    assert same_bits(params, resumed)
    assert resumed_opt.group_state(0) == opt.group_state(0)
    assert resumed_opt.group_state(1) == opt.group_state(1)


def resumed_in_a_default_optimizer(device, **options):
    """A run of an optimizer built with `options`, saved after 5 steps and
    continued for 6; and an optimizer built with the defaults (lr and sigma
    aside) over the saved parameters, the saved state loaded, continued for
    the same 6 steps. Returns (run's params, its optimizer, resumed params,
    resumed optimizer)."""
    params, loss = quadratic([5, 4], device, dtype=torch.float32)
    opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=0.05, **options)
    for _ in range(5):
        opt.step(lambda: loss(params))
    saved_params, saved_state = snapshot(params), opt.state_dict()
    for _ in range(6):
        opt.step(lambda: loss(params))
    resumed = [p.detach().clone().requires_grad_() for p in saved_params]
    resumed_opt = torch_dopamine.Dopamine(resumed, lr=0.05, sigma=0.05)
    resumed_opt.load_state_dict(saved_state)
    for _ in range(6):
        resumed_opt.step(lambda: loss(resumed))
    return params, opt, resumed, resumed_opt


@pytest.mark.parametrize(
    "name,value,before_it_existed",
    [("antithetic", True, False), ("num_perturbations", 3, 1), ("restore_rng", True, False), ("beta_baseline", 0.9, None)],
)
def test_added_options_resume_bit_identical_and_old_states_load(device, name, value, before_it_existed):
    """antithetic and num_perturbations are saved with the groups, so a
    resumed optimizer built without them continues the run; a state saved
    before the option existed loads with the value every run had then."""
    params, opt, resumed, resumed_opt = resumed_in_a_default_optimizer(device, **{name: value})
    assert resumed_opt.param_groups[0][name] == value
    assert same_bits(params, resumed)
    assert resumed_opt.group_state(0) == opt.group_state(0)

    old = opt.state_dict()
    for group in old["param_groups"]:
        del group[name]
    plain = torch_dopamine.Dopamine([p.detach().clone().requires_grad_() for p in params], **{name: value})
    plain.load_state_dict(old)
    assert plain.param_groups[0][name] == before_it_existed


def test_a_state_of_format_1_loads_with_no_baseline_and_continues_the_run(device):
    """Format 1's group states had five entries, no rpe_baseline: such a state
    loads with b = 0, continues a run without a baseline bit for bit, and
    starts one with it from b = 0. Format 2 must have the six."""
    params, opt, resumed, resumed_opt = resumed_in_a_default_optimizer(device, beta_baseline=None)
    saved = opt.state_dict()
    assert saved["dopamine_format"] == 2
    assert opt.group_state(0)["rpe_baseline"] == 0
    old = dict(saved, dopamine_format=1, state={i: dict(s, group_state=s["group_state"][:5]) for i, s in saved["state"].items()})
    loaded = torch_dopamine.Dopamine([p.detach().clone().requires_grad_() for p in params], lr=0.05, sigma=0.05)
    loaded.load_state_dict(old)
    assert loaded.group_state(0) == opt.group_state(0)
    del old["dopamine_format"]
    loaded.load_state_dict(old)
    assert loaded.group_state(0) == opt.group_state(0)
    load_fails_and_changes_nothing(loaded, loaded.param_groups[0]["params"], dict(old, dopamine_format=2), r"of shape \[6\]")
    baseline = torch_dopamine.Dopamine([p.detach().clone().requires_grad_() for p in params], lr=0.05, sigma=0.05)
    old["param_groups"] = [dict(group, beta_baseline=0.9) for group in old["param_groups"]]
    baseline.load_state_dict(old)
    baseline.step(lambda: sum(p.square().sum() for p in baseline.param_groups[0]["params"]))
    assert baseline.group_state(0)["rpe_baseline"] != 0


@pytest.mark.parametrize("earlier", [dict(noise="gaussian"), dict(num_perturbations=4, beta_baseline=None)])
def test_a_checkpoint_keeps_the_earlier_defaults_it_was_saved_with(device, earlier):
    """The options are saved with each group, so a run saved with earlier
    defaults (Gaussian noise; four directions without a baseline) continues
    bit-identically in an optimizer built with today's defaults."""
    params, opt, resumed, resumed_opt = resumed_in_a_default_optimizer(device, **earlier)
    for name, value in earlier.items():
        assert resumed_opt.defaults[name] != value
        assert resumed_opt.param_groups[0][name] == value
    assert same_bits(params, resumed)
    assert resumed_opt.group_state(0) == opt.group_state(0)


def test_state_is_one_shared_tensor_per_group():
    params, loss = quadratic([5, 4, 3], "cpu")
    opt = two_group_optimizer(params, "rpe_normalized")
    opt.step(lambda: loss(params))
    state = opt.state_dict()["state"]
    assert sorted(state) == [0, 1, 2]
    for record in state.values():
        assert sorted(record) == ["group_state"]
        assert record["group_state"].shape == (len(torch_dopamine.STATE_FIELDS),) and record["group_state"].dtype == torch.float64
    assert state[1]["group_state"] is state[2]["group_state"]
    assert state[0]["group_state"] is not state[1]["group_state"]
    assert sorted(opt.group_state(1)) == sorted(torch_dopamine.STATE_FIELDS)
    assert opt.group_state(1)["step"] == 1


def comparable(state_dict):
    """A state dict with its tensors as lists, for ==."""
    state = {k: {name: v.tolist() for name, v in record.items()} for k, record in state_dict["state"].items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def load_fails_and_changes_nothing(opt, params, state_dict, match):
    before = comparable(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    assert comparable(opt.state_dict()) == before


def test_load_state_dict_of_another_optimizer_is_rejected():
    params, loss = quadratic([5, 4], "cpu")
    opt = torch_dopamine.Dopamine(params)
    opt.step(lambda: loss(params))
    adam = torch.optim.Adam(params)
    loss(params).backward()
    adam.step()
    load_fails_and_changes_nothing(opt, params, adam.state_dict(), "lacks .*not a Dopamine optimizer's")
    other = torch_dopamine.Dopamine(params)
    other.step(lambda: loss(params))
    foreign = other.state_dict()
    foreign["state"][0] = {"exp_avg": torch.zeros(5), "step": 1}
    load_fails_and_changes_nothing(opt, params, foreign, "keys .*not a Dopamine optimizer's")


def test_the_state_says_its_format_and_an_unknown_one_is_refused():
    params, loss = quadratic([3], "cpu")
    opt = torch_dopamine.Dopamine(params)
    opt.step(lambda: loss(params))
    saved = opt.state_dict()
    assert saved["dopamine_format"] == torch_dopamine.optimizer.STATE_FORMAT == 2
    load_fails_and_changes_nothing(opt, params, {**saved, "dopamine_format": 3},
                                   "the state is of format 3; this version of torch_dopamine reads formats 1 to 2")
    # A state saved before formats were numbered loads.
    unnumbered = {key: value for key, value in saved.items() if key != "dopamine_format"}
    again = torch_dopamine.Dopamine(params)
    again.load_state_dict(unnumbered)
    assert again.group_state(0) == opt.group_state(0)


def test_load_state_dict_without_state_or_groups_is_rejected():
    params, loss = quadratic([3], "cpu")
    opt = torch_dopamine.Dopamine(params)
    opt.step(lambda: loss(params))
    for bad in ({"state": {}}, {"weights": 1, "other": 2}, [1, 2]):
        load_fails_and_changes_nothing(opt, params, bad, "expected a dict with 'state' and 'param_groups'")


def test_load_state_dict_for_other_parameters_is_rejected():
    params, loss = quadratic([5, 4, 3], "cpu")
    opt = torch_dopamine.Dopamine(params[:2])
    opt.step(lambda: loss(params))
    three = torch_dopamine.Dopamine(params)
    load_fails_and_changes_nothing(opt, params, three.state_dict(), r"parameter group 0 has 3 parameter\(s\) in the state, 2 in this optimizer")
    grouped = two_group_optimizer(params[:2], "none")
    load_fails_and_changes_nothing(opt, params, grouped.state_dict(), "2 parameter group")
    invalid = opt.state_dict()
    invalid["param_groups"][0]["sigma"] = 0.0
    load_fails_and_changes_nothing(opt, params, invalid, "invalid sigma: 0")


def scheduled(opt, kind):
    if kind == "StepLR":
        return lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    if kind == "CosineAnnealingLR":
        return lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    if kind == "OneCycleLR":
        # Dopamine has no momentum for OneCycleLR to cycle.
        return lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12, cycle_momentum=False)
    # mode="max" on a falling loss: every step is a plateau, so lr halves.
    return lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)


@pytest.mark.parametrize("kind", ["StepLR", "CosineAnnealingLR", "OneCycleLR", "ReduceLROnPlateau"])
def test_lr_schedulers_drive_the_step_size(kind):
    params, loss = quadratic([6, 3], "cpu")
    opt = torch_dopamine.Dopamine(params, lr=0.05, sigma=0.05, lr_adaptation="none")
    scheduler = scheduled(opt, kind)
    reference = ReferenceDopamine([(params, dict(DEFAULTS, lr=0.05, sigma=0.05, lr_adaptation="none"))])
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        reference.step(loss, lrs=[lrs[-1]])
        returned = opt.step(lambda: loss(params))
        if kind == "ReduceLROnPlateau":
            scheduler.step(returned)
        else:
            scheduler.step()
        assert opt.group_state(0)["current_lr"] == lrs[-1]
    assert len(set(lrs)) > 2, lrs
    assert isclose(params, reference.params(), rtol=1e-10, atol=1e-12)


def test_zero_grad_is_a_harmless_no_op():
    params, loss = quadratic([3], "cpu")
    params[0].grad = torch.ones(3, dtype=params[0].dtype)
    opt = torch_dopamine.Dopamine(params)
    opt.zero_grad()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(params[0].grad, torch.ones(3, dtype=params[0].dtype))
    before = snapshot(params)
    opt.step(lambda: loss(params))
    assert not same_bits(params, before)
    assert torch.equal(params[0].grad, torch.ones(3, dtype=params[0].dtype))


def test_repr_shows_the_options():
    opt = torch_dopamine.Dopamine([torch.zeros(2)], lr=0.2, lr_adaptation="rpe_tracking")
    text = repr(opt)
    assert text.startswith("Dopamine (")
    for fragment in ("lr: 0.2", "sigma: 0.01", "lr_adaptation: rpe_tracking", "seed: 0"):
        assert fragment in text


def test_every_public_name_has_a_docstring():
    names = [torch_dopamine, torch_dopamine.Dopamine]
    names += [getattr(torch_dopamine.Dopamine, name) for name in ("step", "add_param_group", "zero_grad", "load_state_dict")]
    # Their own docstrings: inspect.getdoc would fall back to torch's.
    for obj in names:
        assert obj.__doc__ and obj.__doc__.strip(), obj
    doc = inspect.getdoc(torch_dopamine.Dopamine)
    for option in DEFAULTS:
        assert re.search(rf"^\s+(?:\w+, )*{re.escape(option)}(?:, \w+)*: ", doc, re.M), option
