"""The ablation comparison: the method x budget table (mean, sample std, the paired difference to the
baseline with its t-based CI and Holm-adjusted p), missing and partial runs named, units never mixed, time
to target from decayed endpoints over all seeds, what methods log, the compare and schedules commands,
equal-effort tuning, and a resumable `budget.py ablate` sweep that can run jobs in parallel."""
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest

import budget as budget_lib
import runs
from studies import across_budgets, compare, ntng, plan, stats
from configurator import ConfigError
from conftest import ROOT, run_script

HAVE_MPL = importlib.util.find_spec('matplotlib') is not None  # an optional extra: without it, a line says so
NO_MPL = '(matplotlib is not installed: no plot of'


def write_run(root, name, label, budget, seed, evals, steps=100, unit='rst', log=True):
    """A run folder as train.py leaves it: config.json, and log.jsonl with train and eval records.
    evals: [(rst, tokens, val_loss)]; the last eval is where the run stopped."""
    path = root / name
    path.mkdir(parents=True)
    config = {'label': label, 'budget': budget, 'budget_unit': unit, 'seed': seed, 'arch': 'full'}
    (path / 'config.json').write_text(json.dumps({'config': config, 'argv': []}))
    if log:
        records = []
        for i, (rst, tokens, loss) in enumerate(evals, 1):
            step = round(steps * i / len(evals))
            records.append({'step': step, 'train_loss': loss + 0.1, 'lr': 1e-3, 'rst': rst, 'tokens': tokens, 'iters': step})
            records.append({'step': step, 'val_loss': loss, 'rst': rst, 'tokens': tokens, 'iters': step})
        (path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def finished(root, name, label, budget, seed, final, steps=100):
    """A complete run at `budget` RST whose val loss falls linearly from final + 1 to final."""
    evals = [(budget * k / 4, 1000 * budget * k / 4, final + 1 - k / 4) for k in (1, 2, 3, 4)]
    return write_run(root, name, label, budget, seed, evals, steps)


def row(report, label, table=0):
    """The cells of `label`'s row in the report's table number `table` (0 = val loss, 1 = steps, 2 = target;
    the verdict table is left out: its rows are read directly)."""
    blocks = [b for b in report.split('\n\n') if not b.startswith('| verdict |')]
    rows = [l for l in '\n\n'.join(blocks).splitlines() if l.startswith(f'| {label} |')]
    return [c.strip() for c in rows[table].strip('|').split('|')][1:]


# -----------------------------------------------------------------------------
# the method x budget table

@pytest.fixture
def table_runs(tmp_path):
    """Budget 10, seeds 0-2: baseline 3.00/3.02/3.04; 'better' 0.20/0.21/0.22 lower (paired differences
    tight); 'noisy' -0.10/-0.02/+0.06. Budget 20: a baseline only. Plus an unreadable run, and a partial
    one whose loss must not enter the mean."""
    root = tmp_path / 'runs'
    finals = {'baseline': [3.00, 3.02, 3.04], 'better': [2.80, 2.81, 2.82], 'noisy': [2.90, 3.00, 3.10]}
    dirs = [finished(root, f'{label}_s{seed}', label, 10.0, seed, final, steps=100 + 10 * seed)
            for label, values in finals.items() for seed, final in enumerate(values)]
    dirs.append(finished(root, 'baseline_b20', 'baseline', 20.0, 0, 2.5, steps=200))
    dirs.append(write_run(root, 'better_s9', 'better', 10.0, 9, [(2.0, 2000, 1.0), (5.0, 5000, 0.5)]))  # stopped at 5 of 10
    dirs.append(write_run(root, 'lost_s0', 'lost', 10.0, 0, [], log=False))                         # no log.jsonl
    return dirs, finals


def t2_p(t):
    """Two-sided p of Student's t with 2 degrees of freedom, in closed form: 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_student_t_and_holm_against_hand_computed_values():
    assert stats.t_p_value(1.5, 2) == pytest.approx(t2_p(1.5), rel=1e-10)
    assert stats.t_p_value(-7.0, 2) == pytest.approx(t2_p(7.0), rel=1e-10)
    assert stats.t_p_value(1.0, 1) == pytest.approx(0.5, rel=1e-10)       # Cauchy: 1 - 2 atan(1) / pi
    assert stats.t95(4) == pytest.approx(2.7764, abs=1e-4) and stats.t95(1) == pytest.approx(12.7062, abs=1e-3)
    # Holm: sorted p 0.005, 0.01, 0.03, 0.04 (m = 4) -> 0.02, 0.03, 0.06, max(0.06, 0.04); nan stays out
    assert stats.holm([0.01, 0.04, 0.03, math.nan, 0.005])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.01, 0.04, 0.03, math.nan, 0.005])[4] == pytest.approx(0.02)
    assert math.isnan(stats.holm([0.01, math.nan])[1]) and stats.holm([0.6, 0.5]) == [1.0, 1.0]
    delta, half, p = stats.paired_test([1.0, 2.0, 3.5], [0.5, 1.0, 2.0])     # differences 0.5, 1.0, 1.5
    assert (delta, half) == pytest.approx((1.0, 4.3027 * 0.5 / math.sqrt(3)), abs=1e-4)
    assert p == pytest.approx(t2_p(1.0 / (0.5 / math.sqrt(3))), rel=1e-9)


def test_the_table_is_paired_with_holm_adjusted_p(table_runs, tmp_path, monkeypatch):
    dirs, finals = table_runs
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)  # the plot has its own test
    report = compare.compare(dirs, out=str(tmp_path / 'x'), target='none')
    assert (tmp_path / 'x.md').read_text() == report + '\n'
    assert report.splitlines()[0] == '| method | budget 10 | budget 20 |'
    assert row(report, 'baseline') == ['3.0200 ± 0.0200 (n=3)', '2.5000 ± 0.0000 (n=1)']
    p = {}
    for label in ('better', 'noisy'):
        d = [m - b for m, b in zip(finals[label], finals['baseline'])]
        se = statistics.stdev(d) / math.sqrt(3)
        p[label] = t2_p(statistics.mean(d) / se)
    holm = {'better': 2 * p['better'], 'noisy': max(2 * p['better'], p['noisy'])}   # better's p is the smaller
    for label in ('better', 'noisy'):
        d = [m - b for m, b in zip(finals[label], finals['baseline'])]
        mean, half = statistics.mean(d), 4.302653 * statistics.stdev(d) / math.sqrt(3)
        m, sd = statistics.mean(finals[label]), statistics.stdev(finals[label])
        want = (f'{m:.4f} ± {sd:.4f} (n=3) Δ {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] p={holm[label]:.3g}'
                + ('*' if holm[label] < 0.05 else ''))
        assert row(report, label) == [want, '—'], label
    assert row(report, 'better')[0].endswith('*') and not row(report, 'noisy')[0].endswith('*')
    assert "Holm-adjusted over the table's 2 comparisons" in report
    assert row(report, 'baseline', 1) == ['110', '200'] and row(report, 'better', 1) == ['110', '—']  # steps
    missing = report.split('missing or partial runs (left out of the means):\n')[1].splitlines()
    assert sorted(missing) == sorted([f'- {tmp_path}/runs/better_s9: budget not spent',
                                      f'- {tmp_path}/runs/lost_s0: unreadable (FileNotFoundError)'])


def test_pairs_are_by_seed_and_a_single_pair_has_no_interval(tmp_path):
    dirs = [finished(tmp_path, 'b0', 'baseline', 10.0, 0, 3.0), finished(tmp_path, 'b1', 'baseline', 10.0, 1, 3.5),
            finished(tmp_path, 'm1', 'm', 10.0, 1, 3.25)]              # only seed 1 is shared
    groups = stats.group_runs([runs.read_run(d) for d in dirs])
    assert row(compare.ablation_table(groups), 'm') == ['3.2500 ± 0.0000 (n=1) Δ -0.2500 pending (1 of 2 paired seeds)']


def test_a_run_given_twice_is_refused_and_units_get_a_table_each(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    a = finished(tmp_path, 'a', 'baseline', 10.0, 0, 3.0)
    with pytest.raises(ConfigError, match='is given twice: each run counts once'):
        compare.compare([a, str(a) + '/'], out=str(tmp_path / 'x'))
    b = write_run(tmp_path, 'b', 'baseline', 10.0, 0, [(1, 100, 3.5), (2, 200, 2.0)], unit='iters')
    report = compare.compare([a, b], out=str(tmp_path / 'x'), target='none')
    assert 'budget unit: iters' in report and 'budget unit: rst' in report
    assert report.count('(n=1)') == 2 and '(n=2)' not in report               # never averaged together


def test_a_sweep_folder_is_read_whole_and_its_il_model_is_not_a_method(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    sweep_dir = tmp_path / 'ablation'
    finished(sweep_dir / 'baseline' / 'b10', 's0', 'baseline', 10.0, 0, 3.0)
    finished(sweep_dir / 'm' / 'b10', 's0', 'm', 10.0, 0, 2.5)
    finished(sweep_dir / 'il' / 'search', 'b10', 'rho_il', 10.0, 0, 1.5)   # where ablate trains its own IL model
    (sweep_dir / 'il' / 'search' / 'b20').mkdir()                          # a killed IL run: no label to read
    (sweep_dir / 'il' / 'search' / 'b20' / 'config.json').write_text('{"trunc')
    report = compare.compare([str(sweep_dir)], out=str(tmp_path / 'x'), target='none')
    assert row(report, 'baseline')[0].startswith('3.0000') and row(report, 'm')[0].startswith('2.5000 ± 0.0000 (n=1) Δ -0.5000')
    assert '| rho_il |' not in report and "2 run(s) of RHO-LOSS's IL model left out" in report and 'missing' not in report
    with pytest.raises(ConfigError, match='are IL models of RHO-LOSS, not methods'):
        compare.compare([str(sweep_dir / 'il')], out=str(tmp_path / 'x'))


def test_compare_refuses_a_missing_path_a_run_reached_twice_and_two_runs_of_one_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    sweep_dir = tmp_path / 'ablation'
    base = finished(sweep_dir / 'baseline' / 'b10', 's0', 'baseline', 10.0, 0, 3.0)
    out = str(tmp_path / 'x')
    with pytest.raises(ConfigError, match='ablaton does not exist'):                 # a typo is not a partial run
        compare.compare([str(sweep_dir), str(tmp_path / 'ablaton')], out=out)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(budget_lib.UserError, match='no readable runs among the 1 folder'):
        compare.compare([str(tmp_path / 'empty')], out=out)
    with pytest.raises(ConfigError, match=f'{base} is given twice .found under both {sweep_dir} and {sweep_dir / "baseline"}'):
        compare.compare([str(sweep_dir), str(sweep_dir / 'baseline')], out=out)
    finished(sweep_dir / 'old' / 'baseline' / 'b10', 's0', 'baseline', 10.0, 0, 2.0)   # a copy inside the sweep
    with pytest.raises(ConfigError, match='are both baseline at budget 10 seed 0'):
        compare.compare([str(sweep_dir)], out=out)
    assert not (tmp_path / 'x.md').exists()


def test_method_statistics_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    dirs = []
    for seed, frac in enumerate((0.4, 0.6)):
        d = finished(tmp_path, f'sb{seed}', 'sb', 10.0, seed, 3.0)
        with open(d / 'log.jsonl', 'a') as f:   # two log records: the run's mean is their mean
            f.write(json.dumps({'step': 1, 'selected_frac': frac - 0.1}) + '\n' + json.dumps({'step': 2, 'selected_frac': frac + 0.1}) + '\n')
        dirs.append(d)
    report = compare.compare(dirs, out=str(tmp_path / 'x'), target='none')
    half = 12.7062 * statistics.stdev([0.4, 0.6]) / math.sqrt(2)                 # t at df 1
    assert f'| sb | 10 | selected_frac | 0.500 ± {half:.3f} (n=2) |' in report

def test_a_tuning_point_is_the_mean_over_its_seeds_with_what_the_method_logs(tmp_path):
    """tune_summary: mean final val loss and mean kept fraction over the tuning seeds; a seed that has not
    finished makes the point unusable (inf), it does not drop out of the mean."""
    for seed, (final, frac) in enumerate(((2.0, 0.4), (3.0, 0.6))):
        d = finished(tmp_path / 'lr0.001', f's{seed}', 'sb', 10.0, seed, final)
        with open(d / 'log.jsonl', 'a') as f:
            f.write(json.dumps({'step': 1, 'selected_frac': frac}) + '\n')
    point = ntng.tune_summary(tmp_path / 'lr0.001', (0, 1), 1e-3, {})
    assert point == {'lr': 1e-3, 'extra': {}, 'final': 2.5, 'selected_frac': pytest.approx(0.5)}
    assert ntng.tune_summary(tmp_path / 'lr0.001', (0, 1, 2), 1e-3, {})['final'] == math.inf


# -----------------------------------------------------------------------------
# time to target

def test_crossing():
    pts = [(10, 4.0), (20, 3.0), (30, 2.0)]
    assert stats.crossing(pts, 3.5) == pytest.approx(15.0)      # interpolated between the bracketing evals
    assert stats.crossing(pts, 3.0) == 20                        # at an eval
    assert stats.crossing(pts, 2.2) == pytest.approx(28.0)
    assert stats.crossing(pts, 5.0) == 10                        # already below at the first eval
    assert stats.crossing(pts, 1.9) is None                      # never
    assert stats.crossing([(10, 4.0), (20, 2.0), (30, 3.5)], 3.0) == pytest.approx(15.0)  # the first time


# -----------------------------------------------------------------------------
# sensitivity to the cost table

def test_log_budget_interpolation_inside_and_along_the_end_segments():
    ends = [(100, 3.0), (200, 2.8), (400, 2.7)]
    assert across_budgets.log_budget_interp(ends, 200) == pytest.approx(2.8)
    assert across_budgets.log_budget_interp(ends, 100 * 2 ** 0.5) == pytest.approx(2.9)   # halfway in log budget
    assert across_budgets.log_budget_interp(ends, 50) == pytest.approx(3.2)              # the first segment, extended
    assert across_budgets.log_budget_interp(ends, 800) == pytest.approx(2.6)             # the last one
    assert across_budgets.log_budget_interp(ends[:1], 100) is None


def test_a_ten_percent_cost_change_that_flips_a_cell_is_named():
    """'m' spends 30 of its 100 RST on forward-only scoring ('fwd:4'); the baseline none. At budget 100
    m is 0.001 better (2.999 vs 3.000), at 200 it is 2.70 vs 2.80. With 'fwd:4' x1.1, m's budget-100 run
    would have stopped at 100 x 100 / 103 RST: 2.999 - (0.299 / ln 2) x ln(100 / 103) = 3.01175, so its
    Δ becomes +0.01175 (a flip); x0.9 gives 100 x 100 / 97 (Δ -0.0141, no flip). optimizer:adamw x1.1
    moves both runs to budget 100 / 1.01, but m's endpoints are steeper (0.299 against 0.2 per ln 2):
    Δ = -0.001 + (0.299 - 0.2) / ln 2 x ln 1.01 = +0.0004, a flip too. The budget-200 cell never flips."""
    def run(seed, budget, final, entries):
        scale = budget / 100
        return {'seed': seed, 'final': final, 'complete': True, 'rst_by_entry': {k: v * scale for k, v in entries.items()}}
    base, mine = {'fwd_bwd:4': 90.0, 'optimizer:adamw': 10.0}, {'fwd_bwd:4': 60.0, 'fwd:4': 30.0, 'optimizer:adamw': 10.0}
    groups = {'baseline': {100: [run(s, 100, 3.0 + s / 100, base) for s in (1, 2)],
                           200: [run(s, 200, 2.8 + s / 100, base) for s in (1, 2)]},
              'm': {100: [run(s, 100, 2.999 + s / 100, mine) for s in (1, 2)],
                    200: [run(s, 200, 2.7 + s / 100, mine) for s in (1, 2)]}}
    got = across_budgets.perturbed_final(groups['m'], 1, 100, 'fwd:4', 1.1)
    assert got == pytest.approx(2.999 + 0.01 - 0.299 / math.log(2) * math.log(100 / 103))
    text = across_budgets.cost_sensitivity(groups, 'baseline')
    assert 'entries (fwd:4, fwd_bwd:4, optimizer:adamw) at x0.9 and x1.1' in text
    flips = [line for line in text.splitlines() if line.startswith('- ')]
    assert flips == ['- m at budget 100, fwd:4 x1.1: Δ -0.0010 -> +0.0118',
                     '- m at budget 100, optimizer:adamw x1.1: Δ -0.0010 -> +0.0004']
    calm = {k: {b: [dict(r, final=r['final'] - (0.05 if k == 'm' else 0)) for r in rs] for b, rs in g.items()}
            for k, g in groups.items()}
    assert across_budgets.cost_sensitivity(calm, 'baseline').endswith(': no cell changes sign')
    one_budget = {k: {100: g[100]} for k, g in groups.items()}
    assert across_budgets.cost_sensitivity(one_budget, 'baseline').startswith('cost-table sensitivity: not shown yet')  # nothing to read a shifted budget from
    # a sweep in progress: seed 2 has no budget-200 run yet, so every cell is read over seed 1 alone
    in_progress = {k: {100: g[100], 200: g[200][:1]} for k, g in groups.items()}
    text = across_budgets.cost_sensitivity(in_progress, 'baseline')
    assert 'read over the seeds at two budgets only: m at 100 (1 of 2)' in text
    flips = [line for line in text.splitlines() if line.startswith('- ')]
    assert flips == ['- m at budget 100, fwd:4 x1.1: Δ -0.0010 -> +0.0118',
                     '- m at budget 100, optimizer:adamw x1.1: Δ -0.0010 -> +0.0004']


def test_budget_counts_rst_per_cost_entry_and_resumes_it():
    table = {'fwd_bwd': {'2': 1.0}, 'fwd': {'2': 0.25}, 'optimizer': {'adamw': 0.1}}
    b = budget_lib.Budget('rst', 100, table, lambda L: 1.0, 8, 4)
    b.charge_train(8, 2)
    b.charge_forward(4, 2)
    b.charge_optimizer('adamw')
    b.charge_before_start({'rst': 5.0, 'tokens': 10.0})
    assert b.by_entry == pytest.approx({'fwd_bwd:2': 2.0, 'fwd:2': 0.25, 'optimizer:adamw': 0.1, 'before_start': 5.0})
    assert sum(b.by_entry.values()) == pytest.approx(b.spent['rst'])
    again = budget_lib.Budget('rst', 100, table, lambda L: 1.0, 8, 4)
    again.load_state_dict(b.state_dict())
    assert again.by_entry == b.by_entry and again.spent == b.spent
    again.load_state_dict({k: v for k, v in b.state_dict().items() if k != 'rst_by_entry'})  # an older checkpoint
    assert again.by_entry == {} and again.spent == b.spent


@pytest.fixture
def target_runs(tmp_path):
    """Budgets 10 and 20 RST, fully decayed endpoints per seed. Baseline seed 0: 3.4 at 10, 2.9 at 20;
    seed 1: 3.4 at 10, 3.1 at 20; so target 'auto' = the baseline's worst seed at 20 = 3.1. Crossings are
    interpolated in log budget: seed 0 reaches 3.1 at 10 x 2^(0.3/0.5), seed 1 at 20. 'fast' seed 0: 3.1
    at 10, seed 1: 2.95 at 10 -> both at 10. 'slow' (3.5, 3.2) never."""
    def run(name, label, budget, seed, final):
        return write_run(tmp_path, name, label, budget, seed, [(budget / 2, 50 * budget, final + 0.5), (budget, 100 * budget, final)])
    return [run('b10s0', 'baseline', 10.0, 0, 3.4), run('b20s0', 'baseline', 20.0, 0, 2.9),
            run('b10s1', 'baseline', 10.0, 1, 3.4), run('b20s1', 'baseline', 20.0, 1, 3.1),
            run('f10s0', 'fast', 10.0, 0, 3.1), run('f20s0', 'fast', 20.0, 0, 2.8),
            run('f10s1', 'fast', 10.0, 1, 2.95), run('f20s1', 'fast', 20.0, 1, 2.9),
            run('s10s0', 'slow', 10.0, 0, 3.5), run('s20s0', 'slow', 20.0, 0, 3.2)]


def test_time_to_target_from_decayed_endpoints_over_all_seeds(target_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    report = compare.compare(target_runs, out=str(tmp_path / 'x'))   # target='auto'
    assert "target val loss 3.1000, the baseline's worst of 2 seeds at budget 20 (fully decayed" in report
    base = statistics.median([10 * 2 ** 0.6, 20.0])                 # every baseline seed reaches its own target
    assert row(report, 'baseline', 2)[:3] == [f'{base:.1f}', '2/2', '1.00x']
    assert row(report, 'fast', 2)[:3] == ['10.0', '2/2 (2 already at the smallest budget: an upper bound)', f'{base / 10:.2f}x']
    assert row(report, 'slow', 2)[:3] == ['not reached', '0/1', '—']   # never: counted, not dropped
    logs = [math.log(10 * 2 ** 0.6 / 10), math.log(20.0 / 10)]       # paired by seed: baseline time / method time
    m, half = stats.t_interval(logs)
    assert row(report, 'fast', 2)[3] == f'{math.exp(m):.2f}x [{math.exp(m - half):.2f}, {math.exp(m + half):.2f}] (n=2)'
    assert row(report, 'slow', 2)[3] == 'slower: none of its 1 paired seeds reached it' and row(report, 'baseline', 2)[3] == '—'
    explicit = compare.compare(target_runs, out=str(tmp_path / 'y'), target='3.2')
    base = statistics.median([10 * 2 ** (0.2 / 0.5), 10 * 2 ** (0.2 / 0.3)])
    assert row(explicit, 'baseline', 2)[:3] == [f'{base:.1f}', '2/2', '1.00x']
    assert row(explicit, 'fast', 2)[:3] == ['10.0', '2/2 (2 already at the smallest budget: an upper bound)', f'{base / 10:.2f}x']
    assert row(explicit, 'slow', 2)[:3] == ['20.0', '1/1', f'{base / 20:.2f}x']


def test_a_seed_not_run_at_every_budget_yet_is_pending_not_unreached(target_runs, tmp_path, monkeypatch):
    """A sweep in progress. 'fast' seed 2 has only its budget-10 run (3.3, above the target 3.1): it may yet
    reach the target at 20, so it is pending, not 'not reached'. The baseline's seed 0 has begun budget 40
    (2.5): 'slow', not run at 40 yet, is pending too, and the target stays at budget 20, the largest that
    every baseline seed completed."""
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    extra = [write_run(tmp_path, 'f10s2', 'fast', 10.0, 2, [(5.0, 500, 3.8), (10.0, 1000, 3.3)]),
             write_run(tmp_path, 'b40s0', 'baseline', 40.0, 0, [(20.0, 2000, 3.0), (40.0, 4000, 2.5)])]
    report = compare.compare(target_runs + extra, out=str(tmp_path / 'x'))
    assert "target val loss 3.1000, the baseline's worst of 2 seeds at budget 20 (fully decayed" in report
    assert row(report, 'fast', 2)[:3] == ['10.0', '2/2 (1 pending: not run at every budget yet; 2 already at the smallest '
                                              'budget: an upper bound)', '1.76x']
    assert row(report, 'fast', 2)[3].endswith('(n=2, 1 pending)')
    assert row(report, 'slow', 2)[:4] == ['not reached', '0/0 (1 pending: not run at every budget yet)', '—',
                                          'not resolved yet (1 pending)']
    behind = compare.compare(target_runs + [write_run(tmp_path, 's10s1', 'slow', 10.0, 1, [(5.0, 500, 4.0), (10.0, 1000, 3.6)])],
                             out=str(tmp_path / 'y'))   # seed 0 never reached it, seed 1 not run at 20 yet
    assert row(behind, 'slow', 2)[3] == 'not resolved yet: none of its 1 finished paired seeds reached it, 1 pending'


def test_a_seed_with_a_gap_before_its_crossing_is_pending_and_auto_matches_seeds(target_runs, tmp_path, monkeypatch):
    """Target 3.0. 'gap' seed 0 has runs at 10 (3.3) and 40 (2.9) but not 20: its crossing between them could
    move once 20 runs, so it is pending; 'late' seed 0 starts at 20 (3.0, at the target there): pending too,
    not 'already at the smallest budget'. The baseline's seeds are {0, 1} at 10 and 20, {0, 2} at 40: no
    budget has every seed, so 'auto' takes the budget with the most seeds, the largest of them (40)."""
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    extra = [write_run(tmp_path, n, label, b, seed, [(b / 2, 50 * b, y + 0.5), (b, 100 * b, y)]) for n, label, b, seed, y in (
        ('g10', 'gap', 10.0, 0, 3.3), ('g40', 'gap', 40.0, 0, 2.9), ('l20', 'late', 20.0, 0, 3.0),
        ('b40s0', 'baseline', 40.0, 0, 2.6), ('b40s2', 'baseline', 40.0, 2, 2.7))]
    report = compare.compare(target_runs + extra, out=str(tmp_path / 'x'), target='3.0')
    assert row(report, 'gap', 2)[:3] == ['not reached', '0/0 (1 pending: not run at every budget yet)', '—']
    assert row(report, 'late', 2)[:3] == ['not reached', '0/0 (1 pending: not run at every budget yet)', '—']
    auto = compare.compare(target_runs + extra, out=str(tmp_path / 'y'))
    assert "target val loss 2.7000, the baseline's worst of 2 seeds at budget 40 (fully decayed" in auto


def test_a_cell_that_trained_no_step_is_named_under_the_steps(tmp_path, monkeypatch):
    """RHO-LOSS with its IL charged trains no step when the IL's cost exceeds the budget: its 'final' is the
    initial model's loss, which the table must not let pass for the method's result."""
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    folders = [finished(tmp_path, f'b{s}', 'baseline', 20.0, s, 2.0 + s / 10) for s in (0, 1)]
    folders += [write_run(tmp_path, f'il{s}', 'rho_il_charged', 20.0, s, [(3446.0, 10 ** 6, 5.35 + s / 100)], steps=0)
                for s in (0, 1)]
    report = compare.compare(folders, out=str(tmp_path / 'x'), target='none')
    assert ("trained no step (the costs charged before the first step exceed the budget; the val loss is the "
            "initial model's; left out of the Holm family): rho_il_charged at 20") in report
    assert 'trained no step' not in compare.compare(folders[:2], out=str(tmp_path / 'y'), target='none')
    cell = row(report, 'rho_il_charged')[0]  # its Δ and CI are shown, but no p: it is not one of the tests
    assert ' Δ +3.' in cell and ' [+' in cell and 'p=' not in cell and '*' not in cell


# -----------------------------------------------------------------------------
# the commands

def test_compare_command(target_runs, tmp_path):
    out = run_script('-m', 'studies.ntng', 'compare', *target_runs, f'--out={tmp_path}/x')
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / 'x.md').read_text()
    assert md.startswith('| method | budget 10 | budget 20 |') and md.strip() in out.stdout
    if HAVE_MPL:
        assert (tmp_path / 'x.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    else:
        assert NO_MPL in out.stdout and not (tmp_path / 'x.png').exists()


@pytest.mark.parametrize('target', ['-3', '0', 'nan', 'inf', 'soon'])
def test_a_target_no_run_could_reach_is_one_line(capsys, tmp_path, target):
    with pytest.raises(SystemExit) as e:
        ntng.main(['compare', str(tmp_path), f'--target={target}', f'--out={tmp_path}/x'])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: --target must be 'auto', 'none' or a val loss (a positive number), got '{target}'"]


def test_compare_without_run_folders_exits_2_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        ntng.main(['compare', f'--out={tmp_path}/x'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'compare needs run folders' in err
    assert not (tmp_path / 'x.md').exists()


@pytest.mark.parametrize('arg, says', [('--seeds=()', '--seeds is empty'), ('--seeds=(3,1,3)', '--seeds has 3 more than once'),
                                        ('--budgets=(6.0,6.0)', '--budgets has 6.0 more than once')])
def test_a_sweep_refuses_empty_or_repeated_seeds_and_budgets(capsys, tmp_path, arg, says):
    """A seed given twice would put two runs in one folder (and count one pair twice): refused, one line."""
    for command in ('ablate', 'tune') if arg.startswith('--seeds') else ('ablate',):
        with pytest.raises(SystemExit) as e:
            ntng.main([command, arg, f'--out_dir={tmp_path}/x'])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / 'x').exists()


def test_schedules_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                         # it writes schedules.png here
    budget_lib.main(['schedules', '--warmup_frac=0.0'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['p', *budget_lib.SCHEDULES] and set(budget_lib.SCHEDULES) >= {'cosine', 'wsd', 'rex'}
    table = {float(l.split()[0]): [float(v) for v in l.split()[1:]] for l in lines[1:12]}
    col = {name: i for i, name in enumerate(budget_lib.SCHEDULES)}
    assert table[0.5][col['onecycle']] == 1.0 and table[0.5][col['rex']] == pytest.approx(2 / 3, abs=5e-4)
    assert table[0.9][col['wsd']] == pytest.approx(1 - math.sqrt(0.5), abs=5e-4)
    assert all(v == 0 for v in table[1.0])
    assert (tmp_path / 'schedules.png').exists() == HAVE_MPL
    assert HAVE_MPL or any(l.startswith(NO_MPL) for l in lines)
    budget_lib.main(['schedules', '--warmup_units=5', '--budget=10'])  # an absolute warm-up: half of this budget
    lines = capsys.readouterr().out.splitlines()
    table = {float(l.split()[0]): [float(v) for v in l.split()[1:]] for l in lines[1:12]}
    assert table[0.3][col['cosine']] == pytest.approx(0.6) and table[0.6][col['cosine']] < 1.0


# -----------------------------------------------------------------------------
# the sweep

SWEEP = '''
COMMON = dict(model='tiny', batch_size=8, compile_loss=False, budget_unit='iters', eval_interval=3,
              eval_batches=2, log_interval=1, sample_tokens=0, peak_flops=1e12, lr=3e-3)
BUDGETS = (6.0, 12.0)
QUICK_BUDGETS = (6.0,)
METHODS = {
    'baseline': ('train.py', dict()),
    'stack': ('train.py', dict(arch='stack', n_layer=2, stack_fracs=(0.5,))),
    'lion': ('train.py', dict(optimizer='lion', lr=3e-4)),
}
'''


def test_sweep_plan_and_commands(tmp_path):
    (tmp_path / 'sweep.py').write_text(SWEEP)
    cfg = ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'abl'),
                             methods=('baseline', 'stack'), seeds=(0, 1))
    plan = ntng.sweep_plan(cfg)
    assert ntng.sweep_plan(dataclasses.replace(cfg, budgets=(12.0, 6.0))) == plan   # smallest budget first, as given or not
    assert [(r.args['label'], r.args['budget'], r.args['seed']) for r in plan] == [
        ('baseline', 6.0, 0), ('stack', 6.0, 0), ('baseline', 6.0, 1), ('stack', 6.0, 1),   # a budget's seeds first
        ('baseline', 12.0, 0), ('stack', 12.0, 0), ('baseline', 12.0, 1), ('stack', 12.0, 1)]
    script, args = plan[1].script, plan[1].args
    assert script == 'train.py' and args['arch'] == 'stack' and args['model'] == 'tiny' and args['label'] == 'stack'
    assert args['out_dir'] == f'{tmp_path}/abl/stack/b6/s0'
    quick = ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, out_dir=cfg.out_dir, quick=True))
    assert [(r.args['label'], r.args['budget'], r.args['seed']) for r in quick] == [('baseline', 6.0, 0), ('stack', 6.0, 0), ('lion', 6.0, 0)]
    wsd = ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, out_dir=cfg.out_dir, methods=('baseline',),
                                              seeds=(0,), baseline_schedule='wsd_branches'))
    assert wsd[-1].args['branch_budgets'] == (1.0, 2.0) and wsd[-1].args['budget'] == 6.0 and wsd[-1].self_resuming
    with pytest.raises(ConfigError, match='unknown method'):
        ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, methods=('stak',)))

    cmd = plan[1].command()                          # a fresh run replaces a stale folder
    assert cmd[1] == str(ROOT / 'train.py') and "--arch='stack'" in cmd and '--stack_fracs=(0.5,)' in cmd and '--overwrite=True' in cmd
    folder = tmp_path / 'abl' / 'stack' / 'b6' / 's0'
    folder.mkdir(parents=True)
    (folder / 'ckpt.pt').write_bytes(b'')
    (folder / 'config.json').write_text(json.dumps({'config': {**args, 'stack_fracs': [0.5], 'init_from': 'scratch'}}))
    resume = plan[1].command()                       # a started run of these keys resumes
    assert "--init_from='resume'" in resume and not any(a.startswith('--overwrite') for a in resume)
    (folder / 'config.json').write_text(json.dumps({'config': {**args, 'budget': 3.0}}))  # an older plan's run
    again = plan[1].command()
    assert '--overwrite=True' in again and not any(a.startswith('--init_from') for a in again)


def test_rho_loss_rows_share_the_sweep_s_il_model_or_train_their_own():
    """The shipped sweep: RHO-LOSS rows share one IL model (built by the first run, the others waiting on its
    tag); a row with il_budget_frac has its own per run, beside its folder, trained once (no doublings) and
    charged, so its runs wait on nothing."""
    cfg = ntng.AblateConfig(methods=('rho', 'rho_s0.1', 'rho_il_f0.1', 'rho_il_f0.25'), seeds=(0, 1), budgets=(120.0,))
    runs = {(r.args['label'], r.args['seed']): r for r in ntng.sweep_plan(cfg)}
    shared = {runs[k].exclusive for k in runs if k[0] in ('rho', 'rho_s0.1')}
    assert shared == {'out/ablation/il'} and runs[('rho_s0.1', 0)].args['select_frac'] == 0.1
    own = runs[('rho_il_f0.25', 1)]
    assert own.args['il_out_dir'] == own.exclusive == 'out/ablation/rho_il_f0.25/b120/s1_il'
    assert (own.args['il_doublings'], own.args['il_budget_frac'], own.args['charge_il']) == (0, 0.25, True)
    assert 'il_budget' not in own.args and len({runs[k].exclusive for k in runs if k[0].startswith('rho_il_f')}) == 4


def test_ablate_runs_the_sweep_once(tmp_path, monkeypatch, capsys):
    """`budget.py ablate` (its main, in this process; every run is a `python train.py` of its own) on a
    2-run tiny sweep; a second call finds both runs finished and only re-reads them."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)   # test_compare_command plots
    ntng.main(['ablate', f'--config={tmp_path}/sweep.py', f'--out_dir={tmp_path}/abl', '--quick=True',
                     "--methods=('baseline','stack')", '--jobs=2'])
    out = capsys.readouterr().out
    progress = [l for l in out.splitlines() if l.startswith('[')]
    assert [p[:5] for p in progress] == ['[1/2]', '[2/2]'], out         # two at once: either may end first
    ends = sorted(p.split('] ', 1)[1].split(', ')[0] for p in progress)  # 'baseline budget 6 seed 0: done: 6 steps'
    assert ends == ['baseline budget 6 seed 0: done: 6 steps', 'stack budget 6 seed 0: done: 6 steps'], out
    first = (tmp_path / 'abl' / 'ablation.md').read_text()
    assert first.strip() in out and '(n=1)' in row(first, 'baseline')[0] and '(n=1)' in row(first, 'stack')[0]
    layers = [json.loads(l).get('active_layers') for l in (tmp_path / 'abl/stack/b6/s0/log.jsonl').read_text().splitlines()]
    assert [d for d in layers if d is not None] == [1, 1, 1, 2, 2, 2]    # the method's own overrides reached it
    assert row(first, 'baseline', 1) == ['6'] and row(first, 'stack', 1) == ['6']
    assert 'missing' not in first

    def no_rerun(*args, **kwargs):
        raise AssertionError(f'ablate reran a finished run: {args[0]}')
    monkeypatch.setattr(plan.subprocess, 'Popen', no_rerun)  # runs.run_jobs starts the runs
    again = ntng.ablate(ntng.AblateConfig(config=f'{tmp_path}/sweep.py', out_dir=f'{tmp_path}/abl',
                                            quick=True, methods=('baseline', 'stack')))
    assert again + '\n' == first == (tmp_path / 'abl' / 'ablation.md').read_text()


def test_tune_grid_extends_at_an_edge_and_ablate_reads_the_result(tmp_path, monkeypatch):
    """A 5-point grid (x2 spacing) per method on a known loss landscape (final = log2(lr / optimum)^2; the
    runs themselves are test_ablate's): a best point at an edge adds the next point beyond it until the
    best is inside; Lion's weight decay keeps lr x wd at its configured product; ablate --tuned takes the
    chosen values and refuses a tuned file made for another sweep."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    optimum = {'baseline': 3e-3 * 4, 'lion': 3e-4 / 2}
    plans = []
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: plans.extend(plan))
    monkeypatch.setattr(ntng, 'tune_summary', lambda folder, seeds, lr, extra: {
        'lr': lr, 'extra': extra, 'final': math.log2(lr / optimum[folder.parent.name]) ** 2})
    monkeypatch.setattr(ntng, 'plot_tuning', lambda results, path: None)
    cfg = ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'),
                           methods=('baseline', 'lion'), points=5, seeds=(7, 8))
    results = ntng.tune(cfg)
    for label, lr0 in (('baseline', 3e-3), ('lion', 3e-4)):
        assert results[label]['lr'] == pytest.approx(optimum[label])
        tried = sorted(round(p['lr'] / lr0, 6) for p in results[label]['grid'])
        want = {'baseline': [0.25, 0.5, 1.0, 2.0, 4.0, 8.0], 'lion': [0.25, 0.5, 1.0, 2.0, 4.0]}[label]
        assert tried == want                                  # extended one point at a time, and no further
    runs = [a for a in (r.args for r in plans)]
    assert all(a['budget'] == 6.0 and a['seed'] in (7, 8) for a in runs)      # the smallest budget, tuning seeds
    for a in runs:
        if a['label'] == 'lion (tuning)':
            assert a['weight_decay'] * a['lr'] == pytest.approx(0.1 * 3e-4)  # lr x wd stays at the product
    assert results['lion']['weight_decay'] == pytest.approx(0.1 * 3e-4 / optimum['lion'])
    tuned = str(tmp_path / 'tune' / 'tuned.json')
    plan = ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=tuned, methods=('baseline', 'lion'), seeds=(0,)))
    assert {label: (a['lr'], a.get('weight_decay')) for label, a in ((r.args['label'], r.args) for r in plan) if a['budget'] == 6.0} == {
        'baseline': (optimum['baseline'], None), 'lion': (optimum['lion'], results['lion']['weight_decay'])}
    with pytest.raises(budget_lib.UserError, match='has no tuned values for stack: tune them too'):
        ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=tuned, methods=('baseline', 'stack')))
    with pytest.raises(budget_lib.UserError, match=r'was tuned on seed\(s\) \[7\], which this sweep reports'):
        ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=tuned, methods=('baseline', 'lion'), seeds=(0, 7)))
    record = json.loads(Path(tuned).read_text())
    lion_only = tmp_path / 'lion_only.json'
    lion_only.write_text(json.dumps(ntng.sealed({**record, 'tuned': {'lion': record['tuned']['lion']}})))  # as if tune wrote it
    with pytest.raises(budget_lib.UserError, match='has no tuned values for baseline'):  # the WSD row runs as the baseline
        ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=str(lion_only), methods=('lion',),
                                            baseline_schedule='wsd_branches'))
    for bad in (7, [[1]], ['7']):
        lion_only.write_text(json.dumps(ntng.sealed({**record, 'seeds': bad})))
        with pytest.raises(budget_lib.UserError, match=r'is not a tuned.json from `python -m studies.ntng tune`: seeds=.* is '
                                                       'not a list of integer seeds: tune again, or correct it and seal it'):
            ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=str(lion_only), methods=('lion',)))
    (tmp_path / 'sweep.py').write_text(SWEEP.replace('lr=3e-3)', 'lr=1e-3)'))
    with pytest.raises(budget_lib.UserError, match='was made for COMMON'):
        ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=tuned))


def test_a_best_point_still_at_an_edge_after_every_extension_is_flagged(tmp_path, monkeypatch, capsys):
    """The baseline's best lr lies 2^8 above its own, past what MAX_EXTENSIONS (3) lets a 5-point grid reach
    (2^5): tuned.json and the console say the best is still at the lr axis's edge; ablate still reads it."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: None)
    monkeypatch.setattr(ntng, 'tune_summary', lambda folder, seeds, lr, extra: {
        'lr': lr, 'extra': extra, 'final': math.log2(lr / (3e-3 * 2 ** 8)) ** 2})
    monkeypatch.setattr(ntng, 'plot_tuning', lambda results, path: None)
    cfg = ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'), methods=('baseline',))
    result = ntng.tune(cfg)['baseline']
    assert result['lr'] == pytest.approx(3e-3 * 2 ** 5) and result['at_edge'] == ['lr']
    assert 'still at an edge of its lr axis' in capsys.readouterr().out
    tuned = json.loads((tmp_path / 'tune' / 'tuned.json').read_text())['tuned']['baseline']
    assert tuned['at_edge'] == ['lr']
    plan = ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=str(tmp_path / 'tune' / 'tuned.json'),
                                               methods=('baseline',), seeds=(0,)))
    assert [a['lr'] for a in (r.args for r in plan)] == pytest.approx([3e-3 * 2 ** 5] * 2) and not any('at_edge' in a for a in (r.args for r in plan))


