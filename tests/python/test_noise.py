"""CPU and CUDA draw the same noise (noise.h is shared and its arithmetic is
correctly rounded on both): compared element by element, within 2 ulp."""

import pytest
import torch

import torch_dopamine  # noqa: F401
from reference import NOISE_CODES, state_at


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("numel", [1, 127, 128, 1000, 1_000_003])
def test_cpu_and_cuda_draw_the_same_noise(noise, numel):
    drawn = {}
    for device in ("cpu", "cuda"):
        params = [torch.zeros(numel, device=device), torch.zeros(5, 3, device=device).t()]
        torch.ops.dopamine.perturb_(
            params, [], state_at(7, device), indices=[2, 3], seed=123, sigma=1.0, noise=NOISE_CODES[noise], direction=1
        )
        drawn[device] = torch.cat([p.flatten() for p in params]).cpu()
    ulps = (drawn["cpu"].view(torch.int32).long() - drawn["cuda"].view(torch.int32).long()).abs()
    assert ulps.max().item() <= 2
