"""CPU and CUDA draw the same noise: z from perturb_ on zeros on each device,
compared element by element in units in the last place (float32)."""

import sys

import torch

import torch_dopamine  # noqa: F401

worst = 0
for noise in ("gaussian", "rademacher"):
    for numel in (1, 127, 128, 1000, 1_000_003):
        z = {}
        for device in ("cpu", "cuda"):
            params = [torch.zeros(numel, device=device), torch.zeros(3, 5, device=device).t()]
            torch.ops.dopamine.perturb_(params, 123, 7, 2, 1.0, noise)
            z[device] = torch.cat([p.flatten() for p in params]).cpu()
        ulps = (z["cpu"].view(torch.int32).long() - z["cuda"].view(torch.int32).long()).abs().max().item()
        worst = max(worst, ulps)
        print(f"{noise:10s} numel {numel:8d}: max difference {ulps} ulp")
print(f"worst: {worst} ulp (required: <= 2)")
sys.exit(0 if worst <= 2 else 1)