def test_a_diverged_tuning_run_is_a_result_not_a_failure(tmp_path, monkeypatch, capsys):
    """A tuning run whose loss goes non-finite (train.NonFiniteLoss logs {'nonfinite': true}) tells that its
    lr is too high: tune counts it as an infinite loss, says so, and does not run it again; in an ablation
    the same failure stops the sweep."""
    folder = tmp_path / 'lr0.1' / 's7'
    args = {'model': 'tiny', 'budget_unit': 'iters', 'budget': 6.0, 'seed': 7, 'lr': 0.1, 'out_dir': str(folder)}

    def diverging(jobs, n_parallel, cwd=None):  # what the run leaves: its config, a log ending in the non-finite loss
        folder.mkdir(parents=True, exist_ok=True)
        (folder / 'config.json').write_text(json.dumps({'config': args}))
        (folder / 'log.jsonl').write_text(json.dumps({'step': 1, 'train_loss': 9.0, 'iters': 1}) + '\n'
                                          + json.dumps({'step': 2, 'nonfinite': True, 'iters': 1}) + '\n')
        return [(job, 'loss is nan at step 2') for job in jobs]
    started = []
    monkeypatch.setattr(plan, 'run_jobs', lambda jobs, n, cwd=None: started.extend(jobs) or diverging(jobs, n))
    runs_ = [ntng.planned_run('baseline', 'train.py', args)]
    with pytest.raises(budget_lib.UserError, match=r'1 run\(s\) failed, first: baseline budget 6 seed 7'):
        plan.run_plan(runs_, 1)
    shutil.rmtree(folder)
    plan.run_plan(runs_, 1, diverged_ok=True)
    assert 'baseline budget 6 seed 7: diverged, counted as an infinite loss (loss is nan at step 2)' in capsys.readouterr().out
    plan.run_plan(runs_, 1, diverged_ok=True)
    assert len(started) == 2                                   # the third call found it diverged: not run again
    assert ntng.tune_summary(folder.parent, (7,), 0.1, {})['final'] == math.inf
    other = {**args, 'lr': 0.05}        # a plan with other keys in the same folder: the old divergence is not its result
    monkeypatch.setattr(plan, 'run_jobs', lambda jobs, n, cwd=None: started.extend(jobs) or [(j, 'no prepared data') for j in jobs])
    with pytest.raises(budget_lib.UserError, match='1 run\\(s\\) failed, first: baseline budget 6 seed 7: no prepared data'):
        plan.run_plan([ntng.planned_run('baseline', 'train.py', other)], 1, diverged_ok=True)


