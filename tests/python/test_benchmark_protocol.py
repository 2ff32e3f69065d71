"""The benchmark protocol's arithmetic (benchmarks/python/protocol.py): how a
run is judged, how trials are ranked, the intervals and the performance
profile. No training: `make bench` measures, these assert."""

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "python"))
np = pytest.importorskip("numpy")

import directions  # noqa: E402
import protocol  # noqa: E402
import tasks  # noqa: E402
from harness import CONTENDERS, DIRECTION_METHODS, DOPAMINE_DEFAULTS, Run, schedule_factor, with_directions  # noqa: E402


def run(final_metric, diverged=False, steps_to_target=None, steps=3000, curve=()):
    return dict(final_metric=final_metric, diverged=diverged, steps_to_target=steps_to_target, steps=steps, curve=list(curve))


def test_a_run_diverges_on_a_non_finite_loss_or_a_last_loss_above_the_first():
    assert Run(initial_loss=1.0, final_loss=float("nan")).diverged
    assert Run(initial_loss=1.0, final_loss=float("inf")).diverged
    assert Run(initial_loss=1.0, final_loss=1.5).diverged
    assert not Run(initial_loss=1.0, final_loss=0.5).diverged


def test_the_cosine_schedule_starts_at_lr_and_ends_at_zero():
    assert schedule_factor("constant", 7, 10) == 1.0
    assert schedule_factor("cosine", 0, 10) == 1.0
    assert schedule_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert schedule_factor("cosine", 10, 10) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        schedule_factor("linear", 0, 10)


def test_the_grid_has_five_log_spaced_points_around_the_family_centre():
    task = tasks.xor_task(False)
    points = protocol.grid(task, "zo-sgd[central]")
    centre = task.centres[CONTENDERS["zo-sgd[central]"].family]
    assert len(points) == 5 and points[2] == centre
    assert all(b / a == pytest.approx(3, rel=1e-2) for a, b in zip(points, points[1:]))


def test_every_task_centres_the_grid_of_each_of_its_contenders():
    """A contender without a centre could not be tuned; fzoo's is Dopamine's
    times sigma (tasks.Task.centres)."""
    for task in tasks.all_tasks(False):
        for name in protocol.contenders_of(task):
            assert CONTENDERS[name].family in task.centres, (task.name, name)
        assert task.centres["fzoo"] == pytest.approx(task.centres["dopamine"] * task.sigma)
    assert CONTENDERS["fzoo"].forwards_per_step == 5


def test_a_diverged_run_counts_as_the_worst_value():
    mse, accuracy = tasks.chaotic_task("lorenz", False), tasks.digits_task(False)
    assert protocol.final_value(mse, run(0.1, diverged=True)) == math.inf
    assert protocol.final_value(accuracy, run(0.9, diverged=True)) == -math.inf
    assert protocol.final_value(mse, run(0.1)) == 0.1
    # Two of three trials fine: the median is the worse fine one.
    assert protocol.trial_score(mse, [run(0.1), run(0.3), run(0.2, diverged=True)]) == (-1, -0.3)
    assert protocol.trial_score(accuracy, [run(0.9), run(0.8), run(0.95, diverged=True)]) == (-1, 0.8)


def test_trials_rank_by_fewest_divergences_then_the_median():
    mse = tasks.chaotic_task("rossler", False)
    better_median_one_diverged = [run(0.001), run(0.002), run(0.5, diverged=True)]
    worse_median_none_diverged = [run(0.003), run(0.004), run(0.005)]
    best_none_diverged = [run(0.002), run(0.003), run(0.004)]
    ranked = sorted(
        [better_median_one_diverged, worse_median_none_diverged, best_none_diverged],
        key=lambda r: protocol.trial_score(mse, r),
        reverse=True,
    )
    assert ranked == [best_none_diverged, worse_median_none_diverged, better_median_one_diverged]


@pytest.mark.parametrize("system", ["lorenz", "rossler"])
def test_the_series_splits_into_train_validation_and_test_in_time_order(system):
    windows = tasks._windows(system, 16)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = windows.train, windows.held_out["validation"], windows.held_out["test"]
    series = torch.cat([train_y, val_y, test_y])
    # Every target once, in order: 70% / 10% / 20% of the 5000 points,
    # less the first window, which has no target.
    assert (len(train_y), len(val_y), len(test_y)) == (3500 - 16, 500, 1000)
    assert torch.equal(torch.cat([train_x, val_x, test_x])[1:, -1], series[:-1])
    for split, (x, y) in windows.held_out.items():
        assert windows.persistence[split] == pytest.approx(torch.nn.functional.mse_loss(x[:, -1], y).item())


def test_the_digits_splits_are_disjoint_and_cover_the_data():
    data = tasks._digits_data()
    rows = [tuple(row.tolist()) for split in ("train", "validation", "test") for row in data[split][0]]
    assert [len(data[split][0]) for split in ("train", "validation", "test")] == [1150, 287, 360]
    assert len(rows) == 1797
    # Digit images repeat in the data set, so compare row sets by count.
    from sklearn.datasets import load_digits

    assert sorted(rows) == sorted(tuple((torch.tensor(row, dtype=torch.float32) / 16.0).tolist()) for row in load_digits().data)


