"""results/REPORT.md and the plots, from the records of one run."""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # a machine without it (a lent GPU) still gets the tables
    plt = None

import math

import directions
import protocol
from harness import DOPAMINE_DEFAULTS, with_directions

TASKS = ["xor", "lorenz", "rossler", "digits", "spirals"]
FINETUNE_TASKS = ["finetune-full", "finetune-lora"]
GRADIENT = ("sgd", "sgd[foreach]", "adam", "adam[foreach]", "adam[fused]")
# The forward-only peers the default must beat, as the report names them.
PEERS = {
    "wp": "standard WP",
    "wp[k=4]": "WP with four Rademacher directions",
    "zo-sgd[central]": "MeZO's central difference",
    "fzoo": "FZOO",
}


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def _ci(interval, digits=3):
    return f"[{_fmt(interval[0], digits)}, {_fmt(interval[1], digits)}]" if interval else "-"


def _selected(records, task, front_end="python"):
    return {
        r["optimizer"]: r
        for r in records
        if r["task"] == task and r["front_end"] == front_end and r["config"].get("selected", True) and "study" not in r
    }


def _rows_by_task(records, task_names, needed=()) -> Dict[str, Dict[str, dict]]:
    """Each task's selected rows by optimizer, for the tasks that have rows
    (and every optimizer of `needed`)."""
    rows_by_task = {task: _selected(records, task) for task in task_names}
    return {task: rows for task, rows in rows_by_task.items() if rows and all(name in rows for name in needed)}