def test_a_tune_axis_extends_at_its_edge_like_lr(tmp_path, monkeypatch):
    """Sophia-G's rho axis (0.04, 0.08, 0.16) on a landscape whose best rho is 0.64 and best lr the
    configured one: rho grows by its own ratio (x2), one value a round, to 0.32, 0.64 and 1.28, where the
    best (0.64) is inside; the lr grid stays at its 5 points (its best is inside). A one-value text axis
    never extends."""
    (tmp_path / 'sweep.py').write_text(SWEEP.replace("'lion': ('train.py', dict(optimizer='lion', lr=3e-4)),",
                                                     "'sophiag': ('train.py', dict(optimizer='sophiag', lr=3e-4)),")
                                       + "TUNE = {'sophiag': {'rho': (0.16, 0.04, 0.08), 'schedule': ('cosine',)}}\n")
    plans = []
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: plans.extend(plan))
    monkeypatch.setattr(ntng, 'tune_summary', lambda folder, seeds, lr, extra: {
        'lr': lr, 'extra': extra, 'final': math.log2(lr / 3e-4) ** 2 + math.log2(extra['rho'] / 0.64) ** 2})
    monkeypatch.setattr(ntng, 'plot_tuning', lambda results, path: None)
    results = ntng.tune(ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'),
                                          methods=('sophiag',), points=5))
    assert results['sophiag']['lr'] == pytest.approx(3e-4) and results['sophiag']['rho'] == pytest.approx(0.64)
    grid = results['sophiag']['grid']
    assert sorted({round(p['extra']['rho'], 6) for p in grid}) == [0.04, 0.08, 0.16, 0.32, 0.64, 1.28]
    assert sorted({round(p['lr'] / 3e-4, 6) for p in grid}) == [0.25, 0.5, 1.0, 2.0, 4.0] and len(grid) == 30
    assert {p['extra']['schedule'] for p in grid} == {'cosine'}
    assert len({a['out_dir'] for a in (r.args for r in plans)}) == 30    # every point planned once (finished ones are skipped)