def test_the_spirals_are_balanced_and_split_without_overlap():
    data = tasks._spirals_data()
    assert [len(data[split][0]) for split in ("train", "validation", "test")] == [600, 200, 200]
    points = torch.cat([data[split][0] for split in ("train", "validation", "test")])
    labels = torch.cat([data[split][1] for split in ("train", "validation", "test")])
    assert len(torch.unique(points, dim=0)) == tasks.SPIRAL_POINTS
    assert labels.sum().item() == tasks.SPIRAL_POINTS // 2
    # The arms are point reflections of each other, up to the jitter.
    first, second = points[labels[:, 0] == 0], points[labels[:, 0] == 1]
    assert torch.allclose(first.norm(dim=1).sort().values, second.norm(dim=1).sort().values, atol=0.1)


@pytest.mark.parametrize("name", ["lorenz", "digits", "spirals"])
def test_tuning_judges_on_validation_and_scoring_on_test(name):
    task = tasks.task_named(name, False)
    validation, test = task.setup(0, "validation"), task.setup(0, "test")
    # The same model and training data; another held-out set.
    assert torch.equal(torch.cat([p.flatten() for p in validation["params"]]), torch.cat([p.flatten() for p in test["params"]]))
    assert validation["loss_fn"]().item() == test["loss_fn"]().item()
    assert validation["evaluate"]() != test["evaluate"]()


def test_xor_trials_rank_by_success_rate_then_median_steps():
    xor = tasks.xor_task(False)
    all_solved_slowly = [run(0.0, steps_to_target=s) for s in (900, 1000, 1100)]
    two_solved_fast = [run(0.0, steps_to_target=s) for s in (10, 20)] + [run(0.5)]
    all_solved_fast = [run(0.0, steps_to_target=s) for s in (100, 200, 300)]
    ranked = sorted([two_solved_fast, all_solved_slowly, all_solved_fast], key=lambda r: protocol.trial_score(xor, r), reverse=True)
    assert ranked == [all_solved_fast, all_solved_slowly, two_solved_fast]


def test_the_metric_at_equal_forwards_is_read_at_the_budget_step():
    task = tasks.chaotic_task("lorenz", False)  # 3000 steps: a budget of 6000 forwards
    curve = [(step, 0.0, 1.0, 1.0 / step) for step in range(50, 3001, 50)]
    # Adam costs 3 forwards a step: 2000 steps; Dopamine with four
    # directions 5: 1200 steps; one direction 2: 3000 steps.
    assert protocol.value_at_forwards(task, run(None, curve=curve), "adam") == pytest.approx(1 / 2000)
    assert protocol.value_at_forwards(task, run(None, curve=curve), "dopamine[k=4]") == pytest.approx(1 / 1200)
    assert protocol.value_at_forwards(task, run(None, curve=curve), "dopamine[k=1]") == pytest.approx(1 / 3000)
    diverged_early = run(None, diverged=True, steps=700, curve=curve[:14])
    assert protocol.value_at_forwards(task, diverged_early, "adam") == math.inf
    diverged_late = run(None, diverged=True, steps=2500, curve=curve[:50])
    assert protocol.value_at_forwards(task, diverged_late, "dopamine[k=4]") == pytest.approx(1 / 1200)


def test_the_bootstrap_interval_brackets_the_median_and_keeps_failures():
    values = [float(v) for v in range(1, 10)]
    low, high = protocol.bootstrap_ci(values)
    assert 1 <= low <= 5 <= high <= 9 and low < high
    assert protocol.bootstrap_ci(values) == [low, high]  # seeded
    assert protocol.bootstrap_ci([1.0, 2.0, math.inf, math.inf, math.inf])[1] == math.inf
    assert protocol.bootstrap_ci([]) is None


def scored(task, name, final, divergences=0, success_rate=1.0, steps=None, higher_is_better=False, forwards=2):
    return dict(task=task, optimizer=name, final_metric=final, metric_at_equal_forwards=final, divergences=divergences,
                success_rate=success_rate, median_steps_to_target=steps, median_steps_all_runs=steps or math.inf,
                higher_is_better=higher_is_better, forward_equivalents_per_step=forwards)


