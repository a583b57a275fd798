"""Readings of a No Train No Gain table across its budgets: time to target (AlgoPerf's question turned
around: how much budget a method needs to reach the fully decayed baseline's loss, from each seed's
endpoints at every budget) and the cost-table sensitivity (which cells change sign when one RST cost
entry is off by 10%). studies/compare.py prints both under its table.
"""
import collections
import itertools
import math
import statistics

import numpy as np

from studies.stats import crossing, finals_by_seed, paired_cells, t_interval


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
        paired = paired_speedup(per_seed.get(baseline, {}), per_seed[label]) if label != baseline else '—'
        lines.append(f"| {label} | {f'{median:.1f}' if math.isfinite(median) else 'not reached'} | {reached}/{n}{notes} "
                     f"| {speed} | {paired} |")
    return '\n'.join(lines)


def paired_speedup(base, mine):
    """The geometric mean over paired seeds of baseline time / method time, with a t-based 95% CI on the log
    ratios: a method's speedup carries its interval. Needs every paired seed to reach the target."""
    seeds = sorted(base.keys() & mine.keys())
    if not seeds:
        return '—'
    if all(math.isfinite(base[s]) and not math.isfinite(mine[s]) for s in seeds):
        return f'slower: none of its {len(seeds)} paired seeds reached it'
    if not all(math.isfinite(base[s]) and math.isfinite(mine[s]) for s in seeds):
        return 'not resolved (a seed never reached it)'
    m, half = t_interval([math.log(base[s] / mine[s]) for s in seeds])
    ci = f' [{math.exp(m - half):.2f}, {math.exp(m + half):.2f}]' if math.isfinite(half) else ' (one pair)'
    return f'{math.exp(m):.2f}x{ci} (n={len(seeds)})'


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
