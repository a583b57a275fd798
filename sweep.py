"""No Train No Gain's comparison protocol: equal-effort tuning, paired-seed ablation, the comparison table.

No Train No Gain (Kaddour et al., NeurIPS 2023, arXiv 2307.06440) asks whether an efficient-training
method beats a fully decayed baseline at the same compute budget (budget.py counts it). The idea:
tune every method, the baseline included, over the same lr grid on seeds never reported (equal effort);
run every method at every budget on the same paired seeds (a seed fixes initialisation and data order);
table each method's paired difference to the baseline: t-based 95% CI, Holm-adjusted p, n-gram floors.

    python budget.py tune --jobs=2                                  # -> out/tune/tuned.json, tune.png
    python budget.py ablate --tuned=out/tune/tuned.json --jobs=2    # methods x budgets x seeds, then compare
    python budget.py compare out/ablation --out=ablation            # -> ablation.md, ablation.png
"""
import collections
import dataclasses
import importlib
import itertools
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budget import mean_std, pyplot
from configurator import ConfigError, UserError, check_distinct, key, read_config_file, require, require_writable
from data.loader import DataError, atomic_write_bytes, data_dir
from data.ngram import ngram_floors
from runs import IL_LABEL, METHOD_STATS, Job, read_run, records_config, run_diverged, run_finished, run_jobs


# -----------------------------------------------------------------------------
# statistics: t-based CIs, paired tests, Holm, crossings

def _betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side; use the symmetry otherwise
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        num = 1.0 if i == 0 else (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if i % 2 == 0
                                  else -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)))
        d = 1 / (d if abs(d := 1 + num * d) > 1e-300 else 1e-300)
        c = c if abs(c := 1 + num / c) > 1e-300 else 1e-300
        f *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return front * (f - 1)


def t_p_value(t, df):
    """Two-sided p-value of Student's t statistic t with df degrees of freedom."""
    return 1.0 if t == 0 else _betainc(df / 2, 0.5, df / (df + t * t))


def t95(df):
    """The two-sided 95% quantile of Student's t with df degrees of freedom (bisection on t_p_value)."""
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_p_value(mid, df) > 0.05 else (lo, mid)
    return (lo + hi) / 2