def test_the_performance_profile_counts_tasks_within_tau_of_the_best():
    rows = {
        "lorenz": {"a": scored("lorenz", "a", 1.0), "b": scored("lorenz", "b", 2.0)},
        "digits": {"a": scored("digits", "a", 0.9, higher_is_better=True), "b": scored("digits", "b", 0.95, higher_is_better=True)},
        "xor": {"a": scored("xor", "a", 0.0, steps=100), "b": scored("xor", "b", 0.0, success_rate=0.4)},
    }
    # Costs: lorenz a 1, b 2; digits errors a 0.1, b 0.05; xor a 100 steps, b unsolved.
    profile = protocol.performance_profile(rows, [1.0, 1.99, 2.01, 1e9])
    assert profile["a"] == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
    assert profile["b"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    # A task every optimizer failed counts for none; a zero cost only for those that reach it.
    rows["xor"]["a"] = scored("xor", "a", 0.0, success_rate=0.0)
    rows["lorenz"]["b"] = scored("lorenz", "b", 0.0)
    profile = protocol.performance_profile(rows, [1.0, 1e9])
    assert profile["a"] == pytest.approx([0.0, 1 / 3])
    assert profile["b"] == pytest.approx([2 / 3, 2 / 3])


def test_beating_a_peer_needs_the_better_figure_and_no_more_divergences():
    assert protocol.beats(scored("lorenz", "d", 1.0), scored("lorenz", "w", 2.0))
    assert not protocol.beats(scored("lorenz", "d", 1.0, divergences=1), scored("lorenz", "w", 2.0))
    assert protocol.beats(scored("digits", "d", 0.95, higher_is_better=True), scored("digits", "w", 0.9, higher_is_better=True))
    assert protocol.beats(scored("xor", "d", 0.0, success_rate=1.0, steps=500), scored("xor", "w", 0.0, success_rate=0.9, steps=50))
    assert not protocol.beats(scored("xor", "d", 0.0, steps=500), scored("xor", "w", 0.0, steps=50))


@pytest.mark.parametrize("name", [name for name, contender in CONTENDERS.items() if not contender.gradient])
def test_a_forward_only_contender_counts_the_forwards_its_step_makes(name):
    contender = CONTENDERS[name]
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = contender.make([weight], 0.01, 0.01, 0)
    calls = []

    def closure():
        calls.append(1)
        return (weight**2).sum()

    optimizer.step(closure)
    assert len(calls) == contender.forwards_per_step == contender.forward_equivalents_per_step


@pytest.mark.parametrize("name", ["wp", "zo-sgd[central]", "spsa", "dopamine[k=1]", "dopamine[k=1,no_baseline]", "dopamine[k=1,antithetic]"])
def test_the_peers_and_the_one_direction_variants_take_one_direction_whatever_the_default(name):
    optimizer = CONTENDERS[name].make([torch.nn.Parameter(torch.ones(3))], 0.01, 0.01, 0)
    assert optimizer.defaults["num_perturbations"] == 1
    assert optimizer.defaults["lr_adaptation"] == ("none" if name in ("wp", "zo-sgd[central]", "spsa") else "rpe_normalized")


def test_the_peers_keep_their_published_rules_whatever_the_default_baseline():
    peers = ["wp", "wp[k=4]", "zo-sgd[central]", "spsa", "fzoo"]
    peers += [name for method in DIRECTION_METHODS if method != directions.RULE for name in directions.contenders(method)]
    for name in peers:
        assert CONTENDERS[name].make([torch.nn.Parameter(torch.ones(3))], 0.01, 0.01, 0).defaults["beta_baseline"] is None, name
    assert DOPAMINE_DEFAULTS["beta_baseline"] is not None
    assert protocol.identity("dopamine")["beta_baseline"] == DOPAMINE_DEFAULTS["beta_baseline"]
    assert protocol.identity("dopamine[no_baseline]")["beta_baseline"] is None


def test_a_tuning_records_what_it_tuned_and_scoring_refuses_another():
    import run_suite

    assert protocol.identity("dopamine")["num_perturbations"] == DOPAMINE_DEFAULTS["num_perturbations"] == 2
    assert protocol.identity("dopamine[k=1]")["num_perturbations"] == 1
    assert protocol.identity("adam")["optimizer"] == "Adam"

    def tuned_file(tmp, identity, split="validation"):
        entry = dict(identity=identity, split=split, lr=0.1, schedule="constant", grid=[0.1], trials=[])
        path = tmp / "tuned.json"
        path.write_text(json.dumps({"quick": {"tasks": {"xor": {"dopamine": entry}}}}))
        return path

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        good = run_suite.load_tuned(tuned_file(tmp, protocol.identity("dopamine")), "quick", {"xor": ["dopamine"]})
        assert good["tasks"]["xor"]["dopamine"]["lr"] == 0.1
        # A tuning of the one-direction rule, of the test split, or of
        # nothing at all is not scored as today's default.
        for path in (
            tuned_file(tmp, protocol.identity("dopamine[k=1]")),
            tuned_file(tmp, protocol.identity("dopamine"), split="test"),
            tuned_file(tmp, None),
        ):
            with pytest.raises(SystemExit, match="xor/dopamine"):
                run_suite.load_tuned(path, "quick", {"xor": ["dopamine"]})
        with pytest.raises(SystemExit, match="xor/wp"):
            run_suite.load_tuned(tuned_file(tmp, protocol.identity("dopamine")), "quick", {"xor": ["dopamine", "wp"]})


def test_the_directions_study_gives_each_method_at_each_k_the_same_budget_of_forwards():
    task = tasks.chaotic_task("lorenz", False)
    budget = protocol.BUDGET_FORWARDS_PER_STEP * task.steps
    for method, spec in DIRECTION_METHODS.items():
        for k in spec.counts:
            name = with_directions(method, k)
            contender = CONTENDERS[name]
            defaults = contender.make([torch.nn.Parameter(torch.ones(3))], 0.01, 0.01, 0).defaults
            assert defaults["num_perturbations"] == k
            assert all(defaults[option] == value for option, value in spec.options.items())
            steps = protocol.equal_forwards_steps(task, name)
            assert budget - contender.forwards_per_step < steps * contender.forwards_per_step <= budget
    # The ablation's pair differs in the step-size rule alone: the RPE's
    # adaptation and its baseline.
    rule, without = (protocol.identity(with_directions(m, 2)) for m in (directions.RULE, directions.WITHOUT_RULE))
    assert {key for key in rule if rule[key] != without[key]} == {"lr_adaptation", "beta_baseline"}
    assert with_directions("zo-sgd[central]", 8) == "zo-sgd[central,k=8]"


def study_entry(task_name, scores):
    """Tuned entries of every method at each k, with `scores[name]` (else a
    poor one) as the score of its one trial."""
    poor = [0.0, -math.inf] if task_name == "xor" else [-3, -1.0]
    names = [name for method in DIRECTION_METHODS for name in directions.contenders(method)]
    return {name: dict(trials=[dict(score=scores.get(name, poor))]) for name in names}


def test_the_study_chooses_the_k_whose_best_trial_wins_xor_counting_forwards_and_fewer_on_a_tie():
    xor, lorenz = tasks.xor_task(False), tasks.chaotic_task("lorenz", False)
    # k=2 takes fewer steps (80 at 3 forwards: 240) than k=1 (100 at 2: 200)
    # but more forward passes.
    chosen = directions.choose_directions(xor, study_entry("xor", {"dopamine[k=1]": [1.0, -100], "dopamine[k=2]": [1.0, -80]}))
    assert chosen["dopamine"] == 1
    # A trial with fewer divergences wins over a better median; a tie goes
    # to the fewer directions.
    scores = {"wp[k=4]": [0, -0.002], "wp[k=8]": [-1, -0.001], "fzoo[k=4]": [0, -0.003], "fzoo[k=8]": [0, -0.003]}
    chosen = directions.choose_directions(lorenz, study_entry("lorenz", scores))
    assert chosen["wp"] == 4 and chosen["fzoo"] == 4
    assert chosen["spsa"] == 1  # every k alike
    assert directions.scored(dict(chosen=chosen))[: len(DIRECTION_METHODS)] == [
        "dopamine[k=1]", "wp[k=4]", "zo-sgd[central,k=1]", "spsa[k=1]", "fzoo[k=4]"
    ]
    # Then the ablation's pair at every k, each name once.
    rest = directions.scored(dict(chosen=chosen))[len(DIRECTION_METHODS) :]
    assert sorted(rest) == sorted(["dopamine[k=2]", "dopamine[k=4]", "dopamine[k=8]", "wp[k=1]", "wp[k=2]", "wp[k=8]"])


def test_the_paired_ratio_compares_each_seed_s_cost_and_keeps_failures():
    seeds = dict(scoring_seeds=[0, 1, 2, 3])
    # MSE: per seed 0.5, 1 (equal), 0 (the other diverged), inf (this one
    # did); as (a - b) / (a + b): -1/3, 0, -1, 1, whose median -1/6 is a
    # ratio of 5/7.
    row = dict(scored("lorenz", "d", 1.0), per_seed=[1.0, 2.0, 3.0, math.inf], **seeds)
    other = dict(scored("lorenz", "w", 1.0), per_seed=[2.0, 2.0, math.inf, 4.0], **seeds)
    pair = protocol.paired(row, other)
    assert (pair["won"], pair["lost"]) == (2, 1) and pair["ratio"] == pytest.approx(5 / 7)
    # The interval of those differences, as ratios: its top, a difference
    # of 1, is an infinite ratio.
    low, high = protocol.bootstrap_ci([-1 / 3, 0.0, -1.0, 1.0])
    assert high == 1.0 and pair["ci95"] == pytest.approx([(1 + low) / (1 - low), math.inf])
    swapped = protocol.paired(other, row)
    assert (swapped["won"], swapped["lost"]) == (1, 2) and swapped["ratio"] == pytest.approx(7 / 5)
    # Swapping a pair inverts the ratio and its interval, also where an even
    # number of seeds puts two ratios in the middle (2 and 4/3 here).
    row = dict(scored("lorenz", "d", 1.0), per_seed=[1.0, 2.0, 4.0, 4.0], **seeds)
    other = dict(scored("lorenz", "w", 1.0), per_seed=[2.0, 1.0, 3.0, 2.0], **seeds)
    pair, swapped = protocol.paired(row, other), protocol.paired(other, row)
    assert pair["ratio"] == pytest.approx(1 / swapped["ratio"]) and pair["ratio"] > 1
    assert pair["ci95"] == pytest.approx([1 / swapped["ci95"][1], 1 / swapped["ci95"][0]])
    # Accuracy: the ratio of the errors, 0.1 against 0.2; two failures, or
    # two perfect runs, tie.
    one = dict(scoring_seeds=[0])
    better = dict(scored("digits", "d", 0.9, higher_is_better=True), per_seed=[0.9], **one)
    worse = dict(scored("digits", "w", 0.8, higher_is_better=True), per_seed=[0.8], **one)
    assert protocol.paired(better, worse)["ratio"] == pytest.approx(0.5)
    assert protocol.paired(better, worse)["won"] == 1
    row = dict(scored("digits", "d", 0.9, higher_is_better=True), per_seed=[1.0, -math.inf], scoring_seeds=[0, 1])
    assert protocol.paired(row, row) == dict(won=0, lost=0, p=1.0, ratio=1.0, ci95=[1.0, 1.0])
    # XOR: steps to target, in forward passes with per_forward: 300 against
    # 200, two failures, 150 against 200, 30 against a perfect 0.
    row = dict(scored("xor", "d", 0.0, forwards=3), per_seed=[100.0, math.inf, 50.0, 10.0], **seeds)
    other = dict(scored("xor", "w", 0.0, forwards=2), per_seed=[100.0, math.inf, 100.0, 0.0], **seeds)
    assert protocol.paired(row, other)["won"] == 1
    pair = protocol.paired(row, other, per_forward=True)
    assert (pair["won"], pair["lost"]) == (1, 2) and pair["ratio"] == pytest.approx(11 / 9)  # median of 0, 0.2
    with pytest.raises(ValueError, match="different seeds"):
        protocol.paired(row, dict(other, scoring_seeds=[4, 5, 6, 7]))


def test_the_sign_test_gives_the_exact_two_sided_binomial_chance():
    # Five seeds of five: 2 / 32; 32 of 65 against 33: as even as it gets;
    # 19 of 20: 2 * 21 / 2**20; ties are left out by the caller.
    assert protocol.sign_test(5, 0) == protocol.sign_test(0, 5) == pytest.approx(0.0625)
    assert protocol.sign_test(32, 33) == 1.0
    assert protocol.sign_test(19, 1) == pytest.approx(42 / 2**20)
    assert protocol.sign_test(35, 30) == pytest.approx(0.6201, abs=1e-4)
    assert protocol.sign_test(0, 0) == 1.0
    # paired() counts only the seeds either side won.
    row = dict(scored("lorenz", "d", 1.0), per_seed=[1.0, 1.0, 1.0, 2.0], scoring_seeds=[0, 1, 2, 3])
    other = dict(scored("lorenz", "w", 1.0), per_seed=[2.0, 2.0, 2.0, 2.0], scoring_seeds=[0, 1, 2, 3])
    assert protocol.paired(row, other)["p"] == pytest.approx(protocol.sign_test(3, 0)) == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["lorenz", "xor"])