def test_an_axis_extends_only_to_values_its_script_accepts_and_a_failed_grid_not_at_all(tmp_path, monkeypatch):
    """hess_interval (int) grows 10 -> 20 -> 40 -> 80 and stays int; beta2 at 0.99 would go to 1.03, which
    train.py refuses ([0, 1)), so it stays; a grid whose every run failed (final inf) does not grow."""
    (tmp_path / 'sweep.py').write_text(SWEEP.replace("'lion': ('train.py', dict(optimizer='lion', lr=3e-4)),",
                                                     "'sophiag': ('train.py', dict(optimizer='sophiag', lr=3e-4)),")
                                       + "TUNE = {'sophiag': {'hess_interval': (5, 10), 'beta2': (0.95, 0.99)}}\n")
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: None)
    monkeypatch.setattr(ntng, 'plot_tuning', lambda results, path: None)
    landscape = {'final': lambda lr, extra: math.log2(lr / 3e-4) ** 2 - extra['hess_interval'] - extra['beta2']}
    monkeypatch.setattr(ntng, 'tune_summary', lambda folder, seeds, lr, extra: {
        'lr': lr, 'extra': extra, 'final': landscape['final'](lr, extra)})
    cfg = ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'), methods=('sophiag',), points=5)
    result = ntng.tune(cfg)['sophiag']
    assert result['hess_interval'] == 80 and isinstance(result['hess_interval'], int) and result['beta2'] == 0.99
    assert ntng.beyond_edge((0.5, 1), 1) == 2 and ntng.beyond_edge((False, True), True) is None  # numbers mix; bools never grow
    assert {p['extra']['beta2'] for p in result['grid']} == {0.95, 0.99}
    landscape['final'] = lambda lr, extra: math.inf
    assert sorted({p['extra']['hess_interval'] for p in ntng.tune(
        ntng.TuneConfig(config=cfg.config, out_dir=str(tmp_path / 'tune2'), methods=('sophiag',), points=5))['sophiag']['grid']}) == [5, 10]