def t_interval(xs):
    """(mean, half-width of the t-based 95% CI); the half-width is nan for fewer than 2 values. The one
    significance rule of the lab: compare, slm.py and madpo.py tables all use it."""
    m, sd = mean_std(xs)
    return m, (t95(len(xs) - 1) * sd / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


def paired_test(a, b):
    """Paired seeds: (mean of a_i - b_i, half-width of its t-based 95% CI, two-sided p of the paired t-test).
    Half-width and p are nan for fewer than two pairs; p is 0 when every difference is the same nonzero value."""
    d = [x - y for x, y in zip(a, b)]
    m, half = t_interval(d)
    if len(d) < 2:
        return m, math.nan, math.nan
    se = statistics.stdev(d) / math.sqrt(len(d))
    return m, half, (t_p_value(m / se, len(d) - 1) if se > 0 else float(m == 0))


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (nan ones are left out of the family and stay nan)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def crossing(points, target):
    """First x at which y <= target along [(x, y)], linearly interpolated; None when never reached."""
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (y0 - target) / (y0 - y) * (x - x0)
    return None


# -----------------------------------------------------------------------------
# comparing runs: the method x budget table, time to target, the plot

def group_runs(runs):
    groups = {}
    for r in runs:
        groups.setdefault(r['label'], {}).setdefault(r['budget'], []).append(r)
    return groups


def finals_by_seed(runs):
    return {r['seed']: r['final'] for r in runs if r['complete']}


def paired_cells(groups, baseline):
    """{(label, budget): (delta, half-width, p, pairs)} of every method against the baseline at each budget,
    over the seeds both completed (a seed fixes initialisation and data order for every method), with
    Holm-adjusted p-values across the whole table."""
    cells = {}
    for label, by_budget in groups.items():
        for b, runs in by_budget.items():
            base = finals_by_seed(groups.get(baseline, {}).get(b, []))
            mine = finals_by_seed(runs)
            seeds = sorted(mine.keys() & base.keys())
            if label != baseline and seeds:
                cells[label, b] = (*paired_test([mine[s] for s in seeds], [base[s] for s in seeds]), len(seeds))
    keys = list(cells)
    for k, p in zip(keys, holm([cells[k][2] for k in keys])):
        cells[k] = (cells[k][0], cells[k][1], p, cells[k][3])
    return cells


def ablation_table(groups, baseline='baseline'):
    """Markdown: rows = methods, columns = budgets; mean ± sd of final val loss over seeds (n), and for a
    method its paired difference to the baseline with a t-based 95% CI and a Holm-adjusted p (* below 0.05);
    then the steps taken."""
    budgets = sorted({b for g in groups.values() for b in g})
    cells = paired_cells(groups, baseline)
    head = '| method | ' + ' | '.join(f'budget {b:g}' for b in budgets) + ' |'
    lines, steps = [head, '|' + ' --- |' * (len(budgets) + 1)], [head.replace('method', 'steps'), '|' + ' --- |' * (len(budgets) + 1)]
    for label, by_budget in groups.items():
        row, step_row = [], []
        for b in budgets:
            complete = [r for r in by_budget.get(b, []) if r['complete']]
            if not complete:
                row.append('—')
                step_row.append('—')
                continue
            m, sd = mean_std([r['final'] for r in complete])
            cell = f'{m:.4f} ± {sd:.4f} (n={len(complete)})'
            if (label, b) in cells:
                delta, half, p, pairs = cells[label, b]
                ci = f' [{delta - half:+.4f}, {delta + half:+.4f}] p={p:.3g}' if not math.isnan(half) else ''
                cell += f" Δ {delta:+.4f}{ci}{'*' if p < 0.05 else ''}" + (f' ({pairs} paired)' if pairs != len(complete) else '')
            row.append(cell)
            step_row.append(f"{statistics.mean(r['steps'] for r in complete):.0f}")
        lines.append(f'| {label} | ' + ' | '.join(row) + ' |')
        steps.append(f'| {label} | ' + ' | '.join(step_row) + ' |')
    n_tests = sum(not math.isnan(c[2]) for c in cells.values())
    note = (f'Δ: paired difference to {baseline} over common seeds, t-based 95% CI; p: paired t-test, '
            f'Holm-adjusted over the table\'s {n_tests} comparisons; * p < 0.05.')
    return '\n'.join(lines) + '\n\n' + note + '\n\n' + '\n'.join(steps) + untrained_note(groups, budgets)


def untrained_note(groups, budgets):
    """The cells whose runs took no step (RHO-LOSS with its IL charged, when that cost exceeds the budget):
    their val loss is the initial model's, a statement about the accounting, not about the method's steps."""
    cells = [f'{label} at {b:g}' for label, by_budget in groups.items() for b in budgets
             if (done := [r for r in by_budget.get(b, []) if r['complete']]) and all(r['steps'] == 0 for r in done)]
    return ('\n\ntrained no step (the costs charged before the first step exceed the budget; the val loss is the '
            'initial model\'s): ' + ', '.join(cells)) if cells else ''


def target_table(groups, target, baseline='baseline', how=''):
    """Time to target from fully decayed endpoints: per seed, the budget at which its final val loss
    reaches the target (interpolated between budgets in log budget: they are spaced x2; a seed that never
    does counts as not reached); per method the median over all seeds (not reached = infinite) and speedup =
    baseline median / method's. A seed of a sweep in progress that has not reached it and lacks a run at one
    of the table's budgets is pending, not counted; one already at the target at the smallest budget run
    reached it at that budget or before (the table says how many)."""
    lines = [f'target val loss {target:.4f}{how} (fully decayed endpoints, per seed)', '',
             '| method | budget to target: median | seeds reached | speedup |', '| --- | --- | --- | --- |']
    table_budgets = sorted({b for by_budget in groups.values() for b, rs in by_budget.items() if finals_by_seed(rs)})
    medians = {}
    for label, by_budget in groups.items():
        seeds = sorted({r['seed'] for rs in by_budget.values() for r in rs if r['complete']})
        times, pending, early = [], 0, 0
        for seed in seeds:
            finals = {b: f[seed] for b in table_budgets if seed in (f := finals_by_seed(by_budget.get(b, [])))}
            hit = crossing([(math.log(b), y) for b, y in finals.items()], target)
            reached_at = math.inf if hit is None else math.exp(hit)
            if any(b not in finals and b <= reached_at for b in table_budgets):  # a budget not run yet could move it
                pending += 1
                continue
            times.append(reached_at)
            early += finals[table_budgets[0]] <= target  # at the target at the first budget: at it or before
        medians[label] = (statistics.median(times) if times else math.inf, sum(t < math.inf for t in times), len(times),
                          pending, early)
    base = medians.get(baseline, (math.inf,))[0]
    for label, (median, reached, n, pending, early) in medians.items():
        speed = f'{base / median:.2f}x' if math.isfinite(median) and math.isfinite(base) else '—'
        notes = ([f'{pending} pending: not run at every budget yet'] if pending else []) + (
            [f'{early} already at the smallest budget: an upper bound'] if early else [])
        notes = f" ({'; '.join(notes)})" if notes else ''
        lines.append(f"| {label} | {f'{median:.1f}' if math.isfinite(median) else 'not reached'} | {reached}/{n}{notes} | {speed} |")
    return '\n'.join(lines)


def auto_target(base_runs):
    """compare's default target: the baseline's worst final val loss at the largest budget that every one of
    its seeds completed (else the budget with the most seeds), so that every baseline seed reaches it (its
    time to target is defined on each seed) and a budget still being run does not set it -> (target, how it
    was chosen), or None."""
    finals = {b: f for b, rs in base_runs.items() if (f := finals_by_seed(rs))}
    if not finals:
        return None
    every_seed = set().union(*finals.values())
    full = [b for b, f in finals.items() if f.keys() == every_seed] or [max(finals, key=lambda b: (len(finals[b]), b))]
    b = max(full)
    return max(finals[b].values()), f", the baseline's worst of {len(finals[b])} seeds at budget {b:g}"


def method_stats(groups):
    """What some methods log about themselves, averaged over each run's log records and then over seeds:
    Selective Backprop's kept fraction (RHO-LOSS's is fixed), Sophia-G's win rate (coordinates not clipped),
    RHO-LOSS's IL model's val loss."""
    rows = []
    for label, by_budget in groups.items():
        for b, runs in sorted(by_budget.items()):
            for name in METHOD_STATS:
                values = [r['stats'][name] for r in runs if r['complete'] and name in r['stats']]
                if values:
                    m, half = t_interval(values)
                    rows.append(f"| {label} | {b:g} | {name} | {m:.3f}{f' ± {half:.3f}' if not math.isnan(half) else ''} (n={len(values)}) |")
    return '\n'.join(['| method | budget | logged | mean over the run (95% CI over seeds) |', '| --- | --- | --- | --- |', *rows]) if rows else ''


def corpus_floors(runs):
    """(floors, problem): the count-based n-gram floors of the runs' one val split (cached in its corpus
    folder), or (None, why not) when the runs span corpora or the floors cannot be computed."""
    corpora = {(r['dataset'], r['tokenizer']) for r in runs}
    if len(corpora) != 1 or None in next(iter(corpora)):
        return None, ''
    try:
        return ngram_floors(data_dir(*next(iter(corpora)))), ''
    except DataError as e:
        return None, f'(n-gram floors unavailable: {e})'


def floors_note(runs, groups, baseline):
    """The n-gram floors, and the budgets at which the baseline is still above the trigram floor: there the
    table measures how fast a method learns n-gram statistics."""
    floors, problem = corpus_floors(runs)
    if floors is None:
        return problem
    above = [b for b, rs in sorted(groups.get(baseline, {}).items())
             if any(r['complete'] for r in rs) and mean_std([r['final'] for r in rs if r['complete']])[0] > floors['trigram']]
    note = ('n-gram floors of the val split (nats/token, counts from train): '
            + ', '.join(f'{k} {v:.3f}' for k, v in floors.items() if k in ('unigram', 'bigram', 'trigram')))
    if above:
        note += (f"\nthe baseline is above the trigram floor at budget(s) {', '.join(f'{b:g}' for b in above)}: "
                 f'there this table measures n-gram learning')
    return note


def plot_runs(groups, path, floors=None):
    """Val loss against RST spent, one line per method (mean over seeds, shaded min-max), a panel per budget;
    complete runs only, as in the table. An RST budget's panel spans that budget: a row whose first eval
    lies past it (RHO-LOSS with its IL charged) is named in the legend instead of squeezing every curve.
    floors (corpus_floors): the trigram floor as a dashed line, the regime's mark."""
    plt = pyplot('val loss against RST')
    if plt is None:
        return None
    every = [r for g in groups.values() for rs in g.values() for r in rs if r['complete'] and r['evals']]
    budgets = sorted({r['budget'] for r in every})  # a budget with partial runs only gets no empty panel
    if not budgets:
        return None
    x = 0 if all(r['evals'][-1][0] is not None for r in every) else 1  # RST when every run has it, else tokens
    clip = x == 0 and all(r['unit'] == 'rst' for r in every)  # the x axis is the budget's own unit
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for label, by_budget in groups.items():
            runs = [r for r in by_budget.get(b, []) if r['complete'] and r['evals']]
            if not runs:
                continue
            start, end = max(r['evals'][0][x] for r in runs), min(r['evals'][-1][x] for r in runs)
            if clip and start > b:
                ax.plot([], [], ' ', label=f'{label}: first eval at {start:,.0f} RST, past the budget')
                continue
            if end <= start:  # a single eval per run: its mean and spread at the end
                finals = [r['final'] for r in runs]
                ax.errorbar([end], [statistics.mean(finals)], yerr=[[statistics.mean(finals) - min(finals)],
                            [max(finals) - statistics.mean(finals)]], fmt='o', capsize=3, label=label)
                continue
            grid = np.linspace(start, end, 60)  # from the first eval every seed has: no extrapolation
            ys = np.array([np.interp(grid, [e[x] for e in r['evals']], [e[2] for e in r['evals']]) for r in runs])
            line, = ax.plot(grid, ys.mean(0), label=label)
            ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())  # fill_between has its own colour cycle
        ax.set(title=f'budget {b:g}', xlabel=['RST spent (s)', 'tokens'][x], ylabel='val loss')
        if clip:
            ax.set_xlim(0, 1.02 * b)
        if floors and (ax.lines or ax.collections):
            ax.axhline(floors['trigram'], ls='--', lw=0.8, color='grey', label=f"trigram floor {floors['trigram']:.3f}")
        if ax.lines or ax.collections:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def compare(run_dirs, out='ablation', target='auto', baseline='baseline'):
    """The ablation table (and time to target, plot) of run folders, or of every run under a sweep folder
    (RHO-LOSS's IL model runs left out: not a method); runs in different budget units get a table each
    (their budgets are not comparable); a run found twice, or two runs of one cell and seed, are refused."""
    require(run_dirs, 'compare needs run folders, or a folder that holds them: python budget.py compare out/ablation '
                      '[--out=ablation]')
    require(Path(out).name not in ('', '.', '..') and not out.endswith(os.sep), f"--out='{out}' names no file: give "
            'a path without its extension, e.g. --out=out/ablation')
    run_dirs = run_folders(run_dirs)
    for path in (f'{out}.md', f'{out}.png'):
        require_writable(path)
    runs, il_runs = without_il_models([read_run(d) for d in run_dirs])
    check_one_run_per_cell(runs)
    bad = [r for r in runs if 'error' in r or not r['complete']]
    runs = [r for r in runs if 'error' not in r]
    require(runs or bad, f'the {len(il_runs)} run(s) given are IL models of RHO-LOSS, not methods: give the sweep\'s method runs')
    if not runs:
        raise UserError(f"no readable runs among the {len(bad)} folder(s) given ({bad[0]['path']}: {bad[0]['error']}): "
                        f'a run folder holds config.json and log.jsonl')
    units = sorted({r['unit'] for r in runs})
    sections = [(f'budget unit: {u}\n\n' if len(units) > 1 else '') + unit_report([r for r in runs if r['unit'] == u], target, baseline)
                for u in units]
    report = '\n\n'.join(sections)
    labels = sorted({r['label'] for r in runs})
    if baseline not in labels:
        report += f"\n\nno run is labelled '{baseline}', so no differences are shown: --baseline= one of {', '.join(labels)}"
    if bad:
        report += '\n\nmissing or partial runs (left out of the means):\n' + '\n'.join(
            f"- {r['path']}: {r.get('error', 'budget not spent')}" for r in bad)
    if il_runs:
        report += (f'\n\n{len(il_runs)} run(s) of RHO-LOSS\'s IL model left out (not a method; rho_il_charged\'s '
                   'budget pays for its training, rho\'s leaves it out as the paper does)')
    print(report)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(f'{out}.md'), (report + '\n').encode())
    plotted = [r for r in runs if r['unit'] == units[0]]
    png = plot_runs(group_runs(plotted), f'{out}.png', corpus_floors(plotted)[0])
    print(f'wrote {out}.md' + (f' and {png} (budget unit {units[0]})' if png else ''))
    return report