def test_a_scored_row_keeps_each_seed_s_figure_in_seed_order(monkeypatch, name):
    task = tasks.task_named(name, False)
    task.seeds = [7, 8, 9]
    # WP's figures; SPSA's are ten times them. Seed 8 diverged (XOR: did
    # not solve).
    finals = {7: 0.3, 8: 0.1, 9: 0.2}
    reached = {7: 40, 8: None, 9: 20}

    def fake_runs(jobs, workers, progress, label, work=None):
        scale = {"wp": 1, "spsa": 10}
        return [dict(steps_to_target=None if reached[job.seed] is None else scale[job.contender] * reached[job.seed],
                     seconds_to_target=None if reached[job.seed] is None else 1.0,
                     final_metric=scale[job.contender] * finals[job.seed], final_loss=finals[job.seed],
                     diverged=job.seed == 8 and name != "xor", seconds=1.0, steps=task.steps,
                     curve=[(task.steps, 1.0, finals[job.seed], finals[job.seed])], metric_limit=None) for job in jobs]

    monkeypatch.setattr(protocol, "run_jobs", fake_runs)
    configuration = dict(lr=0.01, schedule="constant", grid=[0.01], at_grid_edge=True)
    wp, spsa = protocol.score(task, {"wp": configuration, "spsa": configuration}, False, 1, lambda message: None)
    assert wp["scoring_seeds"] == spsa["scoring_seeds"] == [7, 8, 9]
    expected = [40.0, math.inf, 20.0] if name == "xor" else [0.3, math.inf, 0.2]
    assert wp["per_seed"] == expected
    assert spsa["per_seed"] == pytest.approx([10 * value for value in expected])


