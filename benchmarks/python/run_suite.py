"""The benchmark suite: Dopamine against the forward-only methods a user
would pick instead (standard WP, WP with four Rademacher directions,
MeZO's central difference, SPSA, FZOO), SGD and Adam on XOR, Lorenz and
Rössler forecasting, scikit-learn's digits, two spirals and fine-tuning a
pretrained language model (all parameters, and adapters),
under the tuning/scoring protocol of protocol.py; every forward-only method
at its best number of directions (directions.py); then MLP scaling, the
scale-out section and the op benchmark. Writes results/bench.json, results/REPORT.md
and the plots.

    python benchmarks/python/run_suite.py            # score from tuned.json (make bench)
    python benchmarks/python/run_suite.py --tune     # rerun the tuning (make bench-tune)
    python benchmarks/python/run_suite.py --full     # paper-size (make bench-full)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import directions
import protocol
import report
import scaleout
import scaling
import tasks
from harness import CONTENDERS, DOPAMINE_DEFAULTS, Progress, machine, record

TUNED = Path(__file__).resolve().parents[1] / "tuned.json"
SCALING_CONTENDERS = ["dopamine", "dopamine[k=1]", "dopamine[k=4,no_baseline,gaussian]", "sgd", "adam", "adam[foreach]", "adam[fused]"]


def scaling_records(sizes, device, progress):
    records = []
    for params in sizes:
        for name in SCALING_CONTENDERS:
            point = scaling.run_point(name, params, device, repeats=5 if params >= 10**7 else 20)
            records.append(
                record(
                    "python",
                    "scaling",
                    CONTENDERS[name],
                    dict(params=point["params"], param_bytes=point["param_bytes"], model="64-h-h-10 MLP, ReLU", batch=scaling.BATCH),
                    device=device,
                    ms_per_step=point["ms_per_step"],
                    forward_ms=point["forward_ms"],
                    step_vs_forward_passes=point["step_vs_forward_passes"],
                    optimizer_ms_per_step=point["optimizer_ms_per_step"],
                    peak_memory_bytes=point["peak_memory_bytes"],
                    threads=point["threads"],
                )
            )
            progress(
                f"scaling: {name} at {point['params']:.2g} params on {device}: {point['ms_per_step']:.2f} ms/step, "
                f"{point['step_vs_forward_passes']:.2f}x its forward passes, optimizer {point['optimizer_ms_per_step']:.2f} ms, +{point['peak_memory_bytes'] / 2**20:.1f} MiB"
            )
    return records


def default_scaling_sizes(device, full):
    sizes = [10**3, 10**4, 10**5, 10**6, 10**7]
    if device == "cuda":
        sizes += [10**8, 10**9] if full else [10**8]
    return sizes


def scaleout_records(sizes, ranks, progress):
    """Data-parallel Dopamine against DDP on `ranks` CPU processes."""
    records = []
    for point in scaleout.run(sizes, ranks):
        for name, base in scaleout.SCALEOUT_CONTENDERS.items():
            records.append(
                record(
                    "python",
                    "scaleout",
                    CONTENDERS[base],
                    dict(params=point["params"], ranks=ranks, model="64-h-h-10 MLP, ReLU", global_batch=scaling.BATCH,
                         backend="gloo over loopback TCP", threads_per_rank=1),
                    optimizer=name,
                    ms_per_step=point["ms"][name],
                    step_vs_forward_passes=point["ms"][name] / (CONTENDERS[base].forward_equivalents_per_step * point["ms"]["forward"]),
                    bytes_sent_per_rank_per_step=point["bytes_sent"][name],
                    payload_bytes_per_step=scaleout.payload_bytes(name, point["params"]),
                    threads=1,
                )
            )
        progress(
            f"scale-out at {point['params']:.2g} params on {ranks} ranks: "
            + ", ".join(f"{name} {point['ms'][name]:.1f} ms and {point['bytes_sent'][name]:.3g} B sent" for name in scaleout.SCALEOUT_CONTENDERS)
        )
    return records


def ops_record(device, progress):
    result = scaling.ops_benchmark(device)
    progress(
        f"ops on {device}: default step/Adam {result['step_vs_adam']['gaussian']:.2f}x gaussian, "
        f"{result['step_vs_adam']['rademacher']:.2f}x rademacher; noise vs normal_ {result['noise_throughput_vs_normal_']:.2f}x"
    )
    step = f"step[{DOPAMINE_DEFAULTS['noise']}, k={result['default_directions']}]"
    return record(
        "python",
        "ops",
        # The ops of a default step (k directions: k move_ passes and a
        # finish drawing k streams).
        CONTENDERS["dopamine"],
        dict(numel=result["numel"], tensors=result["tensors"], dtype="float32"),
        device=device,
        ms_per_step=result["ms"][step],
        optimizer_ms_per_step=result["ms"][step],
        ops=result,
    )


def _stale(entries: Dict[str, dict], names: List[str]) -> List[str]:
    """The names whose entry is missing or was tuned for other options, or
    on another split than validation."""
    return [
        name
        for name in names
        if entries.get(name) is None or entries[name].get("identity") != protocol.identity(name) or entries[name].get("split") != "validation"
    ]


def load_tuned(path: Path, mode: str, contenders_by_task: Dict[str, List[str]], directions_tasks: Sequence[str] = ()) -> dict:
    """The tuned configurations of `mode` for each task's contenders and
    the directions study of `directions_tasks`, or SystemExit saying which
    are missing or were tuned for other options (on the validation split),
    and how to make them."""
    tuned = json.loads(path.read_text()) if path.exists() else {}
    entries = tuned.get(mode, {}).get("tasks", {})
    stale = [f"{task}/{name}" for task, contenders in contenders_by_task.items() for name in _stale(entries.get(task, {}), contenders)]
    studies = tuned.get(mode, {}).get("directions", {})
    for task in directions_tasks:
        study = studies.get(task, {})
        every = [name for method in directions.DIRECTION_METHODS for name in directions.contenders(method)]
        stale += [f"{task}/directions/{name}" for name in _stale(study.get("contenders", {}), every)]
    if stale:
        raise SystemExit(
            f"{path} has no {mode} tuning of the current contenders for {', '.join(stale)}; run `make bench-tune` "
            f"(or run_suite.py --tune{' --full' if mode == 'full' else ''} [--contenders ...]) first"
        )
    return tuned.get(mode, {})


def tune(args, task_list, progress) -> None:
    """Reruns the tuning of the tasks (of --contenders only, when given) and
    rewrites their entries of tuned.json."""
    mode = "full" if args.full else "quick"
    tuned = json.loads(TUNED.read_text()) if TUNED.exists() else {}
    started = time.time()
    entry = tuned.setdefault(mode, {})
    entry.setdefault("tasks", {})
    for task in task_list:
        if not args.directions_only:
            tune_task(args, task, entry, progress)
        # The study's methods of --contenders, when given, or all of them.
        methods = [method for method in directions.DIRECTION_METHODS if not args.contenders or method in args.contenders]
        if task.name in directions.TASKS and "directions" not in args.skip and methods:
            progress(f"tuning the directions study on {task.name}: {', '.join(methods)} at each k, at equal forward passes")
            task_started = time.time()
            studies = entry.setdefault("directions", {})
            studies[task.name] = directions.tune(task, args.full, args.workers, progress, methods, studies.get(task.name))
            _record_time(entry, "seconds_directions", task.name, task_started, partial=bool(args.contenders))
        entry.update(
            protocol=protocol.description(tasks.all_tasks(args.full)),
            machine=machine(),
            workers=args.workers,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        )
        # After every task, so that an interrupted tuning keeps what it did.
        TUNED.write_text(json.dumps(tuned, indent=1) + "\n")
        progress(f"wrote {TUNED.name} with {task.name} ({(time.time() - started) / 60:.1f} minutes so far)")


def tune_task(args, task, entry: dict, progress) -> None:
    """Tunes the task's contenders (--contenders only, when given) into
    `entry`, tuned.json's entry of the mode."""
    contenders = protocol.contenders_of(task, args.contenders)
    progress(
        f"tuning {task.name}: {len(contenders)} optimizers x {len(protocol.GRID_FACTORS)} learning rates x "
        f"{len(protocol.SCHEDULES)} schedules x {len(protocol.TUNING_SEEDS)} seeds, {task.steps} steps, {args.workers} workers"
    )
    task_started = time.time()
    tuned_now = protocol.tune(task, contenders, args.full, args.workers, progress)
    if args.contenders:
        # Some contenders retuned: the other current ones (the evidence
        # contenders too) keep their trials.
        earlier = entry["tasks"].get(task.name, {})
        tuned_now = dict({name: earlier[name] for name in protocol.contenders_of(task, list(earlier))}, **tuned_now)
    entry["tasks"][task.name] = tuned_now
    _record_time(entry, "seconds", task.name, task_started, partial=bool(args.contenders))