def run_folders(paths):
    """Each path as given if it is a run folder (it holds config.json), else the run folders beneath it:
    `compare out/ablation` reads a whole sweep. A path that does not exist, or a run reached twice (a
    folder and a folder inside it), is refused."""
    found = {}
    for d in paths:
        require(Path(d).exists(), f'{d} does not exist: give run folders, or a sweep folder such as out/ablation')
        nested = [] if (Path(d) / 'config.json').exists() else sorted(str(p.parent) for p in Path(d).rglob('config.json'))
        for run in nested or [d]:  # a folder with no run in it stays, to be listed as unreadable
            real = os.path.realpath(run)
            if real in found:
                first = found[real][0]
                both = '' if os.path.realpath(first) == os.path.realpath(d) else f' (found under both {first} and {d})'
                raise ConfigError(f'{run} is given twice{both}: each run counts once')
            found[real] = (d, run)
    return [run for _, run in found.values()]


def without_il_models(runs):
    """(method runs, IL model runs): RHO-LOSS's IL model (runs.IL_LABEL; a damaged one is known by its folder
    under a sweep's il/) is trained for the rho rows, it is not a row of its own."""
    def is_il(r):
        return r.get('label') == IL_LABEL or ('error' in r and 'il' in Path(r['path']).parts)
    return [r for r in runs if not is_il(r)], [r for r in runs if is_il(r)]