def test_beating_per_forward_counts_xor_in_forward_passes():
    fewer_forwards = dict(scored("xor", "d", 0.0, steps=100, forwards=2), median_forwards_to_target=200)
    fewer_steps = dict(scored("xor", "w", 0.0, steps=60, forwards=5), median_forwards_to_target=300)
    assert protocol.beats(fewer_forwards, fewer_steps, per_forward=True)
    assert not protocol.beats(fewer_forwards, fewer_steps)


def study_rows(chosen):
    """Scored rows of the study on Lorenz: Dopamine at every k an MSE of
    0.001; fzoo better, the others worse."""
    rows = []
    for name in directions.scored(dict(chosen=chosen)):
        method = next(m for m in DIRECTION_METHODS if name in directions.contenders(m))
        k = int(name.split("k=")[1].rstrip("]"))
        final = 0.001 if method == "dopamine" else 0.0005 if method == "fzoo" else 0.002
        rows.append(dict(scored("lorenz", name, final), study="directions", method=method, directions=k,
                         chosen=chosen[method] == k, ci95=[final, final], config=dict(seeds=5), front_end="python",
                         per_seed=[final] * 5, scoring_seeds=list(range(5))))
    return rows


def test_the_report_pairs_the_rule_with_wp_at_every_k_and_judges_the_defaults_against_each_peer_s_k():
    import report

    chosen = dict(dopamine=2, wp=2, **{"zo-sgd[central]": 1, "spsa": 1, "fzoo": 4})
    rows = study_rows(chosen)
    text = "\n".join(report._directions(rows))
    assert "wp at its k on 1 of 1 tasks; zo-sgd[central] at its k on 1 of 1 tasks" in text
    assert "fzoo at its k on 0 of 1 tasks" in text and "**not met**" in text
    assert "Dopamine at the k its tuning chose beats wp on 1 of 1; zo-sgd[central] on 1 of 1; spsa on 1 of 1; fzoo on 0 of 1" in text
    half = "| 0.5 [0.5, 0.5], won 5, lost 0 of 5 (p 0.062) |"
    assert sum(line.startswith("| lorenz | ") and line.endswith(f"| **beats**, intervals disjoint {half}") for line in text.splitlines()) == 4
    # Seed by seed: the defaults (0.001 on every seed) at half the MSE of
    # WP, MeZO and SPSA, at twice FZOO's.
    assert f"| lorenz {half} 0.5 [0.5, 0.5], won 5, lost 0 of 5 (p 0.062) {half} 2 [2, 2], won 0, lost 5 of 5 (p 0.062) |" in text
    assert ("lies below 1: wp on lorenz, zo-sgd[central] on lorenz, spsa on lorenz; across 1: none; above 1: fzoo on lorenz"
            in text)
    # An interval that reaches the other's: the same verdict, marked; equal
    # figures: neither beats; a diverged median is said so; a missing interval is not
    # called an overlap.
    named = {r["optimizer"]: r for r in rows}
    named["wp[k=8]"]["ci95"] = [0.0008, 0.002]
    named["wp[k=2]"].update(final_metric=0.001, ci95=[0.001, 0.001], per_seed=[0.002, 0.0005, 0.001, 0.001, 0.001])
    named["wp[k=4]"].update(final_metric=math.inf, ci95=[math.inf, math.inf], divergences=3,
                            per_seed=[math.inf] * 3 + [0.002] * 2)
    named["wp[k=1]"]["ci95"] = None
    text = "\n".join(report._directions(rows))
    row_of = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| lorenz | ")}
    assert row_of["8"].endswith(f"| **beats**, intervals overlap {half}")
    # Per seed 0.5, 2, 1, 1, 1: one won, one lost, the median a tie.
    pair = protocol.paired(named["dopamine[k=2]"], named["wp[k=2]"])
    assert pair["won"] == 1 and pair["lost"] == 1 and pair["ratio"] == 1.0
    assert row_of["2"].endswith(f"| neither beats, intervals overlap | 1 {report._ci(pair['ci95'])}, won 1, lost 1 of 5 (p 1) |")
    assert "| most runs diverged; 3/5 div. | **beats**, intervals disjoint | 0 [0, 0.5], won 5, lost 0 of 5 (p 0.062) |" in row_of["4"]
    assert row_of["1"].endswith(f"| **beats**, an interval unknown {half}")
    assert "against WP at the same k lies below 1: lorenz k=1, lorenz k=4, lorenz k=8; across 1: lorenz k=2; above 1: none" in text
    # The main tables leave the study's rows out.
    assert report._selected(rows, "lorenz") == {}