def test_the_tuning_plot_names_text_axis_values(tmp_path, capsys):
    grid = [{'lr': lr, 'extra': {'schedule': 'wsd'}, 'final': 3.0 - lr} for lr in (1e-3, 2e-3)]
    path = ntng.plot_tuning({'baseline': {'grid': grid}}, tmp_path / 'tune.png')
    if HAVE_MPL:
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    else:
        assert path is None and capsys.readouterr().out.startswith(NO_MPL)


def test_a_row_tuned_as_another_is_not_tuned_and_runs_with_its_values(tmp_path, monkeypatch):
    """RHO-LOSS 'IL charged' is RHO-LOSS with its IL model's cost in the budget: the same lr, so tune skips
    it and ablate gives it the tuned values of the row TUNED_AS names (and its own charge_il); both rows
    use the IL model trained while tuning."""
    sweep_text = SWEEP.replace("    'lion':", "    'rho': ('rho.py', dict(method='rho', select_frac=0.5)),\n"
                                               "    'rho_il_charged': ('rho.py', dict(method='rho', select_frac=0.5, charge_il=True)),\n    'lion':")
    (tmp_path / 'sweep.py').write_text(sweep_text + "TUNED_AS = {'rho_il_charged': 'rho'}\n")
    plans = []
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: plans.extend(plan))
    monkeypatch.setattr(ntng, 'tune_summary', lambda folder, seeds, lr, extra: {
        'lr': lr, 'extra': extra, 'final': math.log2(lr / 3e-3) ** 2})
    monkeypatch.setattr(ntng, 'plot_tuning', lambda results, path: None)
    cfg = ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'),
                           methods=('rho', 'rho_il_charged'), points=5, seeds=(7,))
    assert set(ntng.tune(cfg)) == {'rho'} and {a['label'] for a in (r.args for r in plans)} == {'rho (tuning)'}
    plan = ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=str(tmp_path / 'tune' / 'tuned.json'),
                                               methods=('rho', 'rho_il_charged'), seeds=(0,)))
    rows = {a['label']: a for a in (r.args for r in plan) if a['budget'] == 6.0}
    assert rows['rho_il_charged']['lr'] == rows['rho']['lr'] == pytest.approx(3e-3)
    assert rows['rho_il_charged']['charge_il'] and 'charge_il' not in rows['rho']
    assert rows['rho_il_charged']['il_out_dir'] == rows['rho']['il_out_dir']  # one IL model for both rows
    assert rows['rho']['il_out_dir'] == str(tmp_path / 'tune' / 'il')  # the one tuning trained serves the sweep
    other = ntng.sweep_plan(ntng.AblateConfig(config=cfg.config, tuned=str(tmp_path / 'tune' / 'tuned.json'),
                                                methods=('rho',), seeds=(0,), budgets=(6.0, 24.0), out_dir='abl'))
    assert {a['il_out_dir'] for a in (r.args for r in other)} == {'abl/il'}  # ... but not a sweep with another largest budget
    (tmp_path / 'sweep.py').write_text(sweep_text + "TUNED_AS = {'rho_il_charged': 'rhoo'}\n")
    with pytest.raises(ConfigError, match="TUNED_AS {'rho_il_charged': 'rhoo'} names rows that METHODS does not have"):
        ntng.sweep_plan(ntng.AblateConfig(config=cfg.config))


