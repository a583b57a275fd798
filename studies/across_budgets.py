"""Readings of a No Train No Gain table across its budgets: time to target (AlgoPerf's question turned
around: how much budget a method needs to reach the fully decayed baseline's loss, from each seed's
endpoints at every budget), the cost-table sensitivity (which cells change sign when one RST cost
entry is off by 10%), and the table as a figure (plot_runs: final val loss and the paired differences to
the baseline against budget, over the val-loss curves behind them). studies/compare.py prints the first
two under its table and draws the figure beside it.
"""
import collections
import itertools
import math
import statistics

import numpy as np

from budget import pyplot
from studies.stats import crossing, finals_by_seed, paired_cells, t_interval, untrained


def target_table(groups, target, baseline='baseline', how=''):
    """Time to target from fully decayed endpoints: per seed, the budget at which its final val loss
    reaches the target (interpolated between budgets in log budget: they are spaced x2; a seed that never
    does counts as not reached); per method the median over all seeds (not reached = infinite) and speedup =
    baseline median / method's. A seed of a sweep in progress that has not reached it and lacks a run at one
    of the table's budgets is pending, not counted; one already at the target at the smallest budget run
    reached it at that budget or before (the table says how many)."""
    lines = [f'target val loss {target:.4f}{how} (fully decayed endpoints, per seed)', '',
             '| method | budget to target: median | seeds reached | speedup | paired speedup [95% CI] |',
             '| --- | --- | --- | --- | --- |']
    table_budgets = sorted({b for by_budget in groups.values() for b, rs in by_budget.items() if finals_by_seed(rs)})
    medians, per_seed = {}, {}
    for label, by_budget in groups.items():
        seeds = sorted({r['seed'] for rs in by_budget.values() for r in rs if r['complete']})
        times, pending, early = [], 0, 0
        per_seed[label] = {}
        for seed in seeds:
            finals = {b: f[seed] for b in table_budgets if seed in (f := finals_by_seed(by_budget.get(b, [])))}
            hit = crossing([(math.log(b), y) for b, y in finals.items()], target)
            reached_at = math.inf if hit is None else math.exp(hit)
            if any(b not in finals and b <= reached_at for b in table_budgets):  # a budget not run yet could move it
                pending += 1
                continue
            times.append(reached_at)
            per_seed[label][seed] = reached_at
            early += finals[table_budgets[0]] <= target  # at the target at the first budget: at it or before
        medians[label] = (statistics.median(times) if times else math.inf, sum(t < math.inf for t in times), len(times),
                          pending, early)
    base = medians.get(baseline, (math.inf,))[0]
    for label, (median, reached, n, pending, early) in medians.items():
        speed = f'{base / median:.2f}x' if math.isfinite(median) and math.isfinite(base) else '—'
        notes = ([f'{pending} pending: not run at every budget yet'] if pending else []) + (
            [f'{early} already at the smallest budget: an upper bound'] if early else [])
        notes = f" ({'; '.join(notes)})" if notes else ''
        paired = paired_speedup(per_seed.get(baseline, {}), per_seed[label], pending) if label != baseline else '—'
        lines.append(f"| {label} | {f'{median:.1f}' if math.isfinite(median) else 'not reached'} | {reached}/{n}{notes} "
                     f"| {speed} | {paired} |")
    return '\n'.join(lines)


def paired_speedup(base, mine, pending=0):
    """The geometric mean over paired seeds of baseline time / method time, with a t-based 95% CI on the log
    ratios: a method's speedup carries its interval. Needs every paired seed to reach the target; with seeds
    still pending (target_table), a method none of whose finished seeds reached it is not yet slower."""
    seeds = sorted(base.keys() & mine.keys())
    later = f', {pending} pending' if pending else ''
    if not seeds:
        return f'not resolved yet ({pending} pending)' if pending else '—'
    if all(math.isfinite(base[s]) and not math.isfinite(mine[s]) for s in seeds):
        if pending:
            return f'not resolved yet: none of its {len(seeds)} finished paired seeds reached it{later}'
        return f'slower: none of its {len(seeds)} paired seeds reached it'
    if not all(math.isfinite(base[s]) and math.isfinite(mine[s]) for s in seeds):
        return f'not resolved (a seed never reached it{later})'
    m, half = t_interval([math.log(base[s] / mine[s]) for s in seeds])
    ci = f' [{math.exp(m - half):.2f}, {math.exp(m + half):.2f}]' if math.isfinite(half) else ' (one pair)'
    return f'{math.exp(m):.2f}x{ci} (n={len(seeds)}{later})'


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