def test_scoring_refuses_a_missing_directions_study():
    import run_suite

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tuned.json"
        path.write_text(json.dumps({"quick": {"tasks": {}, "directions": {}}}))
        with pytest.raises(SystemExit, match="xor/directions/dopamine.k=1."):
            run_suite.load_tuned(path, "quick", {}, ["xor"])


def test_contenders_and_the_directions_study_alone_are_refused_together(capsys):
    import run_suite

    # Scoring the study alone takes no contenders; retuning it takes only
    # the study's methods (a real retune is not run here: it would rewrite
    # benchmarks/tuned.json).
    for arguments in (["--contenders", "wp"], ["--tune", "--contenders", "wp", "adam"]):
        with pytest.raises(SystemExit):
            run_suite.main(["--directions-only", *arguments])
        assert "--contenders picks among the tasks' contenders" in capsys.readouterr().err


def test_retuning_some_methods_of_the_study_keeps_the_others_trials(monkeypatch):
    lorenz = tasks.chaotic_task("lorenz", False)
    earlier = dict(contenders=study_entry("lorenz", {"wp[k=8]": [0, -0.001]}), chosen={})
    earlier["contenders"]["gone[k=1]"] = dict(trials=[])  # no longer a method: dropped

    def tune(task, names, *rest):
        return {name: dict(trials=[dict(score=[0, -0.0005 if name == "dopamine[k=2]" else -0.01])]) for name in names}

    monkeypatch.setattr(protocol, "tune", tune)
    study = directions.tune(lorenz, False, 1, lambda message: None, ["dopamine"], earlier)
    every = [name for method in DIRECTION_METHODS for name in directions.contenders(method)]
    assert sorted(study["contenders"]) == sorted(every)
    for name in every:
        if name.startswith("dopamine"):
            assert study["contenders"][name] == tune(lorenz, [name])[name]
        else:
            assert study["contenders"][name] is earlier["contenders"][name]
    assert study["chosen"]["dopamine"] == 2 and study["chosen"]["wp"] == 8
    # Without an earlier study every method is tuned.
    assert sorted(directions.tune(lorenz, False, 1, lambda message: None, ["dopamine"], None)["contenders"]) == sorted(every)