def test_a_finished_run_is_reused_only_by_a_plan_with_its_keys(tmp_path, monkeypatch, capsys):
    """run_plan skips a finished run only if its config.json records the plan's keys: a run left by an
    older plan (another budget) in the same folder is run again, not read as this plan's."""
    folder = tmp_path / 'baseline' / 'b6' / 's0'
    folder.mkdir(parents=True)
    args = {'model': 'tiny', 'budget_unit': 'iters', 'budget': 3.0, 'seed': 0, 'out_dir': str(folder)}
    (folder / 'config.json').write_text(json.dumps({'config': args}))
    (folder / 'log.jsonl').write_text(json.dumps({'step': 3, 'iters': 3.0, 'tokens': 1536.0, 'val_loss': 4.0}) + '\n')
    started = []
    monkeypatch.setattr(plan, 'run_jobs', lambda jobs, n, cwd=None: started.extend(jobs) or [])
    plan.run_plan([ntng.planned_run('baseline', 'train.py', args)], jobs=1)
    assert started == []                                        # finished, with these keys: skipped
    capsys.readouterr()
    plan.run_plan([ntng.planned_run('baseline', 'train.py', {**args, 'budget': 6.0})], jobs=1)
    assert len(started) == 1 and '--overwrite=True' in started[0].argv and '--budget=6.0' in started[0].argv
    assert 'replacing a run of other keys (budget was 3.0, now 6.0)' in capsys.readouterr().out  # and says why


def test_jobs_sharing_a_tag_wait_for_the_first_to_succeed(tmp_path):
    """run_jobs: jobs with one exclusive tag (RHO-LOSS runs that share an IL model) wait while the first of
    them runs, even with free slots; once it has succeeded the rest run side by side, and untagged jobs fill
    the free slots meanwhile."""
    import sys

    def job(name, tag):
        code = 'import time; print(time.time()); time.sleep(1.5); print(time.time())'  # > a loaded start-up
        return plan.Job(name, [sys.executable, '-c', code], tmp_path / f'{name}.out', tag)

    jobs = [job('il1', 'il'), job('il2', 'il'), job('il3', 'il'), job('free', '')]
    assert plan.run_jobs(jobs, n_parallel=3) == []
    span = {j.label: [float(x) for x in j.log.read_text().split()] for j in jobs}
    assert span['il1'][1] <= min(span['il2'][0], span['il3'][0])     # the builder ran alone among its tag
    assert span['free'][0] < span['il1'][1]                           # an untagged job used a free slot
    assert span['il2'][0] < span['il3'][1] and span['il3'][0] < span['il2'][1]  # then the rest overlapped


@pytest.mark.parametrize('change, says', [
    (("METHODS = {", "METHODS = {'x': 'train.py', "), 'METHODS must be'),
    (("BUDGETS = (6.0, 12.0)", "BUDGETS = ()"), 'BUDGETS must be'),
    (("BUDGETS = (6.0, 12.0)", "BUDGETS = (6.0, 'a')"), 'BUDGETS must be'),
    (("COMMON = dict(", "TUNED_AS = ['a']\nCOMMON = dict("), 'TUNED_AS must be'),
    (("QUICK_BUDGETS = (6.0,)", "QUICK_BUDGETS = 5"), 'QUICK_BUDGETS must be'),
    (("COMMON = dict(", "TUNE = {'lion': {'beta2': (0.99, 'a')}}\nCOMMON = dict("), 'distinct values of one type'),
    (("COMMON = dict(", "TUNE = {'lion': {'beta2': (0.9, True)}}\nCOMMON = dict("), 'distinct values of one type'),
    (("COMMON = dict(", "TUNE = {'lion': {'beta2': (0.99, 0.99)}}\nCOMMON = dict("), 'distinct values of one type'),
    (("COMMON = dict(", "TUNE = {'lion': {'lr': (1e-3, 2e-3)}}\nCOMMON = dict("), 'tune varies lr itself'),
    (("COMMON = dict(", "TUNE = {'lion': {'label': ('a/b', 'c')}}\nCOMMON = dict("), 'no path separators'),
    (("COMMON = dict(", "TUNE = {'lion': {'weight_decay': (0.1, 0.2)}}\nCOMMON = dict("), 'Lion.s follows its lr'),
    (("COMMON = dict(", "TUNE = {'lino': {'beta2': (0.9, 0.99)}}\nCOMMON = dict("), 'TUNE names lino'),
    (("METHODS = {", "METHODS = {'../../escaped': ('train.py', {}), "), "METHODS row '../../escaped' names a run folder"),
    (("METHODS = {", "METHODS = {'a/b': ('train.py', {}), "), "METHODS row 'a/b' names a run folder")])
def test_a_sweep_file_of_the_wrong_shape_is_refused_with_one_line(tmp_path, change, says):
    (tmp_path / 'sweep.py').write_text(SWEEP.replace(*change))
    with pytest.raises(ConfigError, match=says):
        ntng.sweep_plan(ntng.AblateConfig(config=str(tmp_path / 'sweep.py')))