# -----------------------------------------------------------------------------
# the figure: the table read across budgets (final val loss, paired differences), over the curves behind it

# one colour per method in every figure of the lab (a label's base name; another reference system is dashed)
METHOD_ORDER = ('baseline', 'stack', 'drop', 'sb', 'rho', 'rho_il_charged', 'lion', 'sophiag', 'muon', 'sfadamw', 'wsd (branches)')


def method_colour(label):
    base = label.split(' [')[0]
    i = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER) + sum(map(ord, base))
    return f'C{i}' if i < 10 else ('#000000', '#aec7e8', '#ffbb78', '#98df8a', '#ff9896', '#c5b0d5')[i % 6]


def method_rank(label):
    """Where a method's row goes in a legend: the lab's order, another reference system right after its method."""
    base = label.split(' [')[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), base, label)


def method_style(label):
    """Colour, line style and marker of a method's marks: a row under another reference system ('stack [h200]')
    has its method's colour, dashed, with square markers."""
    other_system = label.endswith(']')
    return {'color': method_colour(label), 'ls': '--' if other_system else '-', 'marker': 's' if other_system else 'o'}


def unit_words(unit):
    return 'RST, reference seconds' if unit == 'rst' else unit


def plot_runs(groups, path, floors=None, baseline='baseline'):
    """One figure a reader can take without the table. Top: each method's final val loss against budget
    (mean over seeds, 95% CI) and its paired difference to the baseline (Δ, 95% CI; a filled marker where
    the table calls it better or worse: CI off zero and Holm p < 0.05), zero line. Below: val loss against
    budget spent, a panel per budget (mean over seeds, min-max shaded). Complete runs only, as in the table;
    a cell that trained no step (its costs before the first step exceed the budget) is named in the legend,
    not drawn. floors (compare.corpus_floors): the trigram floor, dotted. One legend, outside the panels."""
    plt = pyplot('val loss against budget')
    if plt is None:
        return None
    every = [r for g in groups.values() for rs in g.values() for r in rs if r['complete'] and r['evals']]
    budgets = sorted({r['budget'] for r in every})  # a budget with partial runs only gets no empty panel
    if not budgets:
        return None
    fig = plt.figure(figsize=(max(11.0, 4.6 * len(budgets)), 8.6))
    grid = fig.add_gridspec(2, 2 * len(budgets), hspace=0.38, wspace=0.9, left=0.06, right=0.98)
    final_ax, delta_ax = fig.add_subplot(grid[0, :len(budgets)]), fig.add_subplot(grid[0, len(budgets):])
    curve_axes = [fig.add_subplot(grid[1, 2 * i:2 * i + 2]) for i in range(len(budgets))]
    unit, skipped = every[0]['unit'], {}
    draw_finals(final_ax, groups, budgets, unit, floors, skipped)
    draw_deltas(delta_ax, groups, budgets, unit, baseline)
    for ax, b in zip(curve_axes, budgets):
        draw_curves(ax, groups, b, every, floors)
    fig.legend(*legend_entries(groups, floors, skipped), loc='center left', bbox_to_anchor=(1.0, 0.5),
               fontsize=8, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    return path


def trained_finals(runs):
    """The finals of a cell's complete runs, or [] for a cell that trained no step (its loss is the initial model's)."""
    return [] if untrained(runs) else [r['final'] for r in runs if r['complete']]


def draw_finals(ax, groups, budgets, unit, floors, skipped):
    """Final val loss against budget, a line per method; skipped gets {label: [budgets not drawn]}."""
    for label, by_budget in groups.items():
        points = []
        for b in budgets:
            finals = trained_finals(by_budget.get(b, []))
            if finals:
                points.append((b, *t_interval(finals)))
            elif untrained(by_budget.get(b, [])):
                skipped.setdefault(label, []).append(b)
        if points:
            xs, ms, hs = zip(*points)
            ax.errorbar(xs, ms, yerr=[0 if math.isnan(h) else h for h in hs], capsize=3, ms=4, label=label, **method_style(label))
    if floors:
        ax.axhline(floors['trigram'], ls=':', lw=0.8, color='grey')
    budget_axis(ax, budgets, unit)
    ax.set(ylabel='final val loss (nats/token)', title='final val loss: mean over seeds, 95% CI')


def draw_deltas(ax, groups, budgets, unit, baseline):
    """Each method's paired difference to the baseline against budget, a 95% CI bar each (filled where the
    table calls it better or worse), the methods spread a little sideways so that bars do not hide each other."""
    cells = paired_cells(groups, baseline)
    rows = sorted((label for label in groups if label != baseline and any((label, b) in cells for b in budgets)), key=method_rank)
    ax.axhline(0.0, color='black', lw=0.8)
    for i, label in enumerate(rows):
        shift = 2 ** (0.05 * (i - (len(rows) - 1) / 2))  # a multiplicative nudge: the budget axis is logarithmic
        for b in budgets:
            if (label, b) not in cells or untrained(groups[label][b]):
                continue
            delta, half, p, _ = cells[label, b]
            filled = not math.isnan(half) and p < 0.05 and (delta + half < 0 or delta - half > 0)
            ax.errorbar([b * shift], [delta], yerr=[0 if math.isnan(half) else half], capsize=3, ms=5, label=label,
                        mfc=method_colour(label) if filled else 'white', **method_style(label))
    if not rows:
        ax.text(0.5, 0.5, f"no paired runs of '{baseline}' to compare with", transform=ax.transAxes, ha='center')
    budget_axis(ax, budgets, unit)
    ax.set(ylabel=f'Δ final val loss vs {baseline} (nats/token)', title=f'paired difference to {baseline}: mean, 95% CI')


def budget_axis(ax, budgets, unit):
    """The budgets on a log axis (the sweep doubles them), each one ticked by its value."""
    ax.set_xscale('log')
    ax.set_xticks(budgets)
    ax.set_xticklabels([f'{b:g}' for b in budgets])
    ax.minorticks_off()
    ax.set_xlim(budgets[0] / 1.4, budgets[-1] * 1.4)
    ax.set_xlabel(f'budget ({unit_words(unit)})')


def draw_curves(ax, groups, b, every, floors):
    """Val loss against budget spent at budget b, a line per method (mean over seeds, shaded min-max) from
    the first eval every seed has: no extrapolation. Runs whose only eval is their final one (a short
    budget) are a point with its min-max bar; the step that spends the budget's last unit can end just past it."""
    x = 0 if all(r['evals'][-1][0] is not None for r in every) else 1  # RST when every run has it, else tokens
    right = b
    for label, by_budget in groups.items():
        runs = [r for r in by_budget.get(b, []) if r['complete'] and r['evals']]
        if not runs or untrained(runs):
            continue
        start, end = max(r['evals'][0][x] for r in runs), min(r['evals'][-1][x] for r in runs)
        right = max(right, end)
        if end <= start:
            finals = [r['final'] for r in runs]
            m = statistics.mean(finals)
            ax.errorbar([end], [m], yerr=[[m - min(finals)], [max(finals) - m]], capsize=3, label=label,
                        **{**method_style(label), 'ls': 'none'})
            continue
        grid = np.linspace(start, end, 60)
        ys = np.array([np.interp(grid, [e[x] for e in r['evals']], [e[2] for e in r['evals']]) for r in runs])
        ax.plot(grid, ys.mean(0), label=label, **{**method_style(label), 'marker': None})
        ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2, color=method_colour(label))
    if floors:
        ax.axhline(floors['trigram'], ls=':', lw=0.8, color='grey')
    unit = every[0]['unit']
    ax.set(title=f'budget {b:g} {unit.upper() if unit == "rst" else unit}: val loss as it is spent',
           xlabel=['RST spent (reference seconds)', 'tokens seen'][x], ylabel='val loss (nats/token)')
    if x == 0 and unit == 'rst':  # the panel spans its budget (and the last step's overshoot)
        ax.set_xlim(0, 1.03 * right)


def legend_entries(groups, floors, skipped):
    """(handles, labels) of the figure's one legend: every method in the lab's order (METHOD_ORDER, the others
    after it by name), then the marks."""
    from matplotlib.lines import Line2D
    entries = [(Line2D([], [], ms=4, **method_style(label)), label) for label in sorted(groups, key=method_rank)]
    entries += [(Line2D([], [], ls=' '), f"{label}: not drawn at budget {', '.join(f'{b:g}' for b in bs)}\n"
                                          '(trained no step: its costs before the first step exceed the budget)')
                for label, bs in skipped.items()]
    if floors:
        entries.append((Line2D([], [], ls=':', lw=0.8, color='grey'), f"trigram floor {floors['trigram']:.3f}"))
    entries.append((Line2D([], [], color='black', lw=0.8), 'Δ = 0: no difference to the baseline'))
    entries.append((Line2D([], [], ls=' ', marker='o', color='grey'), 'Δ filled: better or worse (95% CI off 0, Holm p < 0.05)'))
    entries.append((Line2D([], [], ls=' ', marker='o', color='grey', mfc='white'), 'Δ hollow: not resolved by the table'))
    return [h for h, _ in entries], [text for _, text in entries]