def test_make_bench_leaves_the_evidence_contenders_out_and_a_partial_retune_keeps_their_tunings(monkeypatch):
    import argparse

    import run_suite
    from harness import EVIDENCE_CONTENDERS, TASK_CONTENDERS

    lorenz, finetune = tasks.chaotic_task("lorenz", False), tasks.finetune_task(False, False)
    assert protocol.contenders_of(lorenz) == TASK_CONTENDERS and not set(EVIDENCE_CONTENDERS) & set(TASK_CONTENDERS)
    # Named, they are scored or retuned on the paper's tasks; fine-tuning has its own contenders.
    assert protocol.contenders_of(lorenz, ["dopamine[k=4,no_baseline]", "wp", "adam[fused]"]) == ["dopamine[k=4,no_baseline]", "wp"]
    assert protocol.contenders_of(finetune, ["dopamine[k=4,no_baseline]", "fzoo"]) == ["fzoo"]

    monkeypatch.setattr(protocol, "tune", lambda task, names, *rest: {name: dict(trials=["new"]) for name in names})
    entry = {"tasks": {"lorenz": {name: dict(trials=["old"]) for name in TASK_CONTENDERS + EVIDENCE_CONTENDERS + ["gone"]}}}
    args = argparse.Namespace(contenders=["wp"], full=False, workers=1)
    run_suite.tune_task(args, lorenz, entry, lambda message: None)
    retuned = entry["tasks"]["lorenz"]
    assert sorted(retuned) == sorted(TASK_CONTENDERS + EVIDENCE_CONTENDERS)
    assert [name for name, e in retuned.items() if e["trials"] == ["new"]] == ["wp"]
    # A whole retune (make bench-tune) tunes make bench's contenders only.
    args.contenders = None
    run_suite.tune_task(args, lorenz, entry, lambda message: None)
    assert sorted(entry["tasks"]["lorenz"]) == sorted(TASK_CONTENDERS)


def test_the_study_refuses_a_same_named_contender_with_other_options(monkeypatch):
    import harness

    name = with_directions("wp", 4)
    other = harness._forward_only(name, "wp", lr_adaptation="none", noise="gaussian")
    monkeypatch.setitem(harness.CONTENDERS, name, other)
    with pytest.raises(RuntimeError, match=r"the directions study's wp\[k=4\] is not the contender of that name"):
        harness._register_direction_contenders()
    # The suite's own wp[k=4] is the study's.
    monkeypatch.setitem(harness.CONTENDERS, name, harness._forward_only(name, "wp", lr_adaptation="none", num_perturbations=4, **harness.PAPER_RPE))
    harness._register_direction_contenders()


def test_a_run_with_a_metric_limit_diverges_when_it_ends_above_it():
    """Fine-tuning: a run that ends worse than the pretrained model failed,
    whatever its training losses."""
    assert not Run(initial_loss=1.0, final_loss=2.0, final_metric=0.9, metric_limit=1.0).diverged
    assert Run(initial_loss=2.0, final_loss=1.0, final_metric=1.1, metric_limit=1.0).diverged
    assert Run(initial_loss=2.0, final_loss=math.nan, final_metric=0.5, metric_limit=1.0).diverged
    assert Run(initial_loss=2.0, final_loss=1.0, final_metric=math.nan, metric_limit=1.0).diverged


def test_the_metric_at_equal_time_is_the_last_evaluation_by_then():
    task = tasks.chaotic_task("lorenz", False)
    curve = [(100, 1.0, 0.5, 0.4), (200, 2.0, 0.3, 0.2), (300, 3.0, 0.2, 0.1)]
    assert protocol.value_at_seconds(task, run(None, curve=curve) | dict(seconds=3.0), 2.5) == 0.2
    assert protocol.value_at_seconds(task, run(None, curve=curve) | dict(seconds=3.0), 0.5) == math.inf
    stopped = run(None, diverged=True, curve=curve[:1]) | dict(seconds=1.5)
    assert protocol.value_at_seconds(task, stopped, 2.5) == math.inf


@pytest.fixture
def tiny_pretrained_lm(tmp_path, monkeypatch):
    """The fine-tuning tasks over a language model pretrained for 2 steps,
    cached in a temporary folder."""
    import dataclasses

    monkeypatch.setattr(tasks, "LM_CONFIG", dataclasses.replace(tasks.LM_CONFIG, pretrain_steps=2))
    monkeypatch.setattr(tasks, "LM_CACHE", tmp_path)
    monkeypatch.setattr(tasks, "_LM", {})
    messages = []
    tasks.finetune_task(True, False).prepare(messages.append)
    assert "pretraining the language model" in messages[0]
    assert len(list(tmp_path.glob("tinylm-*.pt"))) == 1
    return tasks