def check_one_run_per_cell(runs):
    """Two runs of one method, budget and seed (a copy of a sweep inside the folder read, or tuning runs,
    whose grid points share a label and seed) would count one seed twice: refused, naming both."""
    seen = {}
    for r in runs:
        if 'error' not in r:
            cell = (r['label'], r['unit'], r['budget'], r['seed'])
            require(cell not in seen, f"{seen.get(cell)} and {r['path']} are both {r['label']} at budget {r['budget']:g} "
                                      f"seed {r['seed']}: compare one sweep's runs (tuning grids are read by tune)")
            seen[cell] = r['path']


def log_budget_interp(ends, b):
    """A final val loss at budget b from one seed's fully decayed endpoints [(budget, final)], linear in log
    budget, extended along the first or last segment outside them; None with fewer than two."""
    if len(ends) < 2:
        return None
    i = min(max(np.searchsorted([e[0] for e in ends], b), 1), len(ends) - 1)
    (b0, y0), (b1, y1) = ends[i - 1], ends[i]
    return y0 + (y1 - y0) * math.log(b / b0) / math.log(b1 / b0)


def perturbed_final(by_budget, seed, b, entry, factor):
    """The seed's final at budget b had cost-table `entry` cost factor x as much: the run would have stopped
    after b * R / R' of its RST (R its total, R' = R + (factor - 1) x what entry charged), read off the
    seed's endpoints across budgets (log_budget_interp)."""
    ends = sorted((bb, r['final']) for bb, rs in by_budget.items() for r in rs if r['complete'] and r['seed'] == seed)
    run = next(r for r in by_budget[b] if r['complete'] and r['seed'] == seed)
    total = sum(run['rst_by_entry'].values())
    return log_budget_interp(ends, b * total / (total + (factor - 1) * run['rst_by_entry'].get(entry, 0.0)))


def seeds_across_budgets(by_budget):
    """The seeds with complete runs at two or more budgets: only their finals can be re-read at another."""
    count = collections.Counter(r['seed'] for rs in by_budget.values() for r in rs if r['complete'])
    return {seed for seed, n in count.items() if n >= 2}


def cost_sensitivity(groups, baseline, change=0.1):
    """Does +-change on any single cost-table entry flip the sign of a table cell (a method's mean paired
    difference to the baseline)? Each run's final is re-read at the budget the perturbed table would have
    given it (perturbed_final): an estimate from the sweep's budgets, not a rerun. A sweep in progress has
    seeds at one budget only: each cell is read over the seeds that have two, unperturbed and perturbed alike."""
    cells = paired_cells(groups, baseline)
    runs = [r for g in groups.values() for rs in g.values() for r in rs if r['complete']]
    if not cells:
        return ''
    if any(not r.get('rst_by_entry') for r in runs):
        return 'cost-table sensitivity: not shown (some runs did not log their RST per cost entry)'
    seeds = {}
    for label, b in cells:
        common = finals_by_seed(groups[label][b]).keys() & finals_by_seed(groups[baseline][b]).keys()
        if readable := sorted(common & seeds_across_budgets(groups[label]) & seeds_across_budgets(groups[baseline])):
            seeds[label, b] = readable
    if not seeds:
        return ('cost-table sensitivity: not shown yet (it reads each seed\'s endpoints across budgets; no seed '
                'has runs of a method and the baseline at two budgets)')

    def delta(label, b, *perturbation):  # the cell's mean paired difference over its readable seeds
        def final(by_budget, seed):
            return perturbed_final(by_budget, seed, b, *perturbation) if perturbation else finals_by_seed(by_budget[b])[seed]
        return statistics.mean(final(groups[label], s) - final(groups[baseline], s) for s in seeds[label, b])
    unperturbed = {cell: delta(*cell) for cell in seeds}
    entries = sorted({e for r in runs for e in r['rst_by_entry']})
    flips, shift = [], 0.0
    for entry, factor in itertools.product(entries, (1 - change, 1 + change)):
        for label, b in seeds:
            before, after = unperturbed[label, b], delta(label, b, entry, factor)
            shift = max(shift, abs(after - before))
            if (after > 0) != (before > 0):
                flips.append(f'{label} at budget {b:g}, {entry} x{factor:g}: Δ {before:+.4f} -> {after:+.4f}')
    head = (f'cost-table sensitivity: each of {len(entries)} entries ({", ".join(entries)}) at x{1 - change:g} and '
            f'x{1 + change:g}, finals re-read on each seed\'s endpoints across budgets (largest shift of a Δ: {shift:.4f})')
    fewer = [f'{label} at {b:g} ({len(s)} of {cells[label, b][-1]})' for (label, b), s in seeds.items() if len(s) < cells[label, b][-1]]
    left_out = [f'{label} at {b:g}' for label, b in cells if (label, b) not in seeds]
    if fewer:
        head += '; read over the seeds at two budgets only: ' + ', '.join(fewer)
    if left_out:
        head += '; left out, no seed at two budgets yet: ' + ', '.join(left_out)
    return head + (':\ncells whose sign flips:\n' + '\n'.join(f'- {f}' for f in flips) if flips else ': no cell changes sign')


def unit_report(runs, target, baseline):
    """compare's report for runs in one budget unit: the table, the floors, what methods log, time to target."""
    groups = group_runs(runs)
    parts = [ablation_table(groups, baseline), floors_note(runs, groups, baseline), method_stats(groups)]
    if runs[0]['unit'] == 'rst':
        parts.append(cost_sensitivity(groups, baseline))
    if target != 'none':
        chosen = (float(target), '') if target != 'auto' else auto_target(groups.get(baseline, {}))
        if chosen is not None:
            parts.append(target_table(groups, chosen[0], baseline, how=chosen[1]))
    return '\n\n'.join(p for p in parts if p)


