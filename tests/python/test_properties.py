"""Property-based tests (hypothesis) over shapes, layouts, dtypes and options:
a failed step restores the parameters, the noise of an element depends only on
its logical position and not on the thread count, and the C++ and Python
optimizers compute the same bits.

The number of examples is the hypothesis profile's (conftest.py): `ci` (the
default, in `make test`) or `nightly` (HYPOTHESIS_PROFILE=nightly)."""

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torch_dopamine  # noqa: E402
from parity import train_both  # noqa: E402
from reference import LR_ADAPTATIONS, NOISE_CODES, UNIT_ROUNDOFF, move, ops_noise, state_at  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "strided", "channels_last", "expanded"]


@st.composite
def parameters(draw, layouts=LAYOUTS, dtypes=DTYPES):
    """A leaf tensor of a drawn dtype, shape (0-d and empty included) and
    layout, with standard normal values."""
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(layouts))
    ndim = 4 if layout == "channels_last" else draw(st.integers(0 if layout == "contiguous" else 2, 3))
    shape = draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if layout == "transposed":
        tensor = torch.randn(shape[::-1], generator=generator).to(dtype).transpose(0, -1)
    elif layout == "strided":
        wide = torch.randn(shape[:-1] + [2 * shape[-1]], generator=generator).to(dtype)
        tensor = wide[..., ::2]
    elif layout == "channels_last":
        tensor = torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    elif layout == "expanded":
        tensor = torch.randn(shape[:-1] + [1], generator=generator).to(dtype).expand(shape[:-1] + [max(shape[-1], 2)])
    else:
        tensor = torch.randn(shape, generator=generator).to(dtype)
    return tensor.requires_grad_()


OPTIONS = dict(
    lr=st.floats(1e-4, 1.0),
    sigma=st.floats(1e-3, 1.0),
    lr_adaptation=st.sampled_from(LR_ADAPTATIONS),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    noise=st.sampled_from(list(NOISE_CODES)),
    seed=st.integers(-(2**63), 2**63 - 1),
)
options = st.fixed_dictionaries(OPTIONS)


def shares_memory(tensor):
    """Whether elements share memory, as ATen's has_internal_overlap says."""
    return torch._debug_has_internal_overlap(tensor) == 1


@given(params=st.lists(parameters(), min_size=1, max_size=3), options=options,
       master_weights=st.booleans(), antithetic=st.booleans(), failing_call=st.sampled_from([1, 2]),
       steps_before=st.integers(0, 2))
def test_a_failed_step_restores_the_parameters(params, options, master_weights, antithetic, failing_call, steps_before):
    """A closure that raises at the first (1) or second (2) evaluation
    leaves every parameter where it was: exactly when it was never perturbed
    or has a master weight, else within the rounding of the round trip (two
    roundings of at most |x| + 6 sigma, |z| < 6; with antithetic, three of at
    most |x| + 12 sigma: theta + sigma z, then - 2 sigma z, then + sigma z).
    The state is unchanged. A parameter whose elements share memory is
    refused by the first step, with the others unchanged."""
    opt = torch_dopamine.Dopamine(params, master_weights=master_weights, antithetic=antithetic, **options)
    loss = lambda: sum(p.double().square().sum() for p in params) * 1e-3  # noqa: E731
    expanded = any(shares_memory(p) for p in params)
    if expanded:
        before = [p.detach().clone() for p in params]
        with pytest.raises(RuntimeError, match="share memory"):
            opt.step(loss)
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        return
    for _ in range(steps_before):
        opt.step(loss)
    before = [p.detach().clone() for p in params]
    state = opt.group_state(0)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == failing_call:
            raise ArithmeticError("closure failed")
        return loss()

    with pytest.raises(ArithmeticError):
        opt.step(failing)
    assert opt.group_state(0) == state
    for p, b in zip(params, before):
        never_perturbed = failing_call == 1 and not antithetic
        if never_perturbed or (master_weights and p.dtype in (torch.bfloat16, torch.float16)):
            assert torch.equal(p, b)
        else:
            roundings, reach = (3, 12) if antithetic else (2, 6)
            bound = roundings * UNIT_ROUNDOFF[p.dtype] * (b.double().abs() + reach * options["sigma"])
            assert ((p.double() - b.double()).abs() <= bound).all()


@given(param=parameters(layouts=LAYOUTS[:4]), seed=st.integers(-(2**63), 2**63 - 1),
       step=st.integers(1, 2**32 - 1), index=st.integers(0, 2**32 - 1), noise=st.sampled_from(list(NOISE_CODES)))
def test_noise_depends_on_the_logical_position_only(param, seed, step, index, noise):
    """A parameter of any layout and dtype draws the noise of its row-major
    order: the float32 values of a contiguous tensor of its shape, element by
    element, rounded once to its dtype."""
    drawn = param.detach().zero_()
    move([drawn], state_at(step), indices=[index], seed=seed, noise=noise)
    assert torch.equal(drawn, ops_noise(torch.zeros(param.shape), seed, step, index, noise).to(param.dtype))


@given(sizes=st.lists(st.integers(0, 100_000), min_size=0, max_size=2), options=options)
def test_the_thread_count_does_not_change_a_step(sizes, options):
    """One and two threads give the same bits. The tiles are split among
    threads in tasks of at least 65536 elements, so the first tensor has more
    than two tasks' worth."""
    sizes = [140_000] + sizes
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params = [torch.linspace(-1, 1, n).requires_grad_() for n in sizes]
            opt = torch_dopamine.Dopamine(params, **options)
            for _ in range(2):
                opt.step(lambda: sum(p[:100].double().square().sum() for p in params))
            results.append([p.detach() for p in params])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


group_options = st.fixed_dictionaries(
    dict(
        OPTIONS,
        beta=st.floats(0.5, 0.99),
        beta_s=st.floats(0.5, 0.9999),
        beta_eta=st.floats(0.0, 0.5),
        lr_min=st.one_of(st.none(), st.floats(0.0, 1e-3)),
        lr_max=st.one_of(st.none(), st.floats(0.5, 2.0)),
        beta_baseline=st.one_of(st.none(), st.floats(0.0, 0.99)),
    )
)


@settings(max_examples=max(1, settings().max_examples // 4))
@given(split=st.integers(1, 3), first=group_options, second=group_options)
def test_cpp_and_python_agree_for_any_options(build_dir, tmp_path_factory, split, first, second):
    """The parameters of a float64 model (parity.py) split into two groups
    with drawn options: 10 steps of the C++ and the Python optimizer, bit for
    bit. A quarter of the profile's examples: each runs the C++ trainer."""
    groups = [(size, o) for size, o in ((split, first), (4 - split, second))]
    (cpp_params, cpp_states), (python_params, python_states) = train_both(
        build_dir, tmp_path_factory.mktemp("parity"), groups, 10
    )
    assert all(torch.equal(a, b) for a, b in zip(cpp_params, python_params))
    assert cpp_states == python_states
