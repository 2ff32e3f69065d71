"""The step engine: no host synchronisation with capturable, any mix of
dtypes, master weights, robust and validated state, a transactional finish,
frozen and named parameters, and torch.compile inside the closure."""

import contextlib
import copy
import math
import warnings

import pytest
import torch

import torch_dopamine
from reference import (
    LR_ADAPTATIONS,
    XOR_INPUTS,
    XOR_TARGETS,
    ReferenceDopamine,
    isclose,
    move,
    quadratic,
    same_bits,
    snapshot,
    state_at,
    xor_loss,
    xor_net,
)
from test_update_rule import DEFAULTS


@contextlib.contextmanager
def host_syncs_forbidden():
    """Makes Tensor.item, tolist, __float__, __int__ and __bool__ (the ways
    Python reads a tensor's value on the host) raise."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a host synchronisation in a capturable step")

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("mode", LR_ADAPTATIONS)
def test_capturable_step_makes_no_host_sync_and_matches_the_default(device, mode):
    params, loss = quadratic([5, 3], device, dtype=torch.float32)
    twin = snapshot(params)
    opt = torch_dopamine.Dopamine(params, lr_adaptation=mode, capturable=True)
    twin_opt = torch_dopamine.Dopamine(twin, lr_adaptation=mode)
    for t in range(6):
        bad = t == 3  # a skipped step, decided on the device
        with host_syncs_forbidden():
            opt.step(lambda: loss(params) * (math.nan if bad else 1.0))
        twin_opt.step(lambda: loss(twin) * (math.nan if bad else 1.0))
    assert same_bits(params, twin)
    assert opt.group_state(0) == twin_opt.group_state(0)
    assert opt.group_state(0)["skipped_steps"] == 1
    assert opt.state[params[0]]["group_state"].device == params[0].device


def test_capturable_refuses_raise_on_non_finite_loss():
    with pytest.raises(ValueError, match="raise with capturable=True"):
        torch_dopamine.Dopamine([torch.zeros(2, requires_grad=True)], capturable=True, non_finite_loss="raise")


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def test_ops_bucket_a_list_of_every_dtype_like_each_tensor_alone():
    torch.manual_seed(0)
    params = [torch.randn(1000 + 37 * i, dtype=dtype) for i, dtype in enumerate(DTYPES)]
    alone = [p.clone() for p in params]
    state = state_at(4)
    for noise in ("gaussian", "rademacher"):
        move(params, state, indices=[3, 4, 5, 6], seed=2, sigma=0.1, noise=noise)
        for i, param in enumerate(alone):
            move([param], state, indices=[3 + i], seed=2, sigma=0.1, noise=noise)
    assert same_bits(params, alone)


def test_a_group_of_mixed_dtypes_follows_the_reference():
    torch.manual_seed(1)
    params = [torch.randn(6, dtype=dtype).requires_grad_() for dtype in DTYPES]
    centers = [torch.randn(6, dtype=torch.float64) for _ in DTYPES]

    def loss(ps):
        # The other parameters move with every step but, so that the float64
        # reference sees the optimizer's losses exactly, only the float64
        # one enters the loss.
        return ((ps[1] - centers[1]) ** 2).sum()

    initial = snapshot(params)
    # One direction: the half types' tolerance below counts its roundings.
    options = dict(DEFAULTS, lr=0.01, sigma=0.05, lr_adaptation="none", seed=3, num_perturbations=1)
    reference = ReferenceDopamine([(params, options)])
    opt = torch_dopamine.Dopamine(params, **options)
    for _ in range(5):
        reference.step(loss)
        opt.step(lambda: loss(params))
    expected = reference.params()
    assert all(p.dtype == dtype for p, dtype in zip(params, DTYPES))
    # float64 exactly as the reference; the others within their rounding.
    # float32 rounds each step, and its rounding reaches float64 through the loss.
    assert isclose(params[:2], expected[:2], rtol=1e-6)
    # One rounding per step of the half types (8 and 11 bits of mantissa,
    # values below 4).
    assert isclose(params[2:3], expected[2:3], rtol=0, atol=5 * 4 * 2**-8)
    assert isclose(params[3:], expected[3:], rtol=0, atol=5 * 4 * 2**-11)
    assert all(not isclose([p], [q], rtol=1e-3) for p, q in zip(params[2:], initial[2:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_keep_parameters_bit_identical_at_lr_zero(dtype):
    torch.manual_seed(2)
    params = [torch.randn(4000, dtype=dtype).requires_grad_()]
    plain = snapshot(params)
    initial = snapshot(params)
    opt = torch_dopamine.Dopamine(params, lr=0.0, sigma=1e-2, lr_adaptation="none", master_weights=True)
    plain_opt = torch_dopamine.Dopamine(plain, lr=0.0, sigma=1e-2, lr_adaptation="none")
    for _ in range(1000):
        opt.step(lambda: params[0].float().sum())
        plain_opt.step(lambda: plain[0].float().sum())
    assert same_bits(params, initial)
    master = opt.state[params[0]]["master_weight"]
    assert master.dtype == torch.float32 and torch.equal(master.to(dtype), initial[0])
    # Without master weights the round trips random-walk (README: drift).
    drift = (plain[0].double() - initial[0].double()).pow(2).mean().sqrt() / initial[0].double().pow(2).mean().sqrt()
    assert drift > 1e-4


def digits_accuracy(dtype, master_weights, steps=2000, seed=0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).to(dtype)
    opt = torch_dopamine.Dopamine(model.parameters(), lr=0.02, sigma=0.01, seed=seed, master_weights=master_weights)

    def loss():
        return torch.nn.functional.cross_entropy(model(x[train].to(dtype)).float(), y[train])

    for _ in range(steps):
        opt.step(loss)
    with torch.no_grad():
        return (model(x[test].to(dtype)).argmax(1) == y[test]).float().mean().item()


def test_bfloat16_digits_mlp_with_master_weights_trains_like_float32():
    """Mean test accuracy over three seeds: the bfloat16 forward changes each
    run's trajectory, so single runs differ by a few points either way."""
    seeds = range(3)
    full = sum(digits_accuracy(torch.float32, False, seed=seed) for seed in seeds) / 3
    half = sum(digits_accuracy(torch.bfloat16, True, seed=seed) for seed in seeds) / 3
    assert full > 0.85
    assert abs(full - half) <= 0.01, (full, half)


