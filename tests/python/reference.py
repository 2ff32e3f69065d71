"""What the tests compare the optimizer against: docs/DESIGN.md, "The algorithm", written out in
float64, step by step, and the small models and data they train."""

import math

import numpy as np
import torch
import torch.nn.functional as F

import noise_oracle
import torch_dopamine
from torch_dopamine._options import ENUM_NAMES, pack


def pack_options(overrides):
    """The packed options (dopamine::pack_options) of the optimizer's
    defaults with `overrides`, given by name as the optimizer takes them."""
    return pack({**torch_dopamine.Dopamine([torch.zeros(1, requires_grad=True)]).defaults, **overrides})


NOISE_CODES = {"gaussian": 0, "rademacher": 1}
# Every lr_adaptation rule, so that a new one is tested wherever the others are.
LR_ADAPTATIONS = list(ENUM_NAMES["lr_adaptation"])
# Unit roundoff (half an ulp at 1) of each parameter dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def state_at(step, device="cpu"):
    """A group state whose next step is `step`."""
    state = torch.zeros(len(torch_dopamine.STATE_FIELDS), dtype=torch.float64, device=device)
    state[0] = step - 1
    return state


def move(params, state, *, indices, seed=0, sigma=1.0, noise="gaussian", carried=(0, 0), to=(1, 0), masters=(),
         element_offsets=(), rank=0):
    """dopamine::move_ over one group: its parameters come from carrying
    carried = (offset, direction) to carrying `to`; with `rank`, a low-rank
    perturbation of that rank."""
    perturbation = dict(perturbation="lowrank", rank=rank) if rank else {}
    torch.ops.dopamine.move_(
        params, list(masters), [state], options=pack_options(dict(seed=seed, sigma=sigma, noise=noise, **perturbation)),
        indices=indices, group_sizes=[len(params)], carried=list(carried), to=list(to),
        element_offsets=list(element_offsets),
    )


def ops_noise(like, seed, step, index, kind="gaussian", direction=0, rank=0):
    """z for parameter `index` at `step` (of direction `direction`; of a
    low-rank perturbation of `rank`, if not 0) as the ops draw it (float32, on
    like's device): perturbing zeros by sigma = 1 yields z itself."""
    noise = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    move([noise], state_at(step, like.device), indices=[index], seed=seed, noise=kind, to=(1, direction), rank=rank)
    return noise


def rank_of(options):
    """The rank of a group's perturbation, 0 for a full one."""
    return options.get("rank", 1) if options.get("perturbation", "full") == "lowrank" else 0


def noise_of(like, seed, step, index, kind="gaussian", direction=0, rank=0):
    """The ops' z in like's dtype, after checking every element against the
    oracle (noise_oracle.py), so that the reference's noise is not the ops' word
    alone."""
    noise = ops_noise(like, seed, step, index, kind, direction, rank)
    expected, tolerance = noise_oracle.perturbation(kind, seed, step, index, tuple(noise.shape), direction, rank)
    drawn = noise.cpu().double().flatten().numpy()
    wrong = np.flatnonzero(~(np.abs(drawn - expected) <= tolerance))
    assert wrong.size == 0, (
        f"the ops' noise differs from the oracle at seed {seed}, step {step}, index {index}, direction {direction}: "
        f"element {wrong[0]} is {drawn[wrong[0]]}, expected {expected[wrong[0]]}"
    )
    return noise.to(like.dtype)


