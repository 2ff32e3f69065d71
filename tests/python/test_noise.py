"""The noise against the independent oracle (noise_oracle.py) on every device,
and CPU against CUDA (noise.h is shared and its arithmetic is correctly rounded
on both): element by element, within 2 ulp."""

import numpy as np
import pytest
import torch

import noise_oracle
import torch_dopamine  # noqa: F401
from reference import move, ops_noise, pack_options, state_at

M = 0xFFFFFFFF


@pytest.mark.parametrize(
    "counter,key,words",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_oracle_philox_gives_random123s_known_answers(counter, key, words):
    got = noise_oracle.philox(*[np.array([c]) for c in counter], *key)
    assert tuple(int(w[0]) for w in got) == words


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("seed,step,index", [(0, 1, 0), (-5, 2**32 - 1, 7), (2**40, 3, 2**32 - 1)])
def test_kernels_draw_the_oracles_noise(device, noise, seed, step, index):
    drawn = ops_noise(torch.zeros(70001, device=device), seed, step, index, noise).cpu().double().numpy()
    expected, tolerance = noise_oracle.noise(noise, seed, step, index, drawn.size)
    assert (np.abs(drawn - expected) <= tolerance).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("numel", [1, 127, 128, 1000, 1_000_003])
def test_cpu_and_cuda_draw_the_same_noise(noise, numel):
    drawn = {}
    for device in ("cpu", "cuda"):
        params = [torch.zeros(numel, device=device), torch.zeros(5, 3, device=device).t()]
        move(params, state_at(7, device), indices=[2, 3], seed=123, noise=noise)
        drawn[device] = torch.cat([p.flatten() for p in params]).cpu()
    ulps = (drawn["cpu"].view(torch.int32).long() - drawn["cuda"].view(torch.int32).long()).abs()
    assert ulps.max().item() <= 2


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("carried,to", [((1, 0), (1, 1)), ((-1, 2), (1, 3)), ((1, 3), (-1, 1))])
def test_a_move_between_directions_is_one_pass(device, noise, dtype, carried, to):
    """x' = x + to sigma z_to - carried sigma z_carried, computed in float32
    in that order and rounded once to the parameter's dtype (two moves
    through theta would round twice); with a master weight, the rounding of
    master + to sigma z_to."""
    sigma = 0.05
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    z_to, z_carried = (ops_noise(x, 6, 2, 1, noise, p[1]) for p in (to, carried))
    sigma_f = torch.tensor(sigma, dtype=torch.float32).item()
    expected = (x.float() + z_to * (to[0] * sigma_f) - z_carried * (carried[0] * sigma_f)).to(dtype)
    moved = x.clone()
    move([moved], state_at(2, device), indices=[1], seed=6, sigma=sigma, noise=noise, carried=carried, to=to)
    assert torch.equal(moved, expected)
    if dtype != torch.float32:
        master, param = x.float(), x.clone()
        move([param], state_at(2, device), indices=[1], seed=6, sigma=sigma, noise=noise, carried=carried, to=to,
             masters=[master])
        assert torch.equal(param, (master + z_to * (to[0] * sigma_f)).to(dtype))


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("direction", [0, 3])
def test_pieces_at_element_offsets_draw_the_noise_of_their_places(device, noise, direction):
    """A tensor given an element offset draws the noise of those places of
    its parameter (a shard of a sharded parameter), for offsets off the tile
    grid and pieces shorter than a tile, in move_ and in finish_step_."""
    whole = torch.zeros(1000, device=device)
    bounds = [0, 37, 40, 300, 663, 1000]
    pieces = [torch.zeros(b - a, device=device) for a, b in zip(bounds, bounds[1:])]
    arguments = dict(seed=11, noise=noise, to=(1, direction))
    move([whole], state_at(3, device), indices=[5], **arguments)
    move(pieces, state_at(3, device), indices=[5] * len(pieces), element_offsets=bounds[:-1], **arguments)
    assert torch.equal(torch.cat(pieces), whole)
    expected = noise_oracle.noise(noise, 11, 3, 5, 1000, direction)[0]
    assert np.allclose(whole.cpu().double().numpy(), expected, rtol=0, atol=1e-5)
    # The finish of a step that moves by 0.5 z_0 and 0.25 z_1 (two directions).
    options = pack_options(dict(lr_adaptation="none", lr=0.01, sigma=1.0, seed=11, noise=noise, num_perturbations=2))
    plan = torch.ops.dopamine.plan_step(state_at(3), torch.tensor([1.0, 1.5, 1.25], dtype=torch.float64), options=options)
    finished = [torch.zeros(1000, device=device)]
    torch.ops.dopamine.finish_step_(finished, [], [state_at(3)], [plan], indices=[5], group_sizes=[1])
    parts = [torch.zeros(b - a, device=device) for a, b in zip(bounds, bounds[1:])]
    torch.ops.dopamine.finish_step_(parts, [], [state_at(3)], [plan.clone()], indices=[5] * len(parts),
                                    group_sizes=[len(parts)], element_offsets=bounds[:-1])
    assert torch.equal(torch.cat(parts), finished[0]) and finished[0].abs().sum() > 0
    with pytest.raises(RuntimeError, match="element_offsets must be empty or hold one offset per parameter"):
        move(pieces, state_at(3, device), indices=[5] * len(pieces), element_offsets=[0], **arguments)
    with pytest.raises(RuntimeError, match=r"element_offsets\[0\] must be in \[0, 2\^62\]"):
        move([whole], state_at(3, device), indices=[5], element_offsets=[-1], **arguments)