def test_tune_refuses_a_tuned_file_it_would_overwrite_before_any_run(tmp_path, monkeypatch):
    """An unreadable tuned.json, or one of another sweep (here: other seeds), in tune's folder is refused
    before hours of runs, not overwritten after them; no methods to tune is refused too."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: pytest.fail('ran before refusing'))
    cfg = ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'), methods=('baseline',))
    (tmp_path / 'tune').mkdir()
    for text, says in (('{"trunc', 'is not a tuned.json'), ('[1, 2]', 'is not a tuned.json')):
        (tmp_path / 'tune' / 'tuned.json').write_text(text)
        with pytest.raises(budget_lib.UserError, match=says):
            ntng.tune(cfg)
    spec = ntng.read_sweep(cfg.config)
    other = {'config': cfg.config, 'common': repr(spec['COMMON']), 'methods': {k: repr(v) for k, v in spec['METHODS'].items()},
             'budget': 6.0, 'seeds': [7], 'tuned': {'baseline': {'lr': 1e-3}}}
    other = ntng.sealed(other)  # as tune writes it
    (tmp_path / 'tune' / 'tuned.json').write_text(json.dumps(other))
    with pytest.raises(ConfigError, match='holds a tuning of another sweep .its seeds differ'):
        ntng.tune(cfg)
    assert json.loads((tmp_path / 'tune' / 'tuned.json').read_text()) == other
    with pytest.raises(ConfigError, match='--methods is empty'):
        ntng.tune(ntng.TuneConfig(config=cfg.config, out_dir=str(tmp_path / 'tune2'), methods=()))


def test_compare_names_a_missing_baseline_and_refuses_an_empty_out(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    runs = [finished(tmp_path, f'r{seed}', 'stack', 10.0, seed, 3.0) for seed in (0, 1)]
    report = compare.compare(runs, out=str(tmp_path / 'x'), target='none', baseline='nosuch')
    assert "no run is labelled 'nosuch', so no differences are shown: --baseline= one of stack" in report
    for out in ('', str(tmp_path) + '/'):
        with pytest.raises(ConfigError, match='names no file'):
            compare.compare(runs, out=out, target='none')


@pytest.mark.parametrize('edit', ['budget', 'seed', 'no tokens', 'no step', 'val_loss text'])
def test_a_run_folder_edited_out_of_shape_is_listed_not_a_traceback(tmp_path, monkeypatch, edit):
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    good = finished(tmp_path, 'good', 'baseline', 10.0, 0, 3.0)
    bad = finished(tmp_path, 'bad', 'baseline', 10.0, 1, 3.0)
    config = json.loads((bad / 'config.json').read_text())
    if edit in ('budget', 'seed'):
        config['config'][edit] = 'x' if edit == 'budget' else [1]
        (bad / 'config.json').write_text(json.dumps(config))
    else:
        record = {'step': 1, 'val_loss': 2.0, 'tokens': 10.0}
        record.pop({'no tokens': 'tokens', 'no step': 'step'}.get(edit, 'x'), None)
        record['val_loss'] = 'abc' if edit == 'val_loss text' else 2.0
        with open(bad / 'log.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')
    report = compare.compare([good, bad], out=str(tmp_path / 'x'), target='none')
    assert f'- {bad}: unreadable' in report


def test_a_loss_is_placed_between_the_floors_it_has_and_has_not_reached():
    floors = {'unigram': 3.0, 'bigram': 2.4, 'trigram': 1.8, '4-gram': 1.4, '5-gram': 1.3}
    assert compare.between(1.5, floors) == 'between the trigram and 4-gram floors'
    assert compare.between(3.5, floors) == 'above the unigram floor'
    assert compare.between(1.2, floors) == 'below the 5-gram floor'
    assert compare.between(1.8, floors) == 'between the trigram and 4-gram floors'   # at a floor: reached it


def test_a_signal_to_the_runner_stops_its_jobs_and_leaves_nothing_running(tmp_path):
    """SIGTERM to a command running a plan (ablate, tune, a study): each running job gets one SIGTERM (it
    saves and exits 143), the runner waits for them and exits 143 itself; no job is left running."""
    import signal
    import subprocess
    import sys
    import time
    child = (f"import os, signal, sys, time; open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); "
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); time.sleep(120)")
    code = (f"import dataclasses, sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from configurator import cli\nfrom studies.plan import Job, run_jobs\n"
            "@dataclasses.dataclass(frozen=True)\nclass C:\n    pass\n"
            f"cli(lambda c: run_jobs([Job('sleeper', [sys.executable, '-c', {child!r}], "
            f"__import__('pathlib').Path({str(tmp_path / 'sleeper.out')!r}))], 1), C, [])\n")
    runner = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / 'pid').exists() or not (tmp_path / 'pid').read_text():
        assert time.time() < deadline and runner.poll() is None, runner.communicate()
        time.sleep(0.1)
    runner.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == 143, (out, err)
    assert 'stopping sleeper' in out and len(err.strip().splitlines()) == 1, (out, err)
    pid = int((tmp_path / 'pid').read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_verdicts_read_the_intervals_four_ways(tmp_path):
    """better / worse need the 95% CI off zero and Holm p < 0.05; equivalent needs the 90% CI inside the
    declared margin (TOST); anything else is not resolved; a one-pair cell is never more than not resolved."""
    assert compare.verdict(-0.10, 0.02, 0.015, 0.01, 0.02) == 'better'
    assert compare.verdict(+0.10, 0.02, 0.015, 0.01, 0.02) == 'worse'
    assert compare.verdict(-0.10, 0.02, 0.015, 0.20, 0.02) == 'not resolved'          # Holm p too large
    assert compare.verdict(0.003, 0.015, 0.012, 0.70, 0.02) == 'equivalent within ±0.02'
    assert compare.verdict(0.010, 0.015, 0.012, 0.70, 0.02) == 'not resolved'          # 90% CI reaches +0.022
    assert compare.verdict(0.0, math.nan, math.nan, math.nan, 0.02) == 'not resolved (one pair)'
    rows = {'baseline': [2.00, 2.01, 2.02, 2.03, 2.04], 'same': [2.001, 2.009, 2.021, 2.031, 2.039]}
    dirs = [finished(tmp_path, f'{m}{s}', m, 10.0, s, v) for m, vs in rows.items() for s, v in enumerate(vs)]
    report = compare.compare(dirs, out=str(tmp_path / 'x'), target='none', margin=0.02)
    verdicts = [l for l in report.splitlines() if l.startswith('| same |')]
    assert verdicts[-1].split('|')[2].strip().startswith('equivalent within ±0.02 (90% CI [')


def test_a_cell_missing_some_of_the_baselines_seeds_is_pending_not_read(tmp_path):
    """The design runs every seed in every row: a row with 3 of the baseline's 5 finished has its Δ printed (n=3)
    but no verdict until the last two are in, however clear the 3 pairs are; so has a row whose baseline lags."""
    rows = {'baseline': [2.00, 2.01, 2.02, 2.03, 2.04], 'worse': [2.50, 2.52, 2.51]}
    dirs = [finished(tmp_path, f'{m}{s}', m, 10.0, s, v) for m, vs in rows.items() for s, v in enumerate(vs)]
    report = compare.compare(dirs, out=str(tmp_path / 'x'), target='none', margin=0.02)
    row = [l for l in report.splitlines() if l.startswith('| worse |')]
    assert '(n=3) Δ +0.5' in row[0] and row[-1].split('|')[2].strip() == 'pending (3 of 5 paired seeds)'
    assert row[0].endswith(' pending (3 of 5 paired seeds) |') and '*' not in row[0]  # its p is tiny, but not starred
    dirs += [finished(tmp_path, f'worse{s}', 'worse', 10.0, s, v) for s, v in ((3, 2.53), (4, 2.54))]
    report = compare.compare(dirs, out=str(tmp_path / 'y'), target='none', margin=0.02)
    assert [l for l in report.splitlines() if l.startswith('| worse |')][0].endswith('* |')
    assert [l for l in report.splitlines() if l.startswith('| worse |')][-1].split('|')[2].strip().startswith('worse (90% CI')
    lagging = [d for d in dirs if d.name not in ('baseline3', 'baseline4')]  # now the baseline has 3 of the row's 5
    report = compare.compare(lagging, out=str(tmp_path / 'z'), target='none', margin=0.02)
    assert [l for l in report.splitlines() if l.startswith('| worse |')][-1].split('|')[2].strip() == 'pending (3 of 5 paired seeds)'
    first3 = [d for d in dirs if d.name[-1] in '012']  # every row has 3, the design runs 5: not read yet
    report, _, _ = compare.compare_report([str(d) for d in first3], target='none', margin=0.02, seeds=5)
    assert [l for l in report.splitlines() if l.startswith('| worse |')][-1].split('|')[2].strip() == 'pending (3 of 5 paired seeds)'


def test_runs_of_another_script_corpus_or_shape_are_never_in_a_row(tmp_path):
    """A MADPO stage or an SLM arm in the folder read is not a 'baseline'; a run on another corpus is not
    averaged into the baseline's cell; a stray shape is not averaged into its row; each is named, and a
    folder with nothing comparable is one error."""
    def edit(path, argv=None, **config):
        saved = json.loads((path / 'config.json').read_text())
        saved['config'].update(config)
        if argv is not None:
            saved['argv'] = argv
        (path / 'config.json').write_text(json.dumps(saved))
        return path
    dirs = [finished(tmp_path, f'b{s}', 'baseline', 10.0, s, 2.0 + s / 100) for s in range(3)]
    dirs.append(edit(finished(tmp_path, 'sft', '', 10.0, 3, 1.0), argv=['madpo.py', '--stage=sft']))
    dirs.append(edit(finished(tmp_path, 'other', 'baseline', 10.0, 4, 0.5), dataset='text/book'))
    dirs.append(edit(finished(tmp_path, 'wide', 'baseline', 10.0, 5, 0.7), n_embd=512))
    dirs = [edit(d, argv=['train.py']) if d.name.startswith('b') else d for d in dirs]
    report = compare.compare([str(d) for d in dirs], out=str(tmp_path / 'x'), target='none')
    assert '| baseline | 2.0100 ± 0.0100 (n=3) |' in report
    assert 'sft: a run of madpo.py, whose study has its own table' in report and 'other: another corpus (text/book/None)' in report
    assert "wide: another model shape or batch than the rest of its row (baseline)" in report
    with pytest.raises(budget_lib.UserError, match='nothing comparable among the 1 run'):
        compare.compare([str(tmp_path / 'sft')], out=str(tmp_path / 'y'), target='none')


# -----------------------------------------------------------------------------
# compare reads only what it can compare

def edit_config(path, **changes):
    """Change (or, with value REMOVE, delete) keys of a run's config.json."""
    info = json.loads((path / 'config.json').read_text())
    info['config'].update(changes)
    info['config'] = {k: v for k, v in info['config'].items() if v is not REMOVE}
    (path / 'config.json').write_text(json.dumps(info))
    return path


REMOVE = object()


def edit_log(path, edit):
    records = [json.loads(line) for line in (path / 'log.jsonl').read_text().splitlines()]
    (path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in edit(records)))
    return path


@pytest.mark.parametrize('damage, says', [
    (lambda p: edit_log(p, lambda rs: rs + [[1, 2, 3]]), 'log.jsonl line 9: a list ([1, 2, 3]), not a record'),
    (lambda p: edit_log(p, lambda rs: rs[:-1] + [{**rs[-1], 'val_loss': '2.0'}]), "line 8: val_loss='2.0' is not a finite number"),
    (lambda p: edit_log(p, lambda rs: rs[:-1] + [{**rs[-1], 'val_loss': True}]), 'line 8: val_loss=True is not a finite number'),
    (lambda p: edit_log(p, lambda rs: rs[:-1] + [{**rs[-1], 'val_loss': math.nan}]), 'line 8: val_loss=nan is not a finite number'),
    (lambda p: edit_log(p, lambda rs: rs[:-1] + [{**rs[-1], 'rst': '10'}]), "line 8: rst='10' is not a finite number"),
    (lambda p: edit_log(p, lambda rs: rs[:-1] + [{**rs[-1], 'rst_by_entry': [1]}]), 'rst_by_entry=[1] is not a table'),
    (lambda p: edit_config(p, label=7), 'config.json: label=7 is not text'),
    (lambda p: edit_config(p, budget_unit=REMOVE), 'config.json has no budget_unit (one of rst, tokens, iters, flops, wall)'),
    (lambda p: edit_config(p, budget_unit='parsecs'), "budget_unit='parsecs' is not one of rst"),
    (lambda p: edit_config(p, budget=-1.0), 'budget=-1.0 is not a positive number'),
    (lambda p: edit_config(p, budget=True), 'budget=True is not a positive number'),
    (lambda p: edit_config(p, seed=True), 'seed=True is not an integer'),
    (lambda p: edit_config(p, dataset=['a']), "dataset=['a'] is not text"),
    (lambda p: edit_config(p, n_embd=[128]), 'n_embd=[128] is not a single value'),
])
def test_every_field_compare_reads_is_type_checked_and_a_bad_one_named_in_one_line(tmp_path, monkeypatch, damage, says):
    """A run folder damaged or edited out of shape is listed on one line naming the file, the field and what it
    must be; it never reaches a row (True is not a loss of 1, nor a budget of 1), and nothing raises."""
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    good = [finished(tmp_path, f'g{s}', 'baseline', 10.0, s, 3.0 + s / 100) for s in range(2)]
    bad = damage(finished(tmp_path, 'bad', 'baseline', 10.0, 5, 2.0))
    report = compare.compare([str(p) for p in good + [bad]], out=str(tmp_path / 'x'), target='auto')
    listed = [line for line in report.splitlines() if line.startswith(f'- {bad}: ')]
    assert len(listed) == 1 and listed[0].startswith(f'- {bad}: unreadable (') and says in listed[0], listed
    assert row(report, 'baseline') == ['3.0050 ± 0.0071 (n=2)']


