"""Fine-tuning at the forward-only methods' own budget.

The gradient references (SGD, Adam) train for the task's horizon; each
forward-only contender trains for `--multiple` (10) times their forward
passes, a backward counted as two: the regime MeZO's users accept in
exchange for memory. Every contender keeps the configuration tuned at the
task's horizon (benchmarks/tuned.json): a constant schedule runs on as it
was, a cosine one decays over the longer horizon. Reported: the test loss at
the end of each budget, and the forward passes each needs to reach Adam's
median final test loss, where it does (docs/BENCHMARKS.md, "Fine-tuning at
ten times the forward passes"). Peak memory is the main suite's.

    python benchmarks/python/finetune_budget.py [--tasks finetune-lora] [--multiple 10] [--out results]

Writes OUT/finetune_budget.json and OUT/finetune_budget.md.
"""

import argparse
import json
import math
import time
from pathlib import Path

import protocol
import tasks
from harness import CONTENDERS, Progress, machine, median
from run_suite import TUNED, load_tuned


def horizons(task: tasks.Task, multiple: int) -> dict:
    """Each contender's steps: the task's for the gradient references, and
    `multiple` times their forward passes for the forward-only ones."""
    names = protocol.contenders_of(task)
    reference = max(CONTENDERS[n].forward_equivalents_per_step for n in names if CONTENDERS[n].gradient)
    return {
        name: task.steps
        if CONTENDERS[name].gradient
        else multiple * task.steps * reference // CONTENDERS[name].forward_equivalents_per_step
        for name in names
    }


def forwards_to(run: dict, name: str, target: float) -> float:
    """The forward passes a run had spent when its held-out loss first
    reached `target`; inf if it never did."""
    for step, _, _, metric in run["curve"]:
        if metric is not None and metric <= target:
            return step * CONTENDERS[name].forward_equivalents_per_step
    return math.inf


def study(task: tasks.Task, tuned: dict, multiple: int, workers: int, progress) -> dict:
    task.prepare(progress)
    steps = horizons(task, multiple)
    jobs = [
        protocol.Job(task.name, False, name, tuned[name]["lr"], tuned[name]["schedule"], seed, "test", steps[name])
        for name in steps
        for seed in task.seeds
    ]
    results = protocol.run_jobs(jobs, workers, progress, f"{task.name} at {multiple}x the forward passes")
    runs_of = protocol.runs_by_contender(list(steps), len(task.seeds), results)
    adam_final = median([protocol.final_value(task, r) for r in runs_of["adam"]])
    rows = {}
    for name, runs in runs_of.items():
        finals = [protocol.final_value(task, r) for r in runs]
        reached = [forwards_to(r, name, adam_final) for r in runs]
        rows[name] = dict(
            lr=tuned[name]["lr"],
            schedule=tuned[name]["schedule"],
            steps=steps[name],
            forwards=steps[name] * CONTENDERS[name].forward_equivalents_per_step,
            diverged=sum(r["diverged"] for r in runs),
            final_test_loss=median(finals),
            ci95=protocol.bootstrap_ci(finals),
            vs_adam=median(finals) / adam_final,
            reached_adam=sum(math.isfinite(f) for f in reached),
            median_forwards_to_adam=median(reached),
            median_seconds=median([r["seconds"] for r in runs]),
            runs=[dict(final_metric=r["final_metric"], diverged=r["diverged"], steps=r["steps"]) for r in runs],
        )
    return dict(task=task.name, multiple=multiple, seeds=task.seeds, adam_final_test_loss=adam_final, rows=rows)


def table(result: dict) -> list:
    lines = [
        f"### {result['task']}: forward-only contenders at {result['multiple']}x the gradient references' forward passes",
        "",
        f"Scoring seeds {result['seeds']}; Adam's median final test loss: {result['adam_final_test_loss']:.4f}.",
        "",
        "| optimizer | lr, schedule | steps | forward passes | diverged | final test loss [95% CI] | / Adam's | "
        "reached Adam's loss | median forwards to it | median seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        ci = r["ci95"] or [math.nan, math.nan]
        lines.append(
            f"| {name} | {r['lr']:.3g} {r['schedule']} | {r['steps']} | {r['forwards']} | {r['diverged']}/{len(result['seeds'])} "
            f"| {r['final_test_loss']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {r['vs_adam']:.3f} "
            f"| {r['reached_adam']}/{len(result['seeds'])} | {r['median_forwards_to_adam']:.4g} | {r['median_seconds']:.1f} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["finetune-lora"], choices=["finetune-full", "finetune-lora"])
    parser.add_argument("--multiple", type=int, default=10, help="the forward-only budget, in the gradient references' forward passes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    progress = Progress()
    progress(f"machine: {machine()}")
    chosen = [tasks.task_named(name, False) for name in args.tasks]
    tuned = load_tuned(TUNED, "quick", {task.name: protocol.contenders_of(task) for task in chosen})["tasks"]
    results = [study(task, tuned[task.name], args.multiple, args.workers, progress) for task in chosen]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), workers=args.workers)
    (args.out / "finetune_budget.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    lines = [line for result in results for line in table(result) + [""]]
    (args.out / "finetune_budget.md").write_text("\n".join(lines))
    print("\n".join(lines))
    progress(f"wrote {args.out / 'finetune_budget.json'} and {args.out / 'finetune_budget.md'}")


if __name__ == "__main__":
    main()