def is_number(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def check_target(target):
    require(target in ('auto', 'none') or is_number(target), f"--target must be 'auto', 'none' or a number, got '{target}'")


@dataclass(frozen=True)
class CompareConfig:
    out: str = 'ablation'        # writes <out>.md and, with matplotlib, <out>.png
    target: str = 'auto'         # time-to-target: 'auto' (the baseline's worst seed at its largest full budget), a number, 'none'
    baseline: str = 'baseline'   # the label deltas and speedups are taken against

    def __post_init__(self):
        check_target(self.target)


# -----------------------------------------------------------------------------
# the No Train No Gain ablation in one command: methods x budgets x seeds

@dataclass(frozen=True)
class AblateConfig:
    config: str = key('config/ablation.py', 'path')  # COMMON, BUDGETS, QUICK_BUDGETS, METHODS (your own Python)
    out_dir: str = key('out/ablation', 'path')
    methods: tuple = ('',)               # ('',) = every method in the config file
    budgets: tuple = key((0.0,), '>=0')  # (0.0,) = the config file's BUDGETS (QUICK_BUDGETS with --quick)
    seeds: tuple = key((0, 1, 2, 3, 4), '>=0')  # paired: a seed fixes initialisation and data order for every method
    quick: bool = False                  # a smoke sweep: QUICK_BUDGETS, one seed
    baseline_schedule: str = key('cosine', ('cosine', 'wsd_branches'))  # 'wsd_branches' adds a WSD row trained as cooldown branches
    target: str = 'auto'                 # time-to-target: 'auto' (see compare), a number, 'none'
    tuned: str = ''                      # a tuned.json from `budget.py tune` of this sweep: its values override METHODS'
    jobs: int = key(1, '>0')             # runs at once, the CPU threads split between them

    def __post_init__(self):
        check_target(self.target)
        check_distinct('seeds', self.seeds, '(0, 1, 2, 3, 4)')
        check_distinct('budgets', self.budgets, '(120.0, 240.0)')


def read_sweep(path):
    """The sweep file's COMMON, BUDGETS, QUICK_BUDGETS, METHODS (and optional TUNE: extra grid axes;
    TUNED_AS: {row: another row whose tuned values it runs with})."""
    if not Path(path).is_file():
        raise ConfigError(f'--config={path} not found: give the sweep file (your own Python), e.g. config/ablation.py')
    spec = read_config_file(path)
    missing = [k for k in ('COMMON', 'BUDGETS', 'QUICK_BUDGETS', 'METHODS') if k not in spec]
    require(not missing, f"{path} does not define {', '.join(missing)} (see config/ablation.py)")
    check_sweep_shapes(spec, path)
    bad = {k: v for k, v in spec.get('TUNED_AS', {}).items() if k not in spec['METHODS'] or v not in spec['METHODS']}
    require(not bad, f'{path}: TUNED_AS {bad} names rows that METHODS does not have')
    return spec


def check_sweep_shapes(spec, path):
    """Each name of a sweep file has the shape config/ablation.py shows, or one line says which does not."""
    def is_dict_of(value, check):
        return isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())

    def is_budgets(value):
        return (isinstance(value, (tuple, list)) and len(value) > 0 and len(set(value)) == len(value)
                and all(isinstance(b, (int, float)) and 0 < b < math.inf for b in value))
    shapes = {
        'COMMON': (is_dict_of(spec['COMMON'], lambda v: True), 'a dict of train.py keys'),
        'BUDGETS': (is_budgets(spec['BUDGETS']), 'a tuple of distinct positive numbers'),
        'QUICK_BUDGETS': (is_budgets(spec['QUICK_BUDGETS']), 'a tuple of distinct positive numbers'),
        'METHODS': (is_dict_of(spec['METHODS'], lambda v: isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                               and v[0].endswith('.py') and isinstance(v[1], dict)) and spec['METHODS'] != {},
                    "a non-empty dict of row -> ('script.py', dict(overrides))"),
        'TUNE': (is_dict_of(spec.get('TUNE', {}), lambda axes: is_dict_of(axes, lambda v: isinstance(v, tuple) and v)),
                 "a dict of row -> {key: (values, ...)}"),
        'TUNED_AS': (is_dict_of(spec.get('TUNED_AS', {}), lambda v: isinstance(v, str)), 'a dict of row -> row'),
    }
    for name, (ok, shape) in shapes.items():
        require(ok, f'{path}: {name} must be {shape} (see config/ablation.py)')
    for row, axes in spec.get('TUNE', {}).items():
        require(row in spec['METHODS'], f"{path}: TUNE names {row}, which METHODS does not have")
        lion = {**spec['COMMON'], **spec['METHODS'][row][1]}.get('optimizer') == 'lion'
        for name, values in axes.items():
            require(name not in ('lr', 'seed', 'budget'), f'{path}: TUNE {row} {name}: tune varies lr itself, and '
                    'seed and budget are the sweep\'s: give another key')
            require(not (lion and name == 'weight_decay'), f'{path}: TUNE {row} weight_decay: Lion\'s follows its lr '
                    '(lr x weight_decay stays at its configured product): give another key')
            require(len({'number' if is_number_value(v) else type(v) for v in values}) == 1 and len(set(values)) == len(values),
                    f'{path}: TUNE {row} {name} = {values!r} must be distinct values of one type')
            require(not any(isinstance(v, str) and ('/' in v or os.sep in v or v in ('', '.', '..')) for v in values),
                    f'{path}: TUNE {row} {name} = {values!r}: a value names a grid folder, so no path separators')


