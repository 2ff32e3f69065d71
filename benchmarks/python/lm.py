"""The fine-tuning task's pieces: a small byte-level decoder-only transformer,
its two text domains (both already on the machine), its pretraining with
AdamW (cached, keyed by its configuration), and low-rank adapters over a
frozen base. examples/finetune_lm.py builds on them too.

- Pretraining text: the Python standard library's top-level sources.
- Fine-tuning text: Debian's licence texts (/usr/share/common-licenses),
  English prose, split by position into train (80%), validation (10%) and
  test (10%).
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
import sysconfig
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

LICENSES = Path("/usr/share/common-licenses")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The model and its pretraining: everything the cached checkpoint
    depends on, with the corpus's digest."""

    layers: int = 2
    width: int = 128
    heads: int = 4
    context: int = 64
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    seed: int = 0


# --- Text -------------------------------------------------------------------


def _read(paths: List[str]) -> torch.Tensor:
    data = b"".join(Path(p).read_bytes() for p in sorted(paths) if os.path.isfile(p))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def pretraining_text() -> torch.Tensor:
    """The Python standard library's top-level sources, as bytes."""
    return _read(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def finetuning_splits() -> Dict[str, torch.Tensor]:
    """The licence texts as bytes: train, validation and test, by position."""
    if not LICENSES.is_dir():
        raise FileNotFoundError(f"{LICENSES} is missing: the fine-tuning text is Debian's licence texts (base-files)")
    text = _read([str(p) for p in LICENSES.iterdir()])
    validation, test = int(0.8 * len(text)), int(0.9 * len(text))
    return {"train": text[:validation], "validation": text[validation:test], "test": text[test:]}


def batch_of(text: torch.Tensor, context: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` windows of context + 1 bytes at random places of `text`."""
    starts = torch.randint(0, len(text) - context - 1, (size,), generator=generator)
    return torch.stack([text[s : s + context + 1] for s in starts.tolist()])


def evaluation_windows(text: torch.Tensor, context: int, count: int = 64) -> torch.Tensor:
    """`count` windows spread evenly over `text`: the same every time."""
    starts = torch.linspace(0, len(text) - context - 2, count).long()
    return torch.stack([text[s : s + context + 1] for s in starts.tolist()])


# --- Model ------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, 4 * width)
        self.fc2 = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(torch.nn.Module):
    """A decoder-only transformer over bytes (vocabulary 256)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.embed = torch.nn.Embedding(256, config.width)
        self.position = torch.nn.Parameter(torch.zeros(config.context, config.width))
        self.blocks = torch.nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.norm = torch.nn.LayerNorm(config.width)
        self.head = torch.nn.Linear(config.width, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over the windows, in float32."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, 256), windows[:, 1:].reshape(-1))


# --- Pretraining, cached -----------------------------------------------------


def checkpoint_key(config: LMConfig, text: torch.Tensor) -> str:
    """The configuration and a digest of the corpus, hashed: the cache key."""
    corpus = hashlib.sha256(text.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    described = json.dumps({**dataclasses.asdict(config), "corpus": corpus, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def checkpoint_path(config: LMConfig, cache_dir: Path) -> Path:
    """Where `pretrained` caches the model of `config` under `cache_dir`."""
    return Path(cache_dir) / f"tinylm-{checkpoint_key(config, pretraining_text())}.pt"


def pretrained(
    config: LMConfig, cache_dir: Path, progress: Optional[Callable[[int, float], None]] = None
) -> TinyLM:
    """The model pretrained with AdamW on the Python sources, from
    `cache_dir` when a checkpoint of this configuration is there; else
    trained (seeded) and saved there. `progress(step, loss)` is called
    during training."""
    text = pretraining_text()
    path = checkpoint_path(config, cache_dir)
    model = TinyLM(config)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    torch.manual_seed(config.seed)
    model = TinyLM(config)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.01)
    for step in range(config.pretrain_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.pretrain_lr * 0.5 * (1 + math.cos(math.pi * step / config.pretrain_steps))
        loss = lm_loss(model, batch_of(text, config.context, config.pretrain_batch, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, loss.item())
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: a run stopped half-way leaves no checkpoint.
    partial = path.with_suffix(f".{os.getpid()}.{time.time_ns()}.partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    return model


# --- Low-rank adapters --------------------------------------------------------


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W x + b +
    (alpha / rank) B A x, with B zero at the start, so the adapted model
    starts as the base."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float = 1.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        weight = base.weight
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features, dtype=weight.dtype) / math.sqrt(base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a), self.b)


def add_adapters(model: TinyLM, rank: int) -> List[torch.nn.Parameter]:
    """Freezes `model` and puts an adapter of `rank` on every linear layer of
    its blocks; returns the adapters' parameters, the only trainable ones."""
    model.requires_grad_(False)
    for block in model.blocks:
        for name in ("qkv", "proj", "fc1", "fc2"):
            setattr(block, name, LoRALinear(getattr(block, name), rank))
    return [p for p in model.parameters() if p.requires_grad]