def test_an_uncounted_rst_is_readable_where_the_budget_is_in_another_unit(tmp_path, monkeypatch):
    """A run priced by no cost table logs rst=None (RST not counted): read where its budget is in iters, and
    refused where RST is the budget's own unit."""
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    runs = [finished(tmp_path, f'g{s}', 'baseline', 10.0, s, 3.0 + s / 100) for s in range(2)]
    for run in runs:
        edit_config(run, budget_unit='iters')
        edit_log(run, lambda rs: [{**r, 'iters': r.get('rst'), 'rst': None} if 'rst' in r else r for r in rs])
    report = compare.compare([str(p) for p in runs], out=str(tmp_path / 'x'), target='none')
    assert row(report, 'baseline') == ['3.0050 ± 0.0071 (n=2)'] and 'unreadable' not in report
    assert compare.record_problem({'step': 1, 'rst': None}, 'rst') == 'rst=None is not a finite number'


def test_another_tokenizer_or_model_type_is_never_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'plot_runs', lambda *args: None)
    dirs = [edit_config(finished(tmp_path, f'b{s}', 'baseline', 10.0, s, 2.0 + s / 100), tokenizer='byte') for s in range(3)]
    dirs.append(edit_config(finished(tmp_path, 'bpe', 'baseline', 10.0, 3, 0.5), tokenizer='gpt2'))
    dirs.append(edit_config(finished(tmp_path, 't5', 'baseline', 10.0, 4, 0.7), tokenizer='byte', model_type='t5'))
    report = compare.compare([str(d) for d in dirs], out=str(tmp_path / 'x'), target='none')
    assert row(report, 'baseline') == ['2.0100 ± 0.0100 (n=3)']
    assert 'bpe: another corpus (None/gpt2) than the table\'s' in report
    assert 't5: another model shape or batch than the rest of its row (baseline)' in report


@pytest.mark.parametrize('kind, says', [
    ('empty', 'no readable runs among the 1 folder(s)'),
    ('damaged', "config.json: label=7 is not text"),
    ('other study', 'nothing comparable among the 1 run(s) given: they are runs of madpo.py'),
    ('partial', 'nothing to compare yet: none of the 2 run(s) given has spent its budget'),
])
def test_a_folder_with_nothing_comparable_is_one_line_and_exit_2(tmp_path, capsys, kind, says):
    folder = tmp_path / 'sweep'
    folder.mkdir()
    if kind == 'damaged':
        edit_config(finished(folder, 'r', 'baseline', 10.0, 0, 2.0), label=7)
    elif kind == 'other study':
        info_path = finished(folder, 'sft', '', 10.0, 0, 1.0) / 'config.json'
        info_path.write_text(json.dumps({**json.loads(info_path.read_text()), 'argv': ['madpo.py', '--stage=sft']}))
    elif kind == 'partial':
        for s in range(2):
            write_run(folder, f'r{s}', 'baseline', 10.0, s, [(2.0, 2000, 3.0)])
    with pytest.raises(SystemExit) as e:
        ntng.main(['compare', str(folder), f'--out={tmp_path}/x'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / 'x.md').exists()


def test_a_damaged_record_is_never_read_as_a_shorter_run(tmp_path):
    """A log cut inside its last line (the final eval) once let an earlier eval pass for the final with the run
    still 'complete' (a later progress line had reached the budget). Now: the run reads as partial and is named
    in the note; a damaged line before the last, or a negative val loss, names its line; and for committed records
    (whole=True, what RESULTS.md reads) any of them stops the report instead of changing a mean."""
    for s in range(3):
        finished(tmp_path, f'base{s}', 'baseline', 8.0, s, 2.0 + s / 100)
    cut = finished(tmp_path, 'cut', 'stack', 8.0, 0, 1.5)
    (cut / 'log.jsonl').write_bytes((cut / 'log.jsonl').read_bytes()[:-10])
    run = runs.read_run(cut)
    assert not run['complete'] and run['final'] != 1.5
    report, _, _ = compare.compare_report([str(tmp_path)])
    assert f'- {cut}: budget not spent' in report
    from configurator import UserError
    with pytest.raises(UserError, match=f'{cut}: budget not spent .*a record holds finished runs only'):
        compare.compare_report([str(tmp_path)], whole=True)
    middle = finished(tmp_path / 'more', 'mid', 'stack', 8.0, 1, 1.6)
    lines = (middle / 'log.jsonl').read_text().splitlines()
    (middle / 'log.jsonl').write_text('\n'.join(lines[:1] + [lines[1][:-5]] + lines[2:]) + '\n')
    assert compare.field_problem(middle) == 'log.jsonl line 2 is not a JSON record (the log is damaged)'
    negative = finished(tmp_path / 'more', 'neg', 'stack', 8.0, 2, -5.0)
    assert compare.field_problem(negative) == 'log.jsonl line 2: val_loss=-4.25 is negative (a cross-entropy never is)'


# -----------------------------------------------------------------------------
# one configuration per row

def test_a_row_mixing_two_configurations_is_refused_naming_the_row_the_key_and_both_values(tmp_path, capsys):
    """Seeds 0-1 of a row at one lr and seed 2 at another (a sweep rerun with --tuned into the same folder) would be
    one mean of two configurations: refused in one line, exit 2, nothing written. What differs between seeds by
    design (the seed, the run's folder and its own IL model's beside it, how it was started, where it ran) is not
    a difference."""
    sweep = tmp_path / 'ablation'
    for label, finals in (('baseline', (3.0, 3.1, 3.2)), ('lion', (3.3, 3.4, 3.5))):
        for seed, final in enumerate(finals):
            run = finished(sweep / label / 'b4', f's{seed}', label, 4.0, seed, final)
            edit_config(run, out_dir=str(run), lr=1e-3, il_out_dir=f'{run}_il', init_from=['scratch', 'resume'][seed % 2],
                        overwrite=seed == 0, compile=seed == 1, batch_size=8)
    report, runs, _ = compare.compare_report([str(sweep)], target='none')   # per-run keys only: one table
    assert '(n=3)' in row(report, 'baseline')[0] and '(n=3)' in row(report, 'lion')[0]
    edit_config(sweep / 'baseline' / 'b4' / 's2', lr=2e-3)
    with pytest.raises(SystemExit) as e:
        ntng.main(['compare', str(sweep), f'--out={tmp_path}/x'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        f"error: {sweep}/baseline/b4/s0 and {sweep}/baseline/b4/s2 are both baseline at budget 4 but were run with other "
        '--lr (0.001, 0.002): a row averages one configuration: give a sweep of other keys another --out_dir, or remove '
        'the stale runs']
    assert not (tmp_path / 'x.md').exists()
    edit_config(sweep / 'baseline' / 'b4' / 's2', lr=1e-3, il_out_dir=str(tmp_path / 'another_il'))  # not its own IL model
    with pytest.raises(budget_lib.UserError, match=r"other --il_out_dir \('<run>_il', '/"):
        compare.compare_report([str(sweep)], target='none')
    edit_config(sweep / 'baseline' / 'b4' / 's2', il_out_dir=f"{sweep / 'baseline' / 'b4' / 's2'}_il", dropout=REMOVE)
    edit_config(sweep / 'lion' / 'b4' / 's1', dropout=0.1)  # a key one run records and another does not
    with pytest.raises(budget_lib.UserError, match=r'are both lion at budget 4 but were run with other --dropout \(.\(absent\).'):
        compare.compare_report([str(sweep)], target='none')


def planned_configs(cfg):
    """{(label, budget, seed): the config.json each planned run of an ablation would write} (its planned keys)."""
    return {(r.args['label'], r.args['budget'], r.args['seed']): json.loads(json.dumps(r.args)) for r in ntng.sweep_plan(cfg)}


def test_ablate_refuses_a_rerun_with_other_keys_into_a_folder_before_any_run(tmp_path, monkeypatch, capsys):
    """Seeds 0-1 run, then seed 2 with another lr into the same --out_dir: compare would read all three as one row,
    so ablate refuses before it trains anything; the same keys are welcome (the sweep grows by a seed)."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    out = tmp_path / 'abl'
    first = ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(out), methods=('baseline',), seeds=(0, 1),
                              budgets=(6.0,))
    for (label, b, seed), config in planned_configs(first).items():
        edit_config(finished(out / label / 'b6', f's{seed}', label, b, seed, 3.0 + seed), **config)
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: pytest.fail('ran before refusing'))
    (tmp_path / 'sweep.py').write_text(SWEEP.replace('lr=3e-3)', 'lr=1e-3)'))
    with pytest.raises(SystemExit) as e:
        ntng.main(['ablate', str(tmp_path / 'sweep.py'), f'--out_dir={out}', "--methods=('baseline',)", '--seeds=(2,)',
                   '--budgets=(6.0,)'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and 'are both baseline at budget 6 but were run with other --lr ' in err[0], err
    assert '(0.001, 0.003)' in err[0] or '(0.003, 0.001)' in err[0]
    assert not (out / 'baseline' / 'b6' / 's2').exists() and not (out / 'ablation.md').exists()
    (tmp_path / 'sweep.py').write_text(SWEEP)
    ran = []
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: ran.extend(plan))
    monkeypatch.setattr(ntng, 'compare', lambda *args, **kw: 'table')
    ntng.ablate(ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(out), methods=('baseline',), seeds=(2,),
                                  budgets=(6.0,)))
    assert [r.args['seed'] for r in ran] == [2]


def test_ablate_into_a_folder_holding_a_tuning_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """A tuning's grid points share a label and seed: compare would refuse the table after every run; ablate
    refuses before the first."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    for lr in (3e-3, 6e-3):
        finished(tmp_path / 'tune' / 'baseline' / f'lr{lr:.3g}', 's1000', 'baseline (tuning)', 6.0, 1000, 3.0)
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: pytest.fail('ran before refusing'))
    with pytest.raises(SystemExit) as e:
        ntng.main(['ablate', str(tmp_path / 'sweep.py'), f'--out_dir={tmp_path}/tune', '--quick=True'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and 'are both baseline (tuning) at budget 6 seed 1000' in err[0], err
    assert not (tmp_path / 'tune' / 'ablation.md').exists()


def test_the_compare_module_is_no_command_and_says_so_in_one_line_exit_2():
    out = run_script('-m', 'studies.compare')
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        'error: studies.compare has no command of its own: `python -m studies.ntng compare RUN_FOLDERS...` prints its table']
