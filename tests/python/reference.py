"""What the tests compare the optimizer against: docs/DESIGN.md, "The algorithm", written out in
float64, step by step, and the small models and data they train."""

import torch
import torch.nn.functional as F


NOISE_CODES = {"gaussian": 0, "rademacher": 1}


def state_at(step, device="cpu"):
    """A group state whose next step is `step`."""
    state = torch.zeros(5, dtype=torch.float64, device=device)
    state[0] = step - 1
    return state


def noise_of(like, seed, step, index, kind="gaussian"):
    """z for parameter `index` at `step`: perturbing zeros by sigma = 1 yields
    z itself, so the tests read the noise without a second noise source."""
    noise = torch.zeros_like(like)
    torch.ops.dopamine.perturb_(
        [noise], [], state_at(step), indices=[index], seed=seed, sigma=1.0, noise=NOISE_CODES[kind], direction=1
    )
    return noise

class ReferenceDopamine:
    """docs/DESIGN.md, "The algorithm", on float64 copies of the parameters, one group at a time."""

    def __init__(self, groups):
        # groups: list of (params, options dict with every option set)
        self.groups = []
        index = 0
        for params, options in groups:
            theta = [p.detach().to(torch.float64).clone() for p in params]
            self.groups.append(dict(theta=theta, o=dict(options), first=index, t=0, m=0.0, s=0.0, eta=0.0))
            index += len(params)

    def params(self, perturbed=False):
        out = []
        for g in self.groups:
            for i, theta in enumerate(g["theta"]):
                if perturbed:
                    z = noise_of(theta, g["o"]["seed"], g["t"] + 1, g["first"] + i, g["o"]["noise"])
                    theta = theta + g["o"]["sigma"] * z
                out.append(theta)
        return out

    def step(self, loss_fn, lrs=None):
        l0 = float(loss_fn(self.params()))
        l1 = float(loss_fn(self.params(perturbed=True)))
        delta = l1 - l0
        for k, g in enumerate(self.groups):
            o = g["o"]
            if lrs is not None:
                o["lr"] = lrs[k]
            g["t"] += 1
            eta = o["lr"]
            if o["lr_adaptation"] == "rpe_normalized":
                g["m"] = o["beta"] * g["m"] + (1 - o["beta"]) * abs(delta) / o["sigma"]
                eta = o["lr"] / (g["m"] / (1 - o["beta"] ** g["t"]) + o["eps"])
            elif o["lr_adaptation"] == "rpe_tracking":
                g["s"] = o["beta_s"] * g["s"] + (1 - o["beta_s"]) * abs(delta)
                previous = o["lr"] if g["t"] == 1 else g["eta"]
                eta = (1 - o["beta_eta"]) * previous + o["beta_eta"] * g["s"]
            if o.get("lr_min") is not None:
                eta = max(eta, o["lr_min"])
            if o.get("lr_max") is not None:
                eta = min(eta, o["lr_max"])
            g["eta"] = eta
            for i, theta in enumerate(g["theta"]):
                z = noise_of(theta, o["seed"], g["t"], g["first"] + i, o["noise"])
                grad = (delta / o["sigma"]) * z
                theta.sub_(eta * grad + o["lr"] * o.get("weight_decay", 0.0) * theta)
        return l0

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
    return all(torch.allclose(x.double().cpu(), y.double().cpu(), rtol=rtol, atol=atol) for x, y in zip(a, b))

