"""C++/Python parity: the same TorchScript module trained by dopamine::Dopamine
(tests/cpp/parity_train.cpp) and by torch_dopamine.Dopamine, over the same
parameter groups and options."""

import subprocess

import torch

import torch_dopamine


class ParityModel(torch.nn.Module):
    """A 3-8-1 tanh MLP in float64 whose forward() returns its MSE on fixed
    data; four parameters (hidden weight and bias, output weight and bias).
    float64, so that the update's coefficients reach the parameters unrounded:
    a difference in the last bit of a float64 option shows."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.hidden = torch.nn.Linear(3, 8, dtype=torch.float64)
        self.output = torch.nn.Linear(8, 1, dtype=torch.float64)
        self.register_buffer("inputs", torch.randn(16, 3, generator=generator, dtype=torch.float64))
        self.register_buffer("targets", torch.randn(16, 1, generator=generator, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        prediction = self.output(torch.tanh(self.hidden(self.inputs)))
        return torch.nn.functional.mse_loss(prediction, self.targets)


def group_argument(size, options):
    """parity_train's GROUP argument: None as "none" (an optional option
    unset, whatever the C++ default)."""
    return ",".join([f"size={size}"] + [f"{key}={value!r}" if isinstance(value, float) else f"{key}={'none' if value is None else value}"
                                        for key, value in options.items()])


def train_both(build_dir, directory, groups, steps, antithetic=False):
    """Trains ParityModel in C++ and in Python over `groups`, a list of
    (number of parameters, options), with the defaults' `antithetic`. Returns
    each side's parameters and group states."""
    trainer = build_dir / "tests" / "cpp" / "dopamine_parity_train"
    assert trainer.exists(), f"{trainer} not built; run `make build` (or set DOPAMINE_BUILD_DIR)"
    path = directory / "parity.pt"
    torch.jit.save(torch.jit.script(ParityModel()), path)
    trained = directory / "parity_trained.pt"
    result = subprocess.run(
        [str(trainer), str(path), str(steps), str(trained)]
        + (["--antithetic"] if antithetic else [])
        + [group_argument(size, o) for size, o in groups],
        check=True, capture_output=True, text=True,
    )
    cpp_states = [[float(x) for x in line.split()] for line in result.stdout.splitlines()]
    cpp_params = list(torch.jit.load(trained).parameters())

    module = torch.jit.load(path)
    params = list(module.parameters())
    param_groups, first = [], 0
    for size, options in groups:
        param_groups.append(dict(options, params=params[first:first + size]))
        first += size
    opt = torch_dopamine.Dopamine(param_groups, antithetic=antithetic)
    for _ in range(steps):
        opt.step(lambda: module())
    python_states = [list(opt.group_state(g).values()) for g in range(len(groups))]
    return (cpp_params, cpp_states), ([p.detach() for p in params], python_states)