def _task_table(rows: Dict[str, dict]) -> List[str]:
    lines = [
        "| optimizer | lr, schedule | solved | diverged | median final metric [95% CI] | at equal forwards [95% CI] "
        "| median steps to target | median forwards to target | median s to target | ms/step | fwd/bwd per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        edge = " (grid edge)" if r.get("at_grid_edge") else ""
        lines.append(
            f"| {name} | {_fmt(r['config']['lr'])} {r.get('schedule', 'constant')}{edge} | {r['success_rate']:.0%} "
            f"| {r.get('divergences', 0)}/{r['config'].get('seeds', '?')} | {_fmt(r['final_metric'], 4)} {_ci(r.get('ci95'))} "
            f"| {_fmt(r.get('metric_at_equal_forwards'), 4)} {_ci(r.get('ci95_at_equal_forwards'))} "
            f"| {_fmt(r['median_steps_to_target'])} | {_fmt(r.get('median_forwards_to_target'))} "
            f"| {_fmt(r['median_seconds_to_target'])} | {_fmt(r['ms_per_step'])} "
            f"| {r['forward_passes_per_step']}/{r['backward_passes_per_step']} |"
        )
    return lines


def _versus(task: str, row: dict, other: dict) -> str:
    """Row against other on the task's figure, as a ratio (< 1: row better
    for error-like figures; for accuracy the ratio of errors)."""
    if task == "xor":
        if row["success_rate"] != other["success_rate"]:
            return f"solved {row['success_rate']:.0%} vs {other['success_rate']:.0%}"
        a, b = row["median_steps_to_target"], other["median_steps_to_target"]
        return f"{a / b:.2f}x the steps" if a and b else "neither solved"
    a, b = protocol.cost(row), protocol.cost(other)
    what = "test error" if row["higher_is_better"] else row["metric"]
    return f"{a / b:.2f}x the {what}" if math.isfinite(a) and math.isfinite(b) and b > 0 else f"{_fmt(a)} vs {_fmt(b)} {what}"


def _task_heading(level: str, task: str, first: dict, scoring: str) -> List[str]:
    """A task's heading, its configuration as `key: value` pairs, how its
    configurations were selected, and `scoring`."""
    configuration = ", ".join(f"**{key}**: {value}" for key, value in (first["config"] or {}).items())
    return [f"{level} {task}", "", f"Configuration: {configuration}", "", f"Selection: {first.get('chosen_by')}. {scoring}", ""]


def _claims_section(records) -> List[str]:
    """The claims of the main suite and of the scaling runs under one
    heading, or nothing where the run has neither."""
    body = [*_claims(records), "", *_cost_claims(records)]
    return ["## Claims", "", *body, ""] if any(body) else []


def _claims(records) -> List[str]:
    # Only tasks whose main suite scored the defaults: a run of the directions
    # study alone has none, and "every task" of none would read as met.
    rows_by_task = {task: rows for task, rows in _rows_by_task(records, TASKS).items() if "dopamine" in rows}
    if not rows_by_task:
        return []
    lines = [
        "Dopamine with its default options against the forward-only peers on each task's rule (XOR: success rate, then "
        "median steps to target; the others: median final metric over the scoring seeds), and no more divergences:",
        "",
        "| task | " + " | ".join(f"vs {peer}" for peer in PEERS) + " | vs sgd, equal forwards | vs adam, equal forwards | vs adam, time to target |",
        "|---|" + "---|" * (len(PEERS) + 3),
    ]
    wins = {peer: 0 for peer in PEERS}
    for task, rows in rows_by_task.items():
        d = rows["dopamine"]
        cells = []
        for peer in PEERS:
            other = rows.get(peer)
            if other is None:
                cells.append("-")
                continue
            won = protocol.beats(d, other)
            wins[peer] += won
            cells.append(f"{'**beats**' if won else 'loses'} ({_versus(task, d, other)}; diverged {d['divergences']} vs {other['divergences']})")
        for name in ("sgd", "adam"):
            g = rows.get(name)
            if g is None:
                cells.append("-")
            elif task == "xor":
                cells.append(f"solved within the budget {d['solved_within_equal_forwards']:.0%} vs {g['solved_within_equal_forwards']:.0%}")
            else:
                a, b = protocol.cost(d, True), protocol.cost(g, True)
                cells.append(f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else f"{_fmt(a)} vs {_fmt(b)}")
        adam = rows.get("adam")
        if adam and d["median_seconds_to_target"] and adam["median_seconds_to_target"]:
            cells.append(f"{d['median_seconds_to_target'] / adam['median_seconds_to_target']:.2f}x")
        else:
            cells.append(f"solved {d['success_rate']:.0%} vs {adam['success_rate']:.0%}" if adam else "-")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    n = len(rows_by_task)
    verdict = all(wins[peer] == n for peer in PEERS)
    lines += [
        "",
        "- Dopamine beats "
        + "; ".join(f"**{title}** ({peer}) on {wins[peer]} of {n} tasks" for peer, title in PEERS.items())
        + f". The target (every task against every peer) is {'met' if verdict else '**not met**'} by this run.",
        "- Ratios at equal forwards compare each run's metric when it had spent the same number of forward passes "
        f"({protocol.BUDGET_FORWARDS_PER_STEP} per step of the horizon; a backward counts as two), read off its curve: a "
        "cosine schedule tuned for the whole horizon is then read mid-decay, which favours constant schedules.",
    ]
    return lines


# Three step-size rules over the same four Rademacher directions: the
# ablation that tells what the paper's RPE rule adds to the averaging of
# directions (the study's pairs tell it for the default rule at every k).
RULES = {"dopamine[k=4,no_baseline]": "the paper's RPE", "wp[k=4]": "none (WP)", "fzoo": "loss spread (FZOO)"}
RPE_RULE = next(iter(RULES))


def _rule_ablation(records) -> List[str]:
    rows_by_task = _rows_by_task(records, TASKS, RULES)
    if not rows_by_task:
        return []
    lines = [
        "## The paper's RPE rule against the same directions without it",
        "",
        "The same four Rademacher directions a step (5 forward passes), each rule tuned with the same budget, so equal "
        "steps are equal forward passes. XOR: seeds solved and median steps to target; the others: median final metric "
        "[95% CI]; then divergences.",
        "",
        "| task | "
        + " | ".join(f"{title} (`{name}`)" for name, title in RULES.items())
        + " | "
        + " | ".join(f"RPE against {title}" for name, title in RULES.items() if name != RPE_RULE)
        + " |",
        "|---|" + "---|" * (2 * len(RULES) - 1),
    ]
    for task, rows in rows_by_task.items():
        cells = []
        for name in RULES:
            r = rows[name]
            figure = (
                f"{r['success_rate']:.0%}, {_fmt(r['median_steps_to_target'])} steps"
                if task == "xor"
                else f"{_fmt(r['final_metric'], 4)} {_ci(r.get('ci95'))}"
            )
            cells.append(f"{figure}; {r['divergences']}/{r['config'].get('seeds', '?')} diverged")
        d = rows[RPE_RULE]
        for other in (name for name in RULES if name != RPE_RULE):
            cells.append(f"{'**beats**' if protocol.beats(d, rows[other]) else 'loses'} ({_versus(task, d, rows[other])})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines + [""]


def _interval_at_budget(task: str, r: dict) -> Optional[List[float]]:
    """The 95% interval of a directions-study row's figure: XOR's in forward
    passes to target."""
    if task == "xor":
        return [r["forward_equivalents_per_step"] * bound for bound in r["ci95_steps"]] if r.get("ci95_steps") else None
    return r.get("ci95")


def _intervals(task: str, r: dict, other: dict) -> str:
    """Whether two rows' 95% intervals are disjoint."""
    a, b = _interval_at_budget(task, r), _interval_at_budget(task, other)
    if not (a and b):
        return "an interval unknown"
    return "intervals disjoint" if a[1] < b[0] or b[1] < a[0] else "intervals overlap"


def _verdict(r: dict, other: dict) -> str:
    """r against other at equal forward passes (protocol.beats). Neither
    beats the other on equal figures, or where the better figure has more
    divergences."""
    if protocol.beats(r, other, per_forward=True):
        return "beats"
    return "loses" if protocol.beats(other, r, per_forward=True) else "neither beats"


# Where the interval of a paired ratio lies: r better on the seeds, the
# seeds do not tell, r worse.
SIDES = ("below 1", "across 1", "above 1")


def _paired(r: dict, other: dict) -> Tuple[str, str]:
    """r against other seed by seed at equal forward passes
    (protocol.paired): the median ratio of their costs [95% CI] with the
    seeds r won and lost and their sign test; and where the interval lies:
    below 1 (r better on the seeds), above 1, or across 1 (the seeds do not
    tell; an interval that reaches 1 is across it)."""
    pair = protocol.paired(r, other, per_forward=True)
    low, high = pair["ci95"]
    side = SIDES[0] if high < 1 else SIDES[2] if low > 1 else SIDES[1]
    seeds = f"won {pair['won']}, lost {pair['lost']} of {len(r['per_seed'])} (p {pair['p']:.2g})"
    return f"{_fmt(pair['ratio'])} {_ci(pair['ci95'])}, {seeds}", side


def _sides(pairs: Dict[str, List[str]]) -> str:
    """`pairs` (cells by the SIDES their interval lies on) in a sentence."""
    return "; ".join(f"{side}: {', '.join(cells) if cells else 'none'}" for side, cells in pairs.items())


def _at_budget(task: str, r: dict) -> str:
    """A directions-study row's figure at its budget of forward passes:
    XOR the seeds solved and the median forward passes to target over every
    seed (a failure infinite), the others the median final metric; each
    with its 95% interval, the divergences, and whether its lr sat at an
    end of its grid."""
    if task == "xor":
        median_forwards = r["forward_equivalents_per_step"] * r["median_steps_all_runs"]
        figure = f"{r['success_rate']:.0%}, {_fmt(median_forwards)} fwd {_ci(_interval_at_budget(task, r))}"
    elif math.isfinite(r["final_metric"]):
        figure = f"{_fmt(r['final_metric'], 3)} {_ci(_interval_at_budget(task, r))}"
    else:
        figure = "most runs diverged"
    edge = ", lr at grid edge" if r.get("at_grid_edge") else ""
    return f"{figure}; {r['divergences']}/{r['config'].get('seeds', '?')} div.{edge}"


def _directions(records) -> List[str]:
    """The directions study (directions.py): each forward-only method at the
    k its tuning chose, and the RPE rule against WP at every k, all at an
    equal budget of forward passes."""
    rows = [r for r in records if r.get("study") == "directions"]
    if not rows:
        return []
    by_task: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], {})[r["optimizer"]] = r
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "## Every forward-only method at its best number of directions",
        "",
        f"Each method with k directions ran the budget of forward passes ({protocol.BUDGET_FORWARDS_PER_STEP} x the task's "
        "horizon) in as many steps as that buys, tuned with the same grid and seeds at that horizon; its tuning seeds chose "
        "its k. XOR: seeds solved and median forward passes to target [95% CI]; the others: median final metric [95% CI]; "
        "then divergences.",
        "",
        f"| task | Dopamine's defaults (k={DOPAMINE_DEFAULTS['num_perturbations']}) | " + " | ".join(f"{method} at its k" for method in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    peers = [method for method in methods if method != directions.RULE]
    wins = {method: 0 for method in peers}
    # Dopamine at the k its tuning chose, against the same peers.
    wins_at_its_k = dict(wins)
    # The defaults against each peer at its k, seed by seed, per task.
    paired_cells = {}
    for task, named in by_task.items():
        default = named[with_directions(directions.RULE, DOPAMINE_DEFAULTS["num_perturbations"])]
        chosen = {r["method"]: r for r in named.values() if r["chosen"]}
        paired_cells[task] = [_paired(default, chosen[method]) for method in peers]
        cells = [_at_budget(task, default)]
        for method in methods:
            r = chosen[method]
            if method == directions.RULE:
                cells.append(f"k={r['directions']}: {_at_budget(task, r)}")
                continue
            verdict = _verdict(default, r)
            wins[method] += verdict == "beats"
            wins_at_its_k[method] += _verdict(chosen[directions.RULE], r) == "beats"
            outcome = dict(beats="beaten", loses="not beaten").get(verdict, verdict)
            cells.append(f"k={r['directions']}: {_at_budget(task, r)} ({outcome})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "- Dopamine's defaults beat, at equal forward passes, "
        + "; ".join(f"{method} at its k on {wins[method]} of {len(by_task)} tasks" for method in wins)
        + ". The target (every task against every peer) is "
        + ("met" if all(n == len(by_task) for n in wins.values()) else "**not met**")
        + " by this run.",
        "- Dopamine at the k its tuning chose beats "
        + "; ".join(f"{method} on {wins_at_its_k[method]} of {len(by_task)}" for method in wins_at_its_k)
        + ".",
        "",
        "Seed by seed: a scoring seed starts every contender from the same initialisation and data, so the ratio of the "
        "defaults' cost to a peer's on each seed (< 1: the defaults better; XOR forward passes to target, accuracy the "
        "error) leaves out what the seeds share. Median ratio [95% CI], the seeds the defaults won and lost, and the "
        "two-sided sign test of that split (p):",
        "",
        "| task | " + " | ".join(f"vs {method} at its k" for method in peers) + " |",
        "|---|" + "---|" * len(peers),
    ]
    sides = {side: [] for side in SIDES}
    for task, cells in paired_cells.items():
        lines.append(f"| {task} | " + " | ".join(text for text, _ in cells) + " |")
        for method, (_, side) in zip(peers, cells):
            sides[side].append(f"{method} on {task}")
    lines += [
        "",
        f"- The defaults' paired interval against each peer at its k lies {_sides(sides)}.",
        "",
        "The ablation: the RPE rule (`dopamine[k=K]`) against no adaptation (`wp[k=K]`), the same K Rademacher directions, "
        "noise and tuning, at equal forward passes; then the same seed by seed (RPE's cost over WP's).",
        "",
        "| task | k | RPE | none (WP) | RPE against none | per seed: RPE / none |",
        "|---|---|---|---|---|---|",
    ]
    sides = {side: [] for side in SIDES}
    for task, named in by_task.items():
        pairs = sorted((r["directions"], r["optimizer"]) for r in named.values() if r["method"] == directions.RULE)
        for k, name in pairs:
            rule, without = named[name], named[with_directions(directions.WITHOUT_RULE, k)]
            verdict = _verdict(rule, without)
            text, side = _paired(rule, without)
            lines.append(
                f"| {task} | {k} | {_at_budget(task, rule)} | {_at_budget(task, without)} | "
                f"{'**beats**' if verdict == 'beats' else verdict}, {_intervals(task, rule, without)} | {text} |"
            )
            sides[side].append(f"{task} k={k}")
    lines += ["", f"- The rule's paired interval against WP at the same k lies {_sides(sides)}."]
    return lines + [""]


def _plot_task(task: str, rows: Dict[str, dict], out: Path) -> Optional[str]:
    if not rows or plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    metric = next(iter(rows.values())).get("metric", "loss")
    for name, r in rows.items():
        curve = r.get("curve") or []
        if not curve:
            continue
        steps = [c[0] for c in curve]
        seconds = [c[1] for c in curve]
        values = [c[3] if c[3] is not None else c[2] for c in curve]
        style = "-" if name.startswith(("dopamine", "wp")) else "--"
        axes[0].plot(steps, values, style, label=name)
        axes[1].plot(seconds, values, style, label=name)
    for ax, xlabel in zip(axes, ["step", "seconds (optimizer steps only)"]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        if metric != "test accuracy":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task}: the first scoring seed at each optimizer's tuned configuration")
    fig.tight_layout()
    path = out / f"{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _finetuning(records, out: Path) -> List[str]:
    """The fine-tuning tasks: test loss and perplexity at the horizon, at
    equal forward passes and at equal time, and peak memory against
    inference."""
    rows_by_task = _rows_by_task(records, FINETUNE_TASKS)
    if not rows_by_task:
        return []
    lines = [
        "## Fine-tuning a pretrained language model",
        "",
        "Test loss in nats per byte (perplexity per byte = e^loss), medians over the scoring seeds with 95% intervals. Equal "
        "forwards: each run's loss after the budget of forward passes (a backward counting as two); equal time: after the "
        "median training time of the contender that finishes the horizon first. Memory: the model's weights plus the peak a "
        "step allocates (optimizer state, activations kept for the backward, gradients), against the weights plus the peak "
        "of one no-grad forward of the same batch (profiler allocation events, one run per optimizer).",
        "",
    ]
    for task, rows in rows_by_task.items():
        first = next(iter(rows.values()))
        lines += _task_heading(
            "###",
            task,
            first,
            f"Scoring seeds {first.get('scoring_seeds')}; equal forwards: {first.get('equal_forwards_budget')}; equal time: "
            f"{_fmt(first.get('equal_seconds_budget'))} s.",
        )
        lines += [
            "| optimizer | lr, schedule | diverged | test loss [95% CI] | perplexity | at equal forwards [95% CI] "
            "| at equal time [95% CI] | peak memory | / inference | ms/step | fwd/bwd per step |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            edge = " (grid edge)" if r.get("at_grid_edge") else ""
            memory = r.get("peak_memory_bytes")
            lines.append(
                f"| {name} | {_fmt(r['config']['lr'])} {r.get('schedule')}{edge} | {r.get('divergences')}/{r['config'].get('seeds')} "
                f"| {_fmt(r['final_metric'], 4)} {_ci(r.get('ci95'), 4)} | {_fmt(math.exp(r['final_metric']), 4)} "
                f"| {_fmt(r.get('metric_at_equal_forwards'), 4)} {_ci(r.get('ci95_at_equal_forwards'), 4)} "
                f"| {_fmt(r.get('metric_at_equal_seconds'), 4)} {_ci(r.get('ci95_at_equal_seconds'), 4)} "
                f"| {_fmt(memory / 2**20 if memory else None)} MiB | {_fmt(r.get('memory_vs_inference'))}x "
                f"| {_fmt(r['ms_per_step'])} | {r['forward_passes_per_step']}/{r['backward_passes_per_step']} |"
            )
        d = rows.get("dopamine")
        if d:
            start = d.get("metric_limit")
            lines += [
                "",
                "Dopamine (default) minus each contender, test loss (negative: Dopamine lower): "
                + "; ".join(
                    f"{name}: {d['final_metric'] - r['final_metric']:+.4f} at the horizon, "
                    f"{d['metric_at_equal_forwards'] - r['metric_at_equal_forwards']:+.4f} at equal forwards, "
                    f"{d['metric_at_equal_seconds'] - r['metric_at_equal_seconds']:+.4f} at equal time"
                    for name, r in rows.items()
                    if name != "dopamine"
                )
                + "."
                + (f" The pretrained model's test loss: {start:.4f}." if start is not None else ""),
            ]
        plot = _plot_task(task, rows, out)
        if plot:
            lines += ["", f"![{task}]({plot})"]
        lines.append("")
    return lines


def _plot_scaling(records, out: Path) -> Optional[str]:
    rows = [r for r in records if r["task"] == "scaling"]
    if not rows or plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        points = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["config"]["params"])
        x = [r["config"]["params"] for r in points]
        axes[0].plot(x, [r["ms_per_step"] for r in points], "o-", label=name)
        axes[1].plot(x, [r["optimizer_ms_per_step"] for r in points], "o-", label=name)
        axes[2].plot(x, [max(r["peak_memory_bytes"], 1) / 2**20 for r in points], "o-", label=name)
    x = sorted({r["config"]["params"] for r in rows})
    axes[2].plot(x, [4 * p / 2**20 for p in x], "k:", label="parameter bytes")
    for ax, title in zip(axes, ["ms per training step", "optimizer-only ms per step", "peak memory above inference (MiB)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _cost_claims(records) -> List[str]:
    """The paper's claims of less computation and memory, from the scaling
    runs."""
    lines = []
    scaling = [r for r in records if r["task"] == "scaling" and r["front_end"] == "python"]
    if scaling:
        largest = max(r["config"]["params"] for r in scaling)
        at = {r["optimizer"]: r for r in scaling if r["config"]["params"] == largest}
        adams = [at[k] for k in ("adam", "adam[foreach]", "adam[fused]") if k in at]
        fastest_adam = min(adams, key=lambda r: r["ms_per_step"])
        leanest_adam = min(adams, key=lambda r: r["peak_memory_bytes"])
        d, one = at["dopamine"], at.get("dopamine[k=1]")
        one_direction = (
            f" (with one direction {one['forward_passes_per_step']} forward passes, {one['ms_per_step']:.1f} ms, "
            f"{one['ms_per_step'] / fastest_adam['ms_per_step']:.2f}x)"
            if one
            else ""
        )
        lines.append(
            f"- **Less computation**: a Dopamine step with the defaults is {d['forward_passes_per_step']} forward passes and no "
            f"backward. At {largest:.2g} parameters it takes {d['ms_per_step']:.1f} ms against {fastest_adam['ms_per_step']:.1f} ms "
            f"for {fastest_adam['optimizer']} ({d['ms_per_step'] / fastest_adam['ms_per_step']:.2f}x){one_direction} and "
            f"{at['sgd']['ms_per_step']:.1f} ms for SGD; but on the tasks it needs more steps (tables above), so time to target "
            f"is the fairer measure. {'Supported per step' if d['ms_per_step'] < fastest_adam['ms_per_step'] else 'Not supported per step'}."
        )
        lines.append(
            f"- **Less memory**: at {largest:.2g} parameters ({d['config']['param_bytes'] / 2**20:.0f} MiB of float32) Dopamine's peak memory "
            f"exceeds inference by {d['peak_memory_bytes'] / 2**20:.2f} MiB ({d['peak_memory_bytes'] / d['config']['param_bytes']:.1%} of the "
            f"parameter bytes), {leanest_adam['optimizer']}'s by {leanest_adam['peak_memory_bytes'] / 2**20:.1f} MiB "
            f"({leanest_adam['peak_memory_bytes'] / d['config']['param_bytes']:.0%}). "
            f"{'Supported' if d['peak_memory_bytes'] < 0.1 * leanest_adam['peak_memory_bytes'] else 'Not supported'}."
        )
    return lines


def _scaleout(records) -> List[str]:
    """Data-parallel Dopamine against DDP (benchmarks/python/scaleout.py)."""
    rows = [r for r in records if r["task"] == "scaleout"]
    if not rows:
        return []
    first = rows[0]["config"]
    lines = [
        f"## Many processes ({first['ranks']} ranks, {first['backend']}, {first['threads_per_rank']} thread each)",
        "",
        f"Data parallel on the {first['model']}, a global batch of {first['global_batch']} split evenly. Step times are "
        "medians of interleaved rounds; bytes sent are each rank's share of the loopback interface's transmit counter over "
        "a run of that contender alone (TCP/IP headers and gloo's framing included), beside the payload of the step's "
        "collectives. A step is also given against the forward passes it makes (a backward counted as two), each "
        "forward of a rank's shard measured alone under no_grad in the same rounds.",
        "",
        "| parameters | optimizer | ms/step | / DDP+Adam | / its forward passes | bytes sent per rank per step | payload per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for params in sorted({r["config"]["params"] for r in rows}):
        at = {r["optimizer"]: r for r in rows if r["config"]["params"] == params}
        adam = at.get("ddp+adam[fused]")
        for name, r in at.items():
            ratio = f"{r['ms_per_step'] / adam['ms_per_step']:.2f}x" if adam else "-"
            lines.append(
                f"| {params:.3g} | {name} | {_fmt(r['ms_per_step'])} | {ratio} | {_fmt(r.get('step_vs_forward_passes'))} "
                f"| {r['bytes_sent_per_rank_per_step']:,.0f} "
                f"| {r['payload_bytes_per_step']:,} |"
            )
    return lines + [""]


def _lowrank_sentence(ratios) -> str:
    """The low-rank steps against the fastest Adam step, when measured."""
    if not ratios:
        return ""
    return " With low-rank perturbations (`perturbation=\"lowrank\"`, matrices of 1000 rows), the same step takes " + ", ".join(
        f"{ratio:.2f}x ({name})" for name, ratio in ratios.items()
    ) + " the fastest Adam step."


def _layouts(layouts) -> list:
    """The optimizer's step on 1e7 elements as few or many tensors."""
    if not layouts:
        return []
    names = list(layouts["gaussian"]["ms"])
    lines = [
        "The same 1e7 elements as few large or many small tensors (`Dopamine.step` from Python with the default "
        "options but the noise, and a closure that computes nothing; interleaved, medians; ratio to the first layout):",
        "",
        "| tensors x elements | " + " | ".join(f"{noise} ms | ratio" for noise in layouts) + " |",
        "|---|" + "---|---|" * len(layouts),
    ]
    for name in names:
        cells = " | ".join(f"{_fmt(v['ms'][name])} | {v['ratio'][name]:.2f}x" for v in layouts.values())
        lines.append(f"| {name} | {cells} |")
    return lines + [""]


def _cpu_breakdown(breakdown: Optional[dict]) -> List[str]:
    """The C++ noise benchmark's figures (benchmarks/cpp/noise_bench.cpp)."""
    if not breakdown:
        return []
    ms = breakdown["ms"]
    return [
        f"Where a CPU pass goes (C++ noise benchmark, {breakdown['elements']:.0e} elements, {breakdown['threads']} thread, "
        f"{breakdown['path']} path): a `move_` pass with Gaussian noise takes {ms['move_gaussian']:.2f} ms, of which Philox "
        f"{ms['philox']:.2f} ms, Box-Muller {ms['box_muller']:.2f} ms, and reading and writing the parameters "
        f"{ms['memory_and_update_gaussian']:.2f} ms; with Rademacher noise {ms['move_rademacher']:.2f} ms, of which the signs "
        f"{ms['rademacher_noise']:.2f} ms.",
        "",
        *_cpp_layouts(breakdown.get("layouts"), breakdown.get("layout_threads")),
    ]


def _cpp_layouts(layouts: Optional[dict], threads) -> List[str]:
    """The C++ noise benchmark's optimizer step on few or many tensors."""
    if not layouts:
        return []
    names = list(layouts)
    first = layouts[names[0]]
    cells = "; ".join(
        f"{name}: {v['gaussian'] / first['gaussian']:.2f}x (Gaussian), {v['rademacher'] / first['rademacher']:.2f}x (Rademacher)"
        for name, v in layouts.items()
        if name != names[0]
    )
    return [
        f"From C++ (`dopamine::Dopamine::step`, the same options and closure; {threads} threads), the step on the "
        f"same elements as {cells}, against {names[0]} ({first['gaussian']:.1f} and {first['rademacher']:.1f} ms).",
        "",
    ]


def _seed_list(seeds: Sequence[int]) -> str:
    """`20 (300-319)` for consecutive seeds, else the count and the list."""
    seeds = list(seeds)
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{len(seeds)} ({seeds[0]}-{seeds[-1]})"
    return f"{len(seeds)} {seeds}"


def _protocol(meta: dict, description: Optional[dict]) -> List[str]:
    if not description:
        return []
    tuning = meta.get("tuning") or {}
    seconds = tuning.get("seconds") or {}
    return [
        "## Protocol",
        "",
        f"Tuning (`make bench-tune`, {tuning.get('date', '?')}, {sum(seconds.values()) / 60:.0f} minutes on "
        f"{tuning.get('workers', '?')} workers): every optimizer on every task gets the same budget, {description['grid']} "
        f"crossed with the schedules {', '.join(description['schedules'])}, each trained on the tuning seeds "
        f"{description['tuning_seeds']} and judged on the task's validation split (XOR: its training loss); the task's rule "
        "picks one configuration, fewest divergences first, on those seeds only. Scoring (this run): "
        f"the picked configuration on the scoring seeds ({', '.join(f'{t}: {_seed_list(s)}' for t, s in description['scoring_seeds'].items())}), "
        "which tuning never saw, judged on the test split, with the same horizon for every optimizer. A diverged run "
        f"({description['divergence']}) counts as a failure and as the worst value in every median. Intervals are 95% "
        f"bootstrap intervals of the median ({description['bootstrap_resamples']} resamples of the scoring seeds). Runs go "
        f"to {meta.get('workers', '?')} worker processes of one thread each, so times are measured beside another run. "
        "Limits, the same for every optimizer: sigma is fixed per task, not tuned; ties go to the first trial in grid "
        "order; with few scoring seeds an interval of the median falls on observed values; and the comparison at equal "
        "forward passes reads runs tuned for equal steps.",
        "",
    ]


def _plot_profile(rows_by_task: Dict[str, Dict[str, dict]], out: Path) -> Optional[str]:
    if not rows_by_task or plt is None:
        return None
    taus = [10 ** (i / 20) for i in range(0, 61)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, at_equal_forwards, title in zip(axes, (False, True), ("equal steps", "equal forward passes")):
        for name, fractions in protocol.performance_profile(rows_by_task, taus, at_equal_forwards).items():
            style = "-" if name.startswith("dopamine") else ("--" if name in GRADIENT else ":")
            ax.step(taus, fractions, style, where="post", label=name, linewidth=2 if name == "dopamine" else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel("tau (ratio to the best on the task)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of tasks")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "profile.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write(records: List[dict], meta: dict, out: Path, protocol_description: Optional[dict] = None) -> None:
    m = meta["machine"]
    lines = [
        "# torch-dopamine benchmark report",
        "",
        f"{meta['mode'].capitalize()} run of {meta['date']}, {meta['seconds'] / 60:.1f} minutes. Machine: {m['cpu']}, "
        f"{m['cores']} cores, {m['threads']} intra-op threads, GPU: {m['gpu'] or 'none'}; torch {m['torch']}, Python {m['python']}.",
        "Every figure comes from this run; ratios compare rows measured in it. Times are medians; training times count the "
        "optimizer steps only (not evaluations).",
        "",
        *_protocol(meta, protocol_description),
        *_claims_section(records),
        *_rule_ablation(records),
        *_directions(records),
    ]
    rows_by_task = _rows_by_task(records, TASKS)
    profile = _plot_profile(rows_by_task, out)
    if profile:
        lines += [
            "## Performance profile",
            "",
            "Dolan-More: for each optimizer, the fraction of the tasks on which its figure (XOR: median steps to target over "
            "every scoring seed, a failure counting as infinite; the others: median final test MSE or test error) is within a "
            "factor tau of the best optimizer's on that task; left at equal steps, right at equal forward passes.",
            "",
            f"![performance profile]({profile})",
            "",
        ]
    for task, rows in rows_by_task.items():
        first = next(iter(rows.values()))
        lines += _task_heading(
            "##",
            task,
            first,
            f"Metric: {first.get('metric')}; scoring seeds {first.get('scoring_seeds')}. Equal forwards: each run's metric after "
            f"{first.get('equal_forwards_budget')} forward passes (a backward counting as two).",
        )
        lines += _task_table(rows)
        d = rows.get("dopamine")
        if d:
            lines += ["", "Dopamine (default) against " + "; ".join(f"{name}: {_versus(task, d, row)}" for name, row in rows.items() if name != "dopamine") + "."]
        plot = _plot_task(task, rows, out)
        if plot:
            lines += ["", f"![{task}]({plot})"]
        lines.append("")
    lines += _finetuning(records, out)
    scaling = [r for r in records if r["task"] == "scaling"]
    if scaling:
        lines += [
            "## Scaling",
            "",
            "Each point runs in a fresh process. Memory is the peak above a no-grad inference run of the same model in that "
            "process, evaluating the same loss (process peak RSS on CPU, max_memory_allocated on CUDA; each peak counted from "
            "the start of its phase), after loading each optimizer's code on a tiny model.",
            "",
            "The step is also given against the forward passes it makes (a backward counted as two), each forward measured "
            "alone under no_grad, interleaved with the steps.",
            "",
            "| parameters | optimizer | device | ms/step | / its forward passes | optimizer-only ms | peak memory above inference | / parameter bytes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(scaling, key=lambda r: (r["config"]["params"], r["optimizer"])):
            lines.append(
                f"| {r['config']['params']:.3g} | {r['optimizer']} | {r['device']} | {_fmt(r['ms_per_step'])} "
                f"| {_fmt(r.get('step_vs_forward_passes'))} | {_fmt(r['optimizer_ms_per_step'])} "
                f"| {r['peak_memory_bytes'] / 2**20:.2f} MiB | {r['peak_memory_bytes'] / r['config']['param_bytes']:.1%} |"
            )
        plot = _plot_scaling(records, out)
        lines += ["", f"![scaling]({plot})" if plot else "(no plot: matplotlib is not installed)", ""]
    lines += _scaleout(records)
    for r in (r for r in records if r["task"] == "ops"):
        ops = r["ops"]
        lines += [
            f"## Ops ({ops['numel']:.0e} float32 elements in {ops['tensors']} tensors, {ops['device']}, {ops['threads']} threads)",
            "",
            "| op | ms | GB/s (8 bytes per element) |",
            "|---|---|---|",
        ]
        for name, ms in ops["ms"].items():
            gbs = ops["gb_per_s"].get(name)
            lines.append(f"| {name} | {_fmt(ms)} | {_fmt(gbs)} |")
        lines += [
            "",
            f"Medians of {ops.get('repeats', '?')} rounds that run every op once each, so that the ratios compare runs that saw the same machine. "
            f"A default Dopamine step's ops ({ops['default_directions']} directions: {ops['default_directions']} move_ passes, each "
            "after the first drawing two directions, plan_step, and a finish that draws every direction; GB/s counts each of its "
            f"{ops['default_directions'] + 1} passes) against the fastest Adam step: {ops['step_vs_adam']['gaussian']:.2f}x with "
            f"Gaussian noise, {ops['step_vs_adam']['rademacher']:.2f}x with Rademacher noise. Noise throughput against `normal_` on the "
            f"same tensors: {ops['noise_throughput_vs_normal_']:.2f}x. `copy_` reaches {ops['copy_gb_per_s']:.1f} GB/s; a default step takes "
            f"{ops['step_vs_copies']['gaussian']:.2f}x (Gaussian) and {ops['step_vs_copies']['rademacher']:.2f}x (Rademacher) the "
            f"time of {ops['default_directions'] + 1} copies, the bandwidth bound of its passes."
            + _lowrank_sentence(ops.get("lowrank_step_vs_adam")),
            "",
        ]
        lines += _layouts(ops.get("layouts"))
        lines += _cpu_breakdown(ops.get("cpu_breakdown"))
    cpp = [r for r in records if r["front_end"] == "cpp"]
    if cpp:
        lines += [
            "## C++ front end (benchmarks/cpp, torch::optim)",
            "",
            "Outside the protocol: the C++ XOR benchmark's fixed learning rates, not tuned; it shows the C++ front end "
            "training, not a comparison.",
            "",
            "| task | optimizer | settings | solved | median steps | median s | ms/step | fwd/bwd |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in cpp:
            lines.append(
                f"| {r['task']} | {r['optimizer']} | lr {_fmt(r['config'].get('lr'))} | {r['success_rate']:.0%} | {_fmt(r['median_steps_to_target'])} "
                f"| {_fmt(r['median_seconds_to_target'])} | {_fmt(r['ms_per_step'])} | {r['forward_passes_per_step']}/{r['backward_passes_per_step']} |"
            )
        lines.append("")
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