def is_number_value(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def chosen_methods(spec, wanted, path):
    require(len(wanted) > 0, f"--methods is empty: give some of {', '.join(spec['METHODS'])}, or ('',) for all")
    unknown = set(wanted) - set(spec['METHODS']) - {''}
    require(not unknown, f"unknown method(s) {', '.join(sorted(unknown))}: {path} has {', '.join(spec['METHODS'])}")
    return {k: v for k, v in spec['METHODS'].items() if k in wanted or wanted == ('',)}


def sweep_plan(cfg):
    """Every run of the sweep, smallest budget first and every seed of it before the next budget: a sweep
    cut short (it runs in parts) has whole columns of paired seeds, not one seed of every column. The WSD
    rows (--baseline_schedule=wsd_branches) come last: one run per seed serves every budget."""
    spec = read_sweep(cfg.config)
    budgets = sorted(b for b in cfg.budgets if b > 0) or sorted(spec['QUICK_BUDGETS' if cfg.quick else 'BUDGETS'])
    seeds = cfg.seeds[:1] if cfg.quick else cfg.seeds
    methods = chosen_methods(spec, cfg.methods, cfg.config)
    rows = [*methods, *(['baseline'] if cfg.baseline_schedule == 'wsd_branches' else [])]  # the WSD row runs with the baseline's values
    tuned, tuned_il = read_tuned(cfg.tuned, spec, cfg.config, min(budgets), rows, seeds) if cfg.tuned else ({}, None)
    # the IL model that tuning's RHO-LOSS grid trained serves this sweep too if it was trained for this largest budget
    il = tuned_il if tuned_il and tuned_il['il_budget'] == max(budgets) else il_args(cfg.out_dir, max(budgets))
    plan = [(label, script, {**spec['COMMON'], **(il if args.get('method') == 'rho' else {}), **args,
                             **tuned.get(spec.get('TUNED_AS', {}).get(label, label), {}), 'budget': b, 'seed': seed, 'label': label,
                             'out_dir': f'{cfg.out_dir}/{label}/b{b:g}/s{seed}'})
            for b in budgets for seed in seeds for label, (script, args) in methods.items()]  # cheapest budget first
    if cfg.baseline_schedule == 'wsd_branches':
        plan += [('wsd (branches)', 'train.py', {**spec['COMMON'], **tuned.get('baseline', {}), 'schedule': 'wsd',
                  'budget': min(budgets), 'seed': seed, 'branch_budgets': tuple(b / min(budgets) for b in budgets),
                  'label': 'wsd (branches)', 'out_dir': f'{cfg.out_dir}/wsd_branches/s{seed}'}) for seed in seeds]
    return plan


def il_args(out_dir, budget):
    """RHO-LOSS's irreducible-loss model is trained once per sweep (by its first RHO-LOSS run: from the
    largest budget, doubling while its val loss improves, rho.train_il) and reused by every other, tuning
    runs and ablation runs alike."""
    return {'il_out_dir': f'{out_dir}/il', 'il_cache': f'{out_dir}/il_cache', 'il_budget': budget}


def run_command(script, args):
    """The command of one planned run: it resumes a killed run of these same keys, and starts afresh
    (replacing it) over anything else in its folder, e.g. a run of an older plan with another budget."""
    out_dir = Path(args['out_dir'])
    resume = not args.get('branch_budgets') and (out_dir / 'ckpt.pt').exists() and records_config(out_dir, args)
    args = {**args, 'init_from': 'resume'} if resume else {**args, 'overwrite': not args.get('branch_budgets')}
    return [sys.executable, script] + [f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}' for k, v in args.items()]


def run_plan(plan, jobs, diverged_ok=False):
    """Run every unfinished (label, script, args) of a plan, `jobs` at a time (runs.run_jobs; each run's
    output goes to <out_dir>.out). The runs that need RHO-LOSS's shared IL model wait while the first of
    them builds it, then run side by side. Resumable: finished runs are skipped, killed ones resume.
    diverged_ok (tuning): a run of these keys whose loss went non-finite is a result (that lr is too
    high), not a failure, and is not run again."""
    def diverged(args):
        return diverged_ok and run_diverged(args['out_dir']) and records_config(args['out_dir'], args)
    todo = [(label, script, args) for label, script, args in plan if args.get('branch_budgets') or not (
        (run_finished(args['out_dir']) and records_config(args['out_dir'], args)) or diverged(args))]
    args_of = {}  # id(job) -> its args: run_jobs hands back the failed Job objects
    for label, script, args in todo:
        job = Job(f"{label} budget {args['budget']:g} seed {args['seed']}", run_command(script, args),
                  Path(f"{args['out_dir']}.out"), 'il' if args.get('il_out_dir') else '')
        args_of[id(job)] = job, args
    failed, still_failed = run_jobs([job for job, _ in args_of.values()], jobs, cwd=Path(__file__).parent), []
    for job, last in failed:
        if diverged(args_of[id(job)][1]):
            print(f'{job.label}: diverged, counted as an infinite loss ({last})', flush=True)
        else:
            still_failed.append((job, last))
    failed = still_failed
    if failed:
        job, last = failed[0]
        raise UserError(f'{len(failed)} run(s) failed, first: {job.label}: {last} (see {job.log})')


def ablate(cfg):
    require_writable(Path(cfg.out_dir) / 'ablation.md')
    run_plan(sweep_plan(cfg), cfg.jobs)
    return compare([cfg.out_dir], out=f'{cfg.out_dir}/ablation', target=cfg.target)


# -----------------------------------------------------------------------------
# equal-effort tuning: the same lr grid for every method, the baseline included, on seeds never reported

@dataclass(frozen=True)
class TuneConfig:
    config: str = key('config/ablation.py', 'path')  # the sweep file whose methods are tuned
    out_dir: str = key('out/tune', 'path')  # runs, tuned.json (what ablate --tuned reads) and tune.png
    methods: tuple = ('',)               # ('',) = every method in the config file
    budget: float = key(0.0, '>=0')      # 0 = the smallest of the config file's BUDGETS
    seeds: tuple = key((1000,), '>=0')   # tuning seeds: never the reported ones
    points: int = key(5, '>=5')          # lr grid points, spaced x2 around the method's own lr
    jobs: int = key(1, '>0')             # runs at once, the CPU threads split between them

    def __post_init__(self):
        check_distinct('seeds', self.seeds, '(1000,)')


def tune_point(args, common, lr, extra):
    """A method's overrides at learning rate lr: Lion keeps lr x weight_decay at its configured product."""
    point = {**args, 'lr': lr, **extra}
    if {**common, **args}.get('optimizer') == 'lion':
        lr0, wd0 = args.get('lr', common.get('lr')), args.get('weight_decay', common.get('weight_decay', 0.1))
        point['weight_decay'] = wd0 * lr0 / lr
    return point


def tune(cfg):
    """Final val loss at the smallest budget over an lr grid (x2 spacing) per method, crossed with the
    sweep file's TUNE axes (Sophia-G's rho). A best point at an edge of any axis extends that axis
    (MAX_EXTENSIONS times at most). Writes tuned.json (read by `ablate --tuned`) and tune.png."""
    spec, out = read_sweep(cfg.config), Path(cfg.out_dir)
    require_writable(out / 'tuned.json')
    budget, common = cfg.budget or min(spec['BUDGETS']), spec['COMMON']
    methods = chosen_methods(spec, cfg.methods, cfg.config)
    for row in [row for row in methods if row in spec.get('TUNED_AS', {})]:
        print(f"{row}: runs with {spec['TUNED_AS'][row]}'s tuned values (TUNED_AS)", flush=True)
        del methods[row]
    require(methods, 'nothing to tune: the rows chosen run with other rows\' values (TUNED_AS): tune those')
    record = {'config': cfg.config, 'common': repr(common), 'methods': {k: repr(v) for k, v in spec['METHODS'].items()},
              'budget': budget, 'seeds': list(cfg.seeds), 'tuned': {}}
    earlier = earlier_tuning(out / 'tuned.json', record)  # checked before hours of runs, not after
    grids = [TuneGrid(label, script, args, spec, budget, cfg) for label, (script, args) in methods.items()]
    # all grids in one pool, so that no core idles between methods; RHO-LOSS's first, as its first run
    # trains the shared IL model (the longest job); then the grids whose best point is at an edge, extended
    run_plan([item for g in sorted(grids, key=lambda g: not g.il) for item in g.plan()], cfg.jobs, diverged_ok=True)
    extending = grids
    while extending := [g for g in extending if g.extend()]:
        run_plan([item for g in extending for item in g.plan()], cfg.jobs, diverged_ok=True)
    results = {}
    for g in grids:
        best = g.best()
        edges = list(g.edges(best))  # still at an edge after every extension allowed: the optimum may lie beyond
        results[g.label] = {**{k: v for k, v in tune_point(g.args, common, best['lr'], best['extra']).items()
                               if k in ('lr', 'weight_decay', *g.axes)}, 'grid': g.summaries(), 'at_edge': edges}
        print(f"{g.label}: best lr {best['lr']:.3g} {best['extra'] or ''} final val loss {best['final']:.4f}"
              + (f" (still at an edge of its {', '.join(edges)} axis, which can extend no further: the optimum may "
                 'lie beyond it)' if edges else ''), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    record['tuned'] = {**earlier.get('tuned', {}), **results}  # methods tuned earlier for this same sweep stay
    il = next((g.il for g in grids if g.il), None) or earlier.get('il')
    if il:
        record['il'] = il  # the IL model the RHO-LOSS grid trained: ablate reuses it at the same il_budget
    atomic_write_bytes(out / 'tuned.json', json.dumps(record, indent=1).encode())
    plot_tuning(record['tuned'], out / 'tune.png')
    print(f"wrote {out / 'tuned.json'}")
    return results


def earlier_tuning(path, record):
    """The tuned.json already at path (its methods are kept), {} if none; refused when it is not one, or
    was made for another sweep (other COMMON, METHODS, budget or seeds): it would be overwritten."""
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
        differ = [k for k in ('common', 'methods', 'budget', 'seeds') if earlier[k] != record[k]]
        if not isinstance(earlier['tuned'], dict):
            raise TypeError('tuned')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'{path} is not a tuned.json from `budget.py tune` ({type(e).__name__}): move it away or '
                        f'give another --out_dir') from None
    require(not differ, f"{path} holds a tuning of another sweep (its {', '.join(differ)} differ): give another "
                        f'--out_dir, or move it away to tune afresh')
    return earlier


MAX_EXTENSIONS = 3  # times an edge extends one axis of a tuning grid


class TuneGrid:
    """One method's lr grid: lr0 x 2^k for k in ks, crossed with its TUNE axes, on the tuning seeds."""

    def __init__(self, label, script, args, spec, budget, cfg):
        self.label, self.script, self.args, self.budget, self.seeds = label, script, args, budget, cfg.seeds
        self.common, self.out = spec['COMMON'], Path(cfg.out_dir) / label
        self.lr0 = args.get('lr', self.common.get('lr', 2e-3))
        self.axes = {name: tuple(sorted(values)) for name, values in spec.get('TUNE', {}).get(label, {}).items()}
        self.ks = list(range(-(cfg.points // 2), cfg.points - cfg.points // 2))
        self.extended = dict.fromkeys(['lr', *self.axes], 0)  # an edge extends an axis MAX_EXTENSIONS times
        self.il = il_args(cfg.out_dir, max(spec['BUDGETS'])) if args.get('method') == 'rho' else {}

    def grid(self):  # the method's own lr first: RHO-LOSS's first run trains the shared IL model with it
        extras = [dict(zip(self.axes, v)) for v in itertools.product(*self.axes.values())] or [{}]
        return [(self.lr0 * 2.0 ** k, extra) for k in sorted(self.ks, key=abs) for extra in extras]

    def plan(self):
        return [(self.label, self.script, {**self.common, **self.il, **tune_point(self.args, self.common, lr, extra),
                                           'budget': self.budget, 'seed': seed, 'label': f'{self.label} (tuning)',
                                           'out_dir': str(self.out / point_name(lr, extra) / f's{seed}')})
                for lr, extra in self.grid() for seed in self.seeds]

    def summaries(self):
        return [tune_summary(self.out / point_name(lr, extra), self.seeds, lr, extra) for lr, extra in self.grid()]

    def best(self):
        return min(self.summaries(), key=lambda p: p['final'])

    def edges(self, best):
        """{axis: its next value} for every axis whose best value is one of its edges: for 'lr' the next
        exponent k (lr0 x 2^k); a TUNE axis by the ratio of its two outermost values (beyond_edge). {} if
        every point failed."""
        if not math.isfinite(best['final']):
            return {}
        k_best = round(math.log2(best['lr'] / self.lr0))
        lr = {'lr': k_best - 1 if k_best == min(self.ks) else k_best + 1} if k_best in (min(self.ks), max(self.ks)) else {}
        return {**lr, **{name: new for name, values in self.axes.items()
                         if (new := beyond_edge(values, best['extra'][name])) is not None}}

    def extend(self):
        """Add the next value beyond the best point on every axis where it lies at an edge -> whether the
        grid grew. lr steps x2; a TUNE axis (e.g. Sophia-G's rho) by the ratio of its two outermost values
        (an int axis stays int), and only to a value the method's script accepts (its config's ranges), so
        an extension never plans runs that would fail. A grid whose every point failed does not grow."""
        grew = False
        for name, new in self.edges(self.best()).items():
            if self.extended[name] < MAX_EXTENSIONS and (name == 'lr' or self.accepts(name, new)):
                if name == 'lr':
                    self.ks = sorted(set(self.ks) | {new})
                else:
                    self.axes[name] = tuple(sorted(self.axes[name] + (new,)))
                self.extended[name], grew = self.extended[name] + 1, True
        return grew

    def accepts(self, name, value):
        """Whether the method's script takes name=value among this grid's keys (its config class's checks)."""
        config = script_config(self.script)
        args = {**self.common, **self.args, **tune_point(self.args, self.common, self.lr0, {name: value})}
        try:
            config(**{f.name: args[f.name] for f in dataclasses.fields(config) if f.name in args})
        except ConfigError as e:
            print(f'{self.label}: {name} does not extend to {value!r} ({e})', flush=True)
            return False
        return True


def beyond_edge(values, v):
    """The next value past v on an axis of positive numbers (sorted), when v is one of its two edges, by the
    ratio of the axis's two outermost values at that edge (an int axis stays int); else None."""
    if len(values) < 2 or v not in (values[0], values[-1]) or not all(is_number_value(x) and x > 0 for x in values):
        return None
    new = v * values[0] / values[1] if v == values[0] else v * values[-1] / values[-2]
    new = round(new) if isinstance(v, int) else new
    return new if new > 0 and new not in values else None


def script_config(script):
    """The config class of a sweep's entry script (train.py -> train.TrainConfig, rho.py -> rho.RhoConfig)."""
    module = importlib.import_module(Path(script).stem)
    return next(v for v in vars(module).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
                and v.__module__ == module.__name__ and v.__name__.endswith('Config'))


def value_text(v):
    return f'{v:g}' if isinstance(v, (int, float)) else str(v)


def point_name(lr, extra):
    return f'lr{lr:.3g}' + ''.join(f'_{k}{value_text(v)}' for k, v in extra.items())


def tune_summary(folder, seeds, lr, extra):
    """One grid point: its mean final val loss over the tuning seeds, and the means of what the method
    logs about itself (Sophia-G's win rate, Selective Backprop's kept fraction: runs.METHOD_STATS)."""
    runs = [r for r in (read_run(folder / f's{seed}') for seed in seeds) if 'error' not in r]
    finals = [r['final'] for r in runs if r['complete']]
    final = statistics.mean(finals) if len(finals) == len(seeds) and all(map(math.isfinite, finals)) else math.inf
    stats = {name: statistics.mean(values) for name in METHOD_STATS
             if (values := [r['stats'][name] for r in runs if name in r['stats']])}
    return {'lr': lr, 'extra': extra, 'final': final, **stats}


def read_tuned(path, spec, config, smallest_budget, rows, seeds):
    """({label: overrides}, the IL model's il_args or None) from a tuned.json, refused (naming the
    difference) when it was made for another sweep, lacks one of the sweep's rows (equal effort: no row
    runs untuned beside tuned ones), or was tuned on a seed the sweep reports."""
    try:
        record = json.loads(Path(path).read_text())
        tuned, methods, il = record['tuned'], record['methods'], record.get('il')
        if not (isinstance(methods, dict) and isinstance(tuned, dict)
                and all(isinstance(t, dict) and t['lr'] > 0 for t in tuned.values())):
            raise TypeError('tuned')
        if il is not None and not (isinstance(il['il_out_dir'], str) and isinstance(il['il_cache'], str)
                                   and il['il_budget'] > 0):
            raise ValueError('il')
        if not (isinstance(record.get('seeds', []), list) and all(type(x) is int for x in record.get('seeds', []))):
            raise TypeError('seeds')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'--tuned={path} is not a tuned.json from `budget.py tune` ({type(e).__name__})') from None
    if record.get('common') != repr(spec['COMMON']):
        raise UserError(f"--tuned={path} was made for COMMON {record.get('common')}, {config} has {spec['COMMON']!r}: tune again")
    for label in tuned:
        if label in spec['METHODS'] and methods.get(label) != repr(spec['METHODS'][label]):
            raise UserError(f'--tuned={path} was made for {label} = {methods.get(label)}, {config} has '
                            f"{spec['METHODS'][label]!r}: tune again")
    if record.get('budget') != smallest_budget:
        raise UserError(f"--tuned={path} was tuned at budget {record.get('budget')}, this sweep's smallest is {smallest_budget}")
    untuned = [row for row in rows if spec.get('TUNED_AS', {}).get(row, row) not in tuned]
    require(not untuned, f"--tuned={path} has no tuned values for {', '.join(untuned)}: tune them too "
                         f"(python budget.py tune --methods=...), or leave them out with --methods")
    shared = sorted(set(record.get('seeds', [])) & set(seeds))
    require(not shared, f'--tuned={path} was tuned on seed(s) {shared}, which this sweep reports: tuning seeds are '
                        'never reported; give --seeds without them, or tune on other seeds')
    return {label: {k: v for k, v in t.items() if k not in ('grid', 'at_edge')} for label, t in tuned.items()}, il


def plot_tuning(results, path):
    """Final val loss against lr, one line per method (per extra grid value), on one figure."""
    plt = pyplot('the tuning curves')
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, result in results.items():
        lines = {}
        for p in result['grid']:
            lines.setdefault(' '.join(f'{k}={value_text(v)}' for k, v in p['extra'].items()), []).append((p['lr'], p['final']))
        for extra, pts in lines.items():
            pts = sorted(pt for pt in pts if math.isfinite(pt[1]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=f'{label} {extra}'.strip())
    ax.set(xscale='log', xlabel='peak lr', ylabel='final val loss (mean over tuning seeds)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