@pytest.mark.parametrize("name", ["finetune-full", "finetune-lora"])
def test_fine_tuning_starts_from_the_pretrained_model_and_judges_it_against_it(tiny_pretrained_lm, name):
    task = tasks.task_named(name, False)
    assert list(task.contenders) == ["dopamine", "dopamine[lowrank]", "zo-sgd[central]", "fzoo", "sgd", "adam"]
    validation, test = task.setup(0, "validation"), task.setup(0, "test")
    model = validation["model"]
    trainable = {id(p) for p in validation["params"]}
    frozen = [p for p in model.parameters() if id(p) not in trainable]
    if name == "finetune-lora":
        assert frozen and all(not p.requires_grad for p in frozen)
        assert sum(p.numel() for p in validation["params"]) < sum(p.numel() for p in frozen) // 10
    else:
        assert not frozen
    # The same pretrained start and minibatches; another held-out set, and
    # the start's held-out loss is the limit a run must end within.
    assert validation["metric_limit"] == validation["evaluate"]() != test["evaluate"]() == test["metric_limit"]
    validation["before_step"]()
    test["before_step"]()
    assert validation["loss_fn"]().item() == test["loss_fn"]().item()
    assert validation["reached"](None, validation["metric_limit"] - tasks.LM_TARGET_GAIN)
    assert not validation["reached"](None, validation["metric_limit"] - tasks.LM_TARGET_GAIN / 2)


def test_the_budget_study_gives_the_forward_only_contenders_ten_times_adams_forwards():
    import finetune_budget

    task = tasks.task_named("finetune-lora", False)
    steps = finetune_budget.horizons(task, 10)
    assert steps == {"dopamine": 3000, "dopamine[lowrank]": 3000, "zo-sgd[central]": 4500, "fzoo": 1800, "sgd": 300, "adam": 300}
    assert {steps[name] * CONTENDERS[name].forward_equivalents_per_step for name in ("dopamine", "zo-sgd[central]", "fzoo")} == {
        10 * 300 * CONTENDERS["adam"].forward_equivalents_per_step
    }
    run = dict(curve=[(25, 0.1, 2.2, 2.10), (50, 0.2, 2.1, 1.99), (75, 0.3, 2.0, 1.90)])
    assert finetune_budget.forwards_to(run, "dopamine", 2.0) == 50 * CONTENDERS["dopamine"].forward_equivalents_per_step == 50 * 3
    assert finetune_budget.forwards_to(run, "adam", 1.9) == 75 * 3
    assert finetune_budget.forwards_to(run, "dopamine", 1.5) == math.inf


def test_a_step_s_peak_memory_counts_state_and_activations_and_forward_only_needs_none(tiny_pretrained_lm):
    """Adam's step holds gradients and two moments beside the activations a
    backward needs; Dopamine's step allocates about what inference does."""
    from harness import peak_step_bytes

    task = tasks.task_named("finetune-full", False)
    setup = task.setup(0, "test")
    weights = sum(p.numel() * p.element_size() for p in setup["params"])
    adam = peak_step_bytes(CONTENDERS["adam"], setup["params"], setup["loss_fn"], 1e-4, task.sigma, setup["before_step"])
    dopamine = peak_step_bytes(CONTENDERS["dopamine"], setup["params"], setup["loss_fn"], 1e-4, task.sigma, setup["before_step"])
    assert adam["inference"] > 0
    assert adam["step"] >= 3 * weights + adam["inference"]
    # Forward-only: at most inference plus 1% of the parameters' bytes.
    assert dopamine["step"] <= dopamine["inference"] + weights // 100


def test_a_report_of_the_study_alone_claims_nothing_of_the_main_suite_and_names_its_seeds(tmp_path):
    import report

    # As `run_suite.py --directions-only --seeds 300 ... 319` writes it.
    task = tasks.chaotic_task("lorenz", False)
    task.seeds = list(range(300, 320))
    rows = study_rows(dict(dopamine=2, wp=2, **{"zo-sgd[central]": 1, "spsa": 1, "fzoo": 4}))
    machine = dict(cpu="cpu", cores=2, threads=2, gpu=None, torch=torch.__version__, python="3")
    meta = dict(machine=machine, mode="quick", date="today", seconds=60.0, workers=2, tuning={})
    report.write(rows, meta, tmp_path, protocol.description([task]))
    text = (tmp_path / "REPORT.md").read_text()
    assert "lorenz: 20 (300-319)" in text
    assert "## Every forward-only method at its best number of directions" in text
    # No table of the defaults against the main suite's peers, and no verdict
    # on it: before, "0 of 0 tasks" read as "the target is met".
    assert "## Claims" not in text and "is met" not in text
    assert text.count("**not met**") == 1
    assert report._seed_list([5, 1, 2]) == "3 [5, 1, 2]"