def _record_time(entry: dict, key: str, task: str, started: float, partial: bool) -> None:
    """Records the time of a task's tuning under entry[key]; a partial
    retune's adds to the time of the tunings that made the rest of the
    entry."""
    seconds = entry.setdefault(key, {})
    seconds[task] = (seconds.get(task, 0.0) if partial else 0.0) + time.time() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="paper-size configurations (hours on a CPU)")
    parser.add_argument("--tune", action="store_true", help=f"rerun the tuning and rewrite {TUNED.name}; no scoring")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that train runs side by side")
    parser.add_argument("--out", default="results", help="output folder")
    parser.add_argument("--cpp-json", help="records written by the C++ benchmark, merged into bench.json")
    parser.add_argument("--noise-json", help="the C++ noise benchmark's breakdown of a CPU op, added to the ops record")
    parser.add_argument("--device", default="cpu", help="device of the scaling and op benchmarks (cpu or cuda)")
    parser.add_argument(
        "--skip", nargs="*", default=[], help=f"tasks or parts to leave out ({' '.join(tasks.TASK_NAMES)} directions scaling scaleout ops)"
    )
    parser.add_argument(
        "--directions-only", action="store_true", help="tune, or score, only the directions study of the tasks (not their contenders)"
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=protocol.NAMED_CONTENDERS,
        help="score, or with --tune retune, only these of the task contenders, or the evidence contenders make bench leaves "
        "out (and with --tune the study's methods of these names)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="score every task on these seeds instead of its scoring seeds (a confirmation on seeds nothing was chosen on)",
    )
    parser.add_argument(
        "--scaling-sizes",
        nargs="+",
        type=int,
        help="parameter counts of the scaling runs (default 1e3 to 1e7, and 1e8 on CUDA, 1e9 too with --full)",
    )
    args = parser.parse_args(argv)

    progress = Progress()
    started = time.time()
    info = machine()
    progress(f"machine: {info}")
    task_list = [task for task in tasks.all_tasks(args.full) if task.name not in args.skip]
    if args.seeds:
        if set(args.seeds) & set(protocol.TUNING_SEEDS):
            parser.error(f"--seeds must not include the tuning seeds {protocol.TUNING_SEEDS}")
        for task in task_list:
            task.seeds = list(args.seeds)
    if args.directions_only and args.contenders and not (args.tune and set(args.contenders) <= set(directions.DIRECTION_METHODS)):
        parser.error(
            "--contenders picks among the tasks' contenders, which --directions-only leaves out; with --tune it may name "
            f"the study's methods ({', '.join(directions.DIRECTION_METHODS)}), whose every k it retunes"
        )
    if args.tune:
        tune(args, task_list, progress)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "full" if args.full else "quick"
    contenders_by_task = {} if args.directions_only else {task.name: protocol.contenders_of(task, args.contenders) for task in task_list}
    # With --contenders, only those are scored, as only those are retuned.
    studied = [] if "directions" in args.skip or args.contenders else [task for task in task_list if task.name in directions.TASKS]
    tuned = load_tuned(TUNED, mode, contenders_by_task, [task.name for task in studied])
    records = []
    for task in task_list:
        contenders = contenders_by_task.get(task.name, [])
        if contenders:
            progress(
                f"{task.name}: {len(contenders)} optimizers at their tuned configurations x {len(task.seeds)} scoring seeds, "
                f"{task.steps} steps, {args.workers} workers"
            )
            records += protocol.score(task, {name: tuned["tasks"][task.name][name] for name in contenders}, args.full, args.workers, progress)
        if task in studied:
            study = tuned["directions"][task.name]
            progress(
                f"{task.name}, directions study: {len(directions.scored(study))} forward-only contenders x {len(task.seeds)} scoring "
                f"seeds, {protocol.BUDGET_FORWARDS_PER_STEP * task.steps} forward passes each"
            )
            records += directions.score(task, study, args.full, args.workers, progress)
    if "scaling" not in args.skip:
        sizes = args.scaling_sizes or default_scaling_sizes(args.device, args.full)
        records += scaling_records(sizes, args.device, progress)
    if "scaleout" not in args.skip and args.device == "cpu":
        records += scaleout_records([10**6, 10**7], 2, progress)
    if "ops" not in args.skip:
        records.append(ops_record(args.device, progress))
        if args.noise_json:
            records[-1]["ops"]["cpu_breakdown"] = json.loads(Path(args.noise_json).read_text())
    if args.cpp_json:
        cpp = json.loads(Path(args.cpp_json).read_text())["records"]
        for row in cpp:
            # Outside the protocol: fixed learning rates, no tuning.
            row.update(schedule="constant", divergences=None, ci95=None)
        progress(f"merged {len(cpp)} C++ records from {args.cpp_json}")
        records += cpp
    meta = dict(
        machine=info,
        mode=mode,
        seconds=time.time() - started,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        workers=args.workers,
        tuning=dict(
            date=tuned.get("date"),
            seconds=tuned.get("seconds"),
            seconds_directions=tuned.get("seconds_directions"),
            machine=tuned.get("machine"),
            workers=tuned.get("workers"),
        ),
    )
    (out / "bench.json").write_text(
        json.dumps({"meta": meta, "protocol": protocol.description(task_list), "records": records}, indent=1)
    )
    report.write(records, meta, out, protocol.description(task_list))
    progress(f"wrote {out / 'bench.json'}, {out / 'REPORT.md'} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