class ReferenceDopamine:
    """docs/DESIGN.md, "The algorithm", on float64 copies of the parameters, one
    group at a time, with the noise checked against the oracle. A step whose
    losses or step sizes are not all finite is skipped: it counts in the noise's
    step `t`, not in the bias correction's count of updates `n`."""

    def __init__(self, groups, storage=None):
        # groups: list of (params, options dict with every option set).
        # storage: the dtype of parameters that theta is the float32 master
        # weight of, or that round theta: the closure then sees theta and
        # theta + sigma * z rounded to it, the latter computed in float32 as
        # docs/DESIGN.md, "Precision and master weights", says. theta itself
        # is not rounded after an update: a caller comparing step by step
        # sets it from the optimizer before each step.
        self.storage = storage
        self.delta = None
        self.groups = []
        index = 0
        for params, options in groups:
            theta = [p.detach().to(torch.float64).clone() for p in params]
            self.groups.append(dict(theta=theta, o=dict(options), first=index, t=0, n=0, m=0.0, s=0.0, eta=0.0, b=0.0))
            index += len(params)

    def params(self, offset=0, direction=0):
        """theta + offset * sigma * z_direction of the next step (offset 0, 1
        or -1)."""
        out = []
        for g in self.groups:
            for i, theta in enumerate(g["theta"]):
                if offset:
                    z = noise_of(theta, g["o"]["seed"], g["t"] + 1, g["first"] + i, g["o"]["noise"], direction,
                                 rank_of(g["o"]))
                    if self.storage is None:
                        theta = theta + offset * g["o"]["sigma"] * z
                    else:
                        sigma = torch.tensor(offset * g["o"]["sigma"], dtype=torch.float32)
                        theta = theta.float() + sigma.to(theta.device) * z.float()
                if self.storage is not None:
                    theta = theta.to(self.storage)
                out.append(theta)
        return out

    def step(self, loss_fn, lrs=None):
        """One step with the first group's `antithetic` and `num_perturbations`
        (the same in every group); returns L0, or with antithetic the mean of
        the losses."""
        antithetic, directions = self.groups[0]["o"]["antithetic"], self.groups[0]["o"]["num_perturbations"]
        if antithetic:
            losses = [float(loss_fn(self.params(sign, j))) for j in range(directions) for sign in (1, -1)]
            deltas = [(losses[2 * j] - losses[2 * j + 1]) / 2 for j in range(directions)]
        else:
            losses = [float(loss_fn(self.params(0)))] + [float(loss_fn(self.params(1, j))) for j in range(directions)]
            deltas = [loss - losses[0] for loss in losses[1:]]
        self.delta = deltas[0]
        magnitude = sum(abs(delta) for delta in deltas) / directions
        finite = all(math.isfinite(loss) for loss in losses)
        planned = []
        for k, g in enumerate(self.groups):
            o = g["o"]
            if lrs is not None:
                o["lr"] = lrs[k]
            n = g["n"] + 1
            m, s, eta, b = g["m"], g["s"], o["lr"], g["b"]
            # The update's RPEs: against the prediction L0 + b of the earlier
            # updates with a baseline (one-sided only), else delta_j.
            moved = deltas
            if o.get("beta_baseline") is not None and not antithetic:
                prediction = b / (1 - o["beta_baseline"] ** (n - 1)) if n > 1 else 0.0
                moved = [delta - prediction for delta in deltas]
                b = o["beta_baseline"] * b + (1 - o["beta_baseline"]) * sum(deltas) / directions
            if o["lr_adaptation"] == "rpe_normalized":
                m = o["beta"] * g["m"] + (1 - o["beta"]) * magnitude / o["sigma"]
                eta = o["lr"] / (m / (1 - o["beta"] ** n) + o["eps"])
            elif o["lr_adaptation"] == "rpe_tracking":
                s = o["beta_s"] * g["s"] + (1 - o["beta_s"]) * magnitude
                previous = o["lr"] if n == 1 else g["eta"]
                eta = (1 - o["beta_eta"]) * previous + o["beta_eta"] * s
            elif o["lr_adaptation"] == "loss_spread":
                perturbed = losses if antithetic else losses[1:]
                mean = sum(perturbed) / len(perturbed)
                spread = math.sqrt(sum((loss - mean) ** 2 for loss in perturbed) / (len(perturbed) - 1))
                eta = 0.0 if spread == 0 else o["lr"] / (spread + o["eps"])
            if o.get("lr_min") is not None:
                eta = max(eta, o["lr_min"])
            if o.get("lr_max") is not None:
                eta = min(eta, o["lr_max"])
            finite = finite and all(math.isfinite(x) for x in (m, s, eta, b)) and all(
                math.isfinite(eta * delta / o["sigma"]) for delta in moved
            )
            planned.append((m, s, eta, b, moved))
        for g, (m, s, eta, b, moved) in zip(self.groups, planned):
            o = g["o"]
            g["t"] += 1
            if not finite:
                continue
            g["n"] += 1
            g["m"], g["s"], g["eta"], g["b"] = m, s, eta, b
            for i, theta in enumerate(g["theta"]):
                move = o["lr"] * o.get("weight_decay", 0.0) * theta
                for j, delta in enumerate(moved):
                    z = noise_of(theta, o["seed"], g["t"], g["first"] + i, o["noise"], j, rank_of(o))
                    move = move + eta * (delta / o["sigma"]) * z / directions
                theta.sub_(move)
        return sum(losses) / len(losses) if antithetic else losses[0]


def non_finite_at(loss_fn, bad_calls, per_step=2):
    """`loss_fn`, except at the (step, which, value) triples of `bad_calls`:
    evaluation `which` of the step (0 the unperturbed, 1 the first perturbed;
    `per_step` evaluations a step), steps counted from 1, returns `value`. The reference and the optimizer each get
    one."""
    calls = [0]

    def loss(params):
        calls[0] += 1
        for step, which, value in bad_calls:
            if calls[0] == per_step * (step - 1) + 1 + which:
                return torch.tensor(value, dtype=torch.float64)
        return loss_fn(params)

    return loss

def quadratic(dims, device, dtype=torch.float64, seed=0):
    """Parameters and loss of sum_i w_i (x_i - c_i)^2 over a few tensors."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(d, generator=generator, dtype=dtype).to(device).requires_grad_() for d in dims]
    centers = [torch.randn(d, generator=generator, dtype=dtype).to(device) for d in dims]
    weights = [torch.rand(d, generator=generator, dtype=dtype).to(device) + 0.5 for d in dims]

    def loss(ps):
        return sum(((w * (p.to(dtype) - c) ** 2).sum() for p, c, w in zip(ps, centers, weights)))

    return params, loss

XOR_INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_TARGETS = torch.tensor([[0.0], [1.0], [1.0], [0.0]])

class XorNet(torch.nn.Module):
    """The paper's 2-4-1 MLP: tanh hidden layer, sigmoid output."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(2, 4)
        self.output = torch.nn.Linear(4, 1)

    def forward(self, x):
        return torch.sigmoid(self.output(torch.tanh(self.hidden(x))))

def xor_net(seed):
    torch.manual_seed(seed)
    return XorNet()

def xor_loss(model):
    return F.mse_loss(model(XOR_INPUTS), XOR_TARGETS)

def snapshot(params):
    """Copies, trainable where the originals are."""
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]

def same_bits(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

def isclose(a, b, rtol, atol=0.0):
    a, b = list(a), list(b)
    return len(a) == len(b) and all(
        torch.allclose(x.double().cpu(), y.double().cpu(), rtol=rtol, atol=atol) for x, y in zip(a, b)
    )