def test_state_survives_reordering_and_replacing_parameters():
    params, loss = quadratic([4, 3, 2], "cpu")
    opt = torch_dopamine.Dopamine(params)
    for _ in range(3):
        opt.step(lambda: loss(params))
    group = opt.param_groups[0]
    group["params"] = group["params"][::-1]
    opt.step(lambda: loss(params))
    assert opt.group_state(0)["step"] == 4
    replacement = params[2].detach().clone().requires_grad_()
    group["params"][0] = replacement  # the first parameter is new
    opt.step(lambda: loss(params[:2] + [replacement]))
    assert opt.group_state(0)["step"] == 5
    assert opt.state[replacement]["group_state"] is opt.state[params[0]]["group_state"]


def test_a_parameter_moved_between_groups_is_an_error():
    params, loss = quadratic([4, 3], "cpu")
    opt = torch_dopamine.Dopamine([{"params": params[:1]}, {"params": params[1:], "seed": 5}])
    opt.step(lambda: loss(params))
    opt.param_groups[0]["params"].append(opt.param_groups[1]["params"].pop())
    before = snapshot(params)
    with pytest.raises(RuntimeError, match="group 0 hold the states of different groups"):
        opt.step(lambda: loss(params))
    assert same_bits(params, before)


def test_a_failing_finish_restores_every_group_and_keeps_the_state(monkeypatch):
    params, loss = quadratic([4, 3, 5], "cpu")
    opt = torch_dopamine.Dopamine([{"params": params[:2]}, {"params": params[2:], "lr": 0.05, "seed": 2}])
    opt.step(lambda: loss(params))
    before, states = snapshot(params), [opt.group_state(0), opt.group_state(1)]

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure")

    # The overload the optimizer calls.
    monkeypatch.setattr(torch.ops.dopamine.finish_step_, "default", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        opt.step(lambda: loss(params))
    monkeypatch.undo()
    # Within the rounding of the perturbation's round trip.
    assert isclose(params, before, rtol=0, atol=1e-14)
    assert [opt.group_state(0), opt.group_state(1)] == states


def test_a_step_size_that_is_not_finite_skips_the_step():
    params, loss = quadratic([4], "cpu")
    options = dict(lr=1e300, sigma=1e-3, lr_adaptation="none")
    opt = torch_dopamine.Dopamine(params, **options)
    before = snapshot(params)
    # delta ~ 1e7, so lr * delta / sigma overflows.
    opt.step(lambda: 1e10 * loss(params))
    assert isclose(params, before, rtol=0, atol=1e-14)
    assert opt.group_state(0)["skipped_steps"] == 1
    raising = torch_dopamine.Dopamine(params, non_finite_loss="raise", **options)
    with pytest.raises(RuntimeError, match="step size is not finite"):
        raising.step(lambda: 1e10 * loss(params))
    assert raising.group_state(0) is None


def test_a_closure_that_changes_options_or_groups_affects_the_next_step_only():
    params, loss = quadratic([4, 3], "cpu")
    later = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    options = dict(DEFAULTS, lr=0.05, sigma=0.05, lr_adaptation="none")
    opt = torch_dopamine.Dopamine(params[:1], **options)
    reference = ReferenceDopamine([(params[:1], options)])
    calls = []

    def meddling():
        calls.append(1)
        if len(calls) == 2:
            opt.param_groups[0]["lr"] = 7.0
            opt.add_param_group({"params": [later]})
        return loss(params)

    reference.step(lambda ps: loss(ps + params[1:]))
    opt.step(meddling)
    assert isclose(params[:1], reference.params(), rtol=1e-12)
    assert opt.group_state(1) is None and torch.equal(later, torch.zeros(2, dtype=torch.float64))
    opt.step(lambda: loss(params) + later.sum())
    assert opt.group_state(0)["current_lr"] == 7.0 and opt.group_state(1)["step"] == 1


def test_frozen_parameters_are_untouched_and_keep_the_others_noise():
    torch.manual_seed(3)
    frozen = torch.randn(5, dtype=torch.float64)
    trained = torch.randn(4, dtype=torch.float64, requires_grad=True)
    twin_first = frozen.clone().requires_grad_()
    twin = trained.detach().clone().requires_grad_()

    def loss(p):
        return (p - 1).square().sum()

    opt = torch_dopamine.Dopamine([frozen, trained])
    twin_opt = torch_dopamine.Dopamine([twin_first, twin])
    before = frozen.clone()
    for _ in range(5):
        opt.step(lambda: loss(trained))
        twin_opt.step(lambda: loss(twin))
    assert torch.equal(frozen, before)
    assert "master_weight" not in opt.state.get(frozen, {})
    # The trained parameter keeps index 1 and so the noise it draws when
    # the first parameter trains too.
    assert same_bits([trained], [twin])


def test_a_kept_group_share_changes_no_bit_and_a_change_to_the_group_is_seen(monkeypatch):
    params, loss = quadratic([4, 3, 2], "cpu")
    twins = snapshot(params)
    opt, twin_opt = torch_dopamine.Dopamine(params), torch_dopamine.Dopamine(twins)
    scans = []
    share_of = torch_dopamine.Dopamine._share_of

    def counted(self, group, g, first_index):
        if self is opt:
            scans.append(g)
        return share_of(self, group, g, first_index)

    monkeypatch.setattr(torch_dopamine.Dopamine, "_share_of", counted)

    def step_both():
        opt.step(lambda: loss(params))
        twin_opt.__dict__.pop("_shares", None)  # the twin scans its group every step
        twin_opt.step(lambda: loss(twins))

    for _ in range(3):
        step_both()
    # The first step scans the group; the next two reuse what it kept.
    assert scans == [0]
    for p in (params[1], twins[1]):
        p.requires_grad_(False)
    frozen = params[1].detach().clone()
    step_both()
    assert scans == [0, 0]
    assert torch.equal(params[1], frozen)
    for p in (params[1], twins[1]):
        p.requires_grad_(True)
    for _ in range(2):
        step_both()
    assert scans == [0, 0, 0]
    assert not torch.equal(params[1], frozen)
    assert same_bits(params, twins)


def test_a_state_loaded_into_a_running_optimizer_resumes_bit_identically():
    params, loss = quadratic([4, 3], "cpu")
    opt = torch_dopamine.Dopamine(params, master_weights=True)
    for _ in range(3):
        opt.step(lambda: loss(params))
    saved_params, saved_state = snapshot(params), copy.deepcopy(opt.state_dict())
    for _ in range(2):
        opt.step(lambda: loss(params))
    after = snapshot(params)
    with torch.no_grad():
        for param, saved in zip(params, saved_params):
            param.copy_(saved)
    # The same optimizer, which kept its groups' shares from the steps
    # before, takes the loaded state.
    opt.load_state_dict(saved_state)
    for _ in range(2):
        opt.step(lambda: loss(params))
    assert same_bits(params, after)
    assert opt.group_state(0)["step"] == 5


def test_a_group_with_no_trainable_parameter_is_warned_about_once():
    plain = [torch.ones(8), torch.ones(2)]
    trained = torch.ones(3, requires_grad=True)
    opt = torch_dopamine.Dopamine(plain)
    opt.add_param_group({"params": [trained]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(lambda: (trained - 2).square().sum())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "none of the 2 parameter(s) of group 0 requires grad, so that group is not trained" in messages[0]
    assert "requires_grad_()" in messages[0]
    assert torch.equal(plain[0], torch.ones(8))

    idle = torch_dopamine.Dopamine([torch.zeros(4)])
    with pytest.warns(UserWarning, match=r"so step\(\) trains nothing"):
        idle.step(lambda: torch.ones(()))


def test_named_parameters_are_accepted_and_their_names_checked_on_load():
    model = xor_net(0)
    opt = torch_dopamine.Dopamine(model.named_parameters())
    opt.step(lambda: xor_loss(model))
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"] == [name for name, _ in model.named_parameters()]
    other = xor_net(0)
    reordered = torch_dopamine.Dopamine(list(other.named_parameters())[::-1])
    with pytest.raises(ValueError, match="names of group 0 differ"):
        reordered.load_state_dict(saved)
    same = torch_dopamine.Dopamine(other.named_parameters())
    same.load_state_dict(saved)
    assert same.group_state(0) == opt.group_state(0)


@pytest.mark.parametrize(
    "field,value,message",
    [
        (2, math.nan, "state rpe_trace: nan"),
        (0, 2.0**40, "state step"),
        (1, 5.0, "state skipped_steps"),
        (4, -1.0, "state current_lr"),
    ],
)
def test_a_loaded_state_is_validated_when_loaded(field, value, message):
    params, loss = quadratic([3], "cpu")
    opt = torch_dopamine.Dopamine(params)
    opt.step(lambda: loss(params))
    bad = opt.state_dict()
    bad["state"][0]["group_state"][field] = value
    before = opt.group_state(0)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert opt.group_state(0) == before


def test_a_seed_outside_64_bits_is_refused_at_construction():
    with pytest.raises(ValueError, match="invalid seed: 1180591620717411303424"):
        torch_dopamine.Dopamine([torch.zeros(2, requires_grad=True)], seed=2**70)


def test_a_compiled_model_trains_without_recompiling():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps earlier tests' counts
    model = xor_net(1)
    compiled = torch.compile(model, backend="eager")
    opt = torch_dopamine.Dopamine(model.parameters())

    def loss():
        return torch.nn.functional.mse_loss(compiled(XOR_INPUTS), XOR_TARGETS)

    for _ in range(3):
        opt.step(loss)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    assert frames >= 1
    first = opt.step(loss).item()
    for _ in range(50):
        last = opt.step(loss).item()
    # Perturbing and updating the parameters in place changes no guard.
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    assert last < first


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_a_capturable_step_replays_from_a_cuda_graph_to_the_eager_result():
    params, loss = quadratic([300, 7], "cuda", dtype=torch.float32)
    eager = snapshot(params)
    opt = torch_dopamine.Dopamine(params, capturable=True)
    eager_opt = torch_dopamine.Dopamine(eager, capturable=True)
    # Warm up on a side stream (allocations, the state), as CUDA graphs need.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.step(lambda: loss(params))
            eager_opt.step(lambda: loss(eager))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(lambda: loss(params))
    eager_opt.step(lambda: loss(eager))
    for _ in range(5):
        graph.replay()
        eager_opt.step(lambda: loss(eager))
    torch.cuda.synchronize()
    assert same_bits(params, eager)
    assert opt.group_state(0) == eager_opt.group_state(0)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_group_across_cpu_and_cuda_matches_one_device(dtype):
    torch.manual_seed(4)
    cpu = [torch.randn(50, dtype=dtype).requires_grad_(), torch.randn(3, 4, dtype=dtype).requires_grad_()]
    mixed = [cpu[0].detach().clone().requires_grad_(), cpu[1].detach().cuda().requires_grad_()]

    def loss(ps):
        return sum((p.double().cpu() - 0.5).square().sum() for p in ps)

    opt = torch_dopamine.Dopamine(cpu)
    mixed_opt = torch_dopamine.Dopamine(mixed)
    for _ in range(5):
        opt.step(lambda: loss(cpu))
        mixed_opt.step(lambda: loss(mixed))
    # CPU and CUDA draw the same noise; the float32 arithmetic of the update
    # may round differently on each device.
    assert isclose(cpu, [p.cpu() for p in mixed], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="must be on one device"):
        capturable = torch_dopamine.Dopamine(mixed, capturable=True)
        capturable.step(lambda: loss(mixed))


@pytest.mark.parametrize("antithetic", [False, True])
def test_every_evaluation_of_a_step_draws_the_same_random_numbers(antithetic):
    """restore_rng (the default): dropout, or anything the closure samples,
    is the same in every evaluation of a step, so a loss difference measures
    the perturbation alone; the generator advances across steps as with one
    evaluation per step. Without it every evaluation draws anew."""
    param = torch.zeros(4, requires_grad=True)
    for restore in (True, False):
        opt = torch_dopamine.Dopamine([param], antithetic=antithetic, num_perturbations=2, restore_rng=restore)
        torch.manual_seed(0)
        for _ in range(3):
            draws = []
            before = torch.get_rng_state()

            def closure():
                draws.append(torch.rand(3))
                return (param - 1).square().sum()

            opt.step(closure)
            assert len(draws) == (4 if antithetic else 3)
            assert all(torch.equal(d, draws[0]) for d in draws) == restore
            if restore:
                # As one evaluation would have left it.
                after = torch.get_rng_state()
                torch.set_rng_state(before)
                torch.rand(3)
                assert torch.equal(after, torch.get_rng_state())


def test_with_dropout_the_deltas_are_those_of_one_fixed_mask():
    """With dropout 0.5 in train mode, the losses of a step equal those of the
    same network with the step's mask fixed: the mask no longer adds noise
    to delta."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    opt = torch_dopamine.Dopamine(net.parameters(), num_perturbations=3)
    losses, masks = [], []
    hook = net[2].register_forward_hook(lambda module, inputs, output: masks.append(output != 0))

    def closure():
        loss = torch.nn.functional.mse_loss(net(x), y)
        losses.append(loss.item())
        return loss

    opt.step(closure)
    hook.remove()
    assert len(masks) == 4 and all(torch.equal(m, masks[0]) for m in masks)
    assert len(set(losses)) == 4  # the perturbations still move the loss


def test_a_network_with_dropout_trains():
    """Dropout 0.2 in train mode: with the same mask in every evaluation of a
    step the network trains; drawing anew in each evaluation buries the
    perturbation's loss difference under the masks' (the run of
    restore_rng=False, kept as the comparison)."""
    finals = {}
    for restore in (True, False):
        torch.manual_seed(2)
        net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
        x = torch.randn(64, 3)
        y = torch.sin(x.sum(1, keepdim=True))
        opt = torch_dopamine.Dopamine(net.parameters(), lr=0.02, restore_rng=restore)
        with torch.no_grad():
            initial = torch.nn.functional.mse_loss(net.eval()(x), y).item()
        net.train()
        # 2000 forward passes, as many steps as the default directions allow.
        for _ in range(2000 // (1 + opt.defaults["num_perturbations"])):
            opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))
        with torch.no_grad():
            finals[restore] = torch.nn.functional.mse_loss(net.eval()(x), y).item()
    assert finals[True] < initial / 3
    assert finals[True] < finals[False] / 2
