"""Fine-tuning a pretrained language model forward-only, with adapters.

A small byte-level transformer is pretrained with AdamW on the Python
standard library's sources (or loaded from the cache of an earlier run),
then fine-tuned on Debian's licence texts by Dopamine: low-rank adapters
over a frozen bfloat16 base, the adapters kept in float32 master weights, no
backward pass. It prints a progress bar with the loss, the validation loss
and perplexity before and after, and writes the loss curve as a PNG.

    python examples/finetune_lm.py --steps 300 --out results/finetune_lm

The model, the texts and the adapters are benchmarks/python/lm.py's, the
benchmark's fine-tuning task. Needs the built package (``make python``)
and matplotlib; tqdm, where installed, draws the progress bar.
"""

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "python"))

import lm  # noqa: E402

import torch_dopamine  # noqa: E402


def progress_bar(total: int, description: str):
    """tqdm's bar where tqdm is installed, else a line every tenth of the way."""
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=description, unit="step")
        return bar.update, bar.set_postfix_str, bar.close
    except ImportError:
        done = [0]
        last = [""]

        def update(n: int = 1) -> None:
            done[0] += n
            if done[0] % max(1, total // 10) == 0 or done[0] == total:
                print(f"{description}: {done[0]}/{total} {last[0]}", flush=True)

        def postfix(text: str) -> None:
            last[0] = text

        return update, postfix, lambda: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    parser.add_argument("--batch", type=int, default=32, help="windows of 64 bytes per step (default 32)")
    parser.add_argument("--rank", type=int, default=4, help="the adapters' rank (default 4)")
    parser.add_argument("--lr", type=float, default=0.01, help="Dopamine's lr (default 0.01)")
    parser.add_argument("--sigma", type=float, default=0.01, help="Dopamine's sigma (default 0.01)")
    parser.add_argument("--pretrain-steps", type=int, default=lm.LMConfig.pretrain_steps,
                        help=f"AdamW pretraining steps (default {lm.LMConfig.pretrain_steps})")
    parser.add_argument("--base-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the frozen base's dtype (default bfloat16; on a CPU without native bfloat16 "
                        "matrix units, float32 runs about ten times faster)")
    parser.add_argument("--cache", type=Path, default=REPO / "results" / "lm_cache",
                        help="where the pretrained checkpoint is cached (default results/lm_cache)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "finetune_lm",
                        help="where the loss curve goes (default results/finetune_lm)")
    args = parser.parse_args()

    config = dataclasses.replace(lm.LMConfig(), pretrain_steps=args.pretrain_steps)
    checkpoint = lm.checkpoint_path(config, args.cache)
    if checkpoint.exists():
        print(f"loading the pretrained model from {checkpoint}")
        model = lm.pretrained(config, args.cache)
    else:
        update, postfix, close = progress_bar(config.pretrain_steps, "pretraining (AdamW)")

        def pretraining_progress(step: int, loss: float) -> None:
            update(1)
            postfix(f"loss {loss:.3f}")

        model = lm.pretrained(config, args.cache, pretraining_progress)
        close()
        print(f"cached the pretrained model as {checkpoint}")

    # The base frozen in --base-dtype; the adapters in it too, with float32
    # master weights that accumulate the small steps a bfloat16 would round away.
    model = model.to(getattr(torch, args.base_dtype))
    adapters = lm.add_adapters(model, args.rank)
    optimizer = torch_dopamine.Dopamine(adapters, lr=args.lr, sigma=args.sigma, master_weights=True)
    splits = lm.finetuning_splits()
    validation = lm.evaluation_windows(splits["validation"], config.context)

    def validation_loss() -> float:
        with torch.no_grad():
            return lm.lm_loss(model, validation).item()

    before = validation_loss()
    print(f"fine-tuning {sum(p.numel() for p in adapters)} adapter parameters over a frozen base of "
          f"{sum(p.numel() for p in model.parameters() if not p.requires_grad)} in {args.base_dtype}; "
          f"validation loss {before:.4f} nats/byte (perplexity {math.exp(before):.3f})")
    generator = torch.Generator().manual_seed(1)
    curve = []
    update, postfix, close = progress_bar(args.steps, "fine-tuning (Dopamine, forward only)")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        windows = lm.batch_of(splits["train"], config.context, args.batch, generator)
        loss = float(optimizer.step(lambda: lm.lm_loss(model, windows)))
        if not math.isfinite(loss):
            close()
            sys.exit(f"step {step}: the loss is {loss}; lower --lr or --sigma")
        curve.append(loss)
        update(1)
        postfix(f"loss {loss:.3f}")
    close()
    seconds = time.perf_counter() - start
    after = validation_loss()
    print(f"after {args.steps} steps ({seconds:.1f} s): validation loss {after:.4f} nats/byte "
          f"(perplexity {math.exp(after):.3f}), {before - after:+.4f} from the pretrained model")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(curve) + 1), curve, lw=0.8, label="training batch")
    axes.axhline(before, color="grey", ls="--", lw=0.8, label="validation, pretrained")
    axes.axhline(after, color="black", ls="--", lw=0.8, label="validation, fine-tuned")
    axes.set(xlabel="step", ylabel="loss (nats/byte)", title=f"Dopamine, LoRA over a {args.base_dtype} base")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "loss_curve.png", dpi=120)
    print(f"wrote {args.out / 'loss_curve.png'}")


if __name__ == "__main__":
    main()
