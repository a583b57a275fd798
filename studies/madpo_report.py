"""The MADPO study's report: ceilings, frontiers and rewards at matched KL, read from the runs' done.json.

Every stage of madpo.py ends with <folder>/done.json (its results, wall time and keys); a po run's holds its
curve of (KL, reward) points along training, the SFT reference's first (data/reviews/evaluate.py).

A method's frontier in one tier and seed is the upper-left boundary of its points over every beta and
checkpoint: the best reward measured at a KL up to k. Reward at a matched KL k is read on it by linear
interpolation between frontier points (flat after its best point), and is 'not reached' when no point of
the method has KL >= k: no extrapolation. A table cell is the mean over seeds with a 95% t interval
(studies.stats, the lab's one rule).

    python -m studies.madpo --stage=compare     # -> <out_dir>/compare.md and frontier_<tier>.png
"""
from pathlib import Path

import numpy as np

from configurator import require
from data.loader import NUMBER, DataError, atomic_write_bytes, read_result
from data.reviews.pairs import TIERS
from studies.stats import t_interval

DONE_FIX = 'delete it, or rerun that stage with --overwrite=True'
DONE_KEYS = {'rm': {'ceiling': NUMBER, 'acc': NUMBER}, 'po': {'method': str, 'config': dict, 'curve': list}}  # what is read back


def read_done(path, stage):
    """A stage's done.json, or one line naming a damaged one and the fix."""
    return read_result(path, {'wall_s': NUMBER, 'config': dict, **DONE_KEYS.get(stage, {})}, DONE_FIX)


# -----------------------------------------------------------------------------
# frontiers and matched KL

def frontier(points):
    """The (kl, reward) points that no point with a KL as small or smaller beats, by increasing KL."""
    front = []
    for kl, r in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or r > front[-1][1]:
            front.append((kl, r))
    return front


def reward_at_kl(points, kl):
    """The frontier's reward at this KL (linear interpolation), or None when no point reaches the KL."""
    if not points or kl > max(k for k, _ in points):
        return None
    xs, ys = zip(*frontier(points))
    return float(np.interp(kl, xs, ys))


def load_runs(root):
    """{(method, tier, seed): [(kl, reward), ...]} over every beta's finished po run under root."""
    curves = {}
    for path in sorted(Path(root).glob('seed*/po_*/done.json')):
        run = read_result(path, DONE_KEYS['po'], DONE_FIX)
        points = all(isinstance(p, dict) and isinstance(p.get('kl'), NUMBER) and isinstance(p.get('reward'), NUMBER)
                     for p in run['curve'])
        if not (points and run['config'].get('tier') in TIERS and isinstance(run['config'].get('seed'), int)):
            raise DataError(f'{path} is damaged (its config tier and seed, or its curve of kl and reward points): {DONE_FIX}')
        key = (run['method'], run['config']['tier'], run['config']['seed'])
        curves.setdefault(key, []).extend((p['kl'], p['reward']) for p in run['curve'])
    return curves


def matched_kl_cell(per_seed):
    """'mean ± CI (n)' over the seeds, or 'not reached (j/n)' when some seed's frontier stops short."""
    got = [r for r in per_seed if r is not None]
    if not per_seed:
        return '-'
    if len(got) < len(per_seed):
        return f'not reached ({len(got)}/{len(per_seed)})'
    mean, ci = t_interval(got)
    return f'{mean:.2f} ± {ci:.2f} ({len(got)})' if len(got) > 1 else f'{mean:.2f} (1 seed)'


def matched_kl_table(curves, methods, kls):
    lines = []
    for kl in kls:
        lines += ['', f'reward at KL = {kl:g} nats (mean ± 95% CI over seeds, (seeds))', '',
                  '| method | ' + ' | '.join(TIERS) + ' |', '|---' * (len(TIERS) + 1) + '|']
        for method in methods:
            cells = [matched_kl_cell([reward_at_kl(pts, kl) for (m, t, _), pts in sorted(curves.items())
                                      if (m, t) == (method, tier)]) for tier in TIERS]
            if set(cells) != {'-'}:
                lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    return lines


def ceiling_table(root):
    """Per tier, over the seeds' rm runs: the Bradley-Terry ceiling, the oracle's accuracy on the same
    held-out labels, and the trained reward model's accuracy against the labels, the true order and in
    expectation over label draws (pairs.expected_accuracy: the gap to the ceiling without label noise)."""
    rows = {'ceiling': 'BT ceiling (expected)', 'oracle_acc': 'oracle on the labels', 'acc': 'RM acc vs labels',
            'true_acc': 'RM acc vs true order', 'gap': 'ceiling - RM acc', 'expected_acc': 'RM expected acc',
            'expected_gap': 'ceiling - RM expected acc'}
    lines = ['', '| held-out pairs | ' + ' | '.join(TIERS) + ' |', '|---' * (len(TIERS) + 1) + '|']
    runs = {t: [read_result(p, DONE_KEYS['rm'], DONE_FIX) for p in sorted(Path(root).glob(f'seed*/rm_{t}/done.json'))]
            for t in TIERS}
    for run in (r for tier_runs in runs.values() for r in tier_runs):
        run['gap'] = run['ceiling'] - run['acc']
        if 'expected_acc' in run:  # not in runs from before the key
            run['expected_gap'] = run['ceiling'] - run['expected_acc']
    for key, label in rows.items():
        cells = []
        for tier in TIERS:
            xs = [r[key] for r in runs[tier] if key in r]
            cells.append(f'{np.mean(xs):.3f} ({len(xs)})' if xs else '-')
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return lines


def plot_frontiers(curves, methods, out_dir):
    """One figure per tier: each method's frontier, averaged over the seeds that reach each KL, over its
    raw points (every beta, checkpoint and seed). Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no frontier figures (pip install matplotlib)')
        return
    for tier in [t for t in TIERS if any(key[1] == t for key in curves)]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, method in enumerate(methods):
            seeds = [pts for (m, t, _), pts in curves.items() if (m, t) == (method, tier)]
            if not seeds:
                continue
            ax.scatter(*zip(*[p for pts in seeds for p in pts]), s=4, alpha=0.25, color=f'C{i}')
            grid = np.linspace(0, min(max(k for k, _ in pts) for pts in seeds), 50)
            ax.plot(grid, [np.mean([reward_at_kl(pts, k) for pts in seeds]) for k in grid], color=f'C{i}', label=method)
        ax.set(xlabel='KL to SFT (nats per sequence)', ylabel='mean ground-truth reward', title=f'{tier} tier')
        ax.legend(fontsize=6)
        fig.savefig(Path(out_dir) / f'frontier_{tier}.png', dpi=120, bbox_inches='tight')
        plt.close(fig)
        print(f'wrote {Path(out_dir) / f"frontier_{tier}.png"}')


def compare(root, arms, kls):
    """report(), printed and written to root/compare.md, and the frontier figures. Returns the text."""
    root = Path(root)
    text = report(root, arms, kls)
    print(text)
    atomic_write_bytes(root / 'compare.md', (text + '\n').encode())
    curves = load_runs(root)
    plot_frontiers(curves, methods_of(curves, arms), root)
    return text


def methods_of(curves, arms):
    return list(arms) + sorted({m for m, _, _ in curves} - set(arms))  # the arms first, then any other method found


def report(root, arms, kls):
    """Ceilings and reward-model accuracies per tier, reward at matched KL per method and tier, wall time
    per stage, as markdown; writes nothing."""
    root = Path(root)
    curves = load_runs(root)
    require(curves or list(root.glob('seed*/rm_*/done.json')), f'no finished rm or po run under {root}/seed*/: run those stages first')
    methods = methods_of(curves, arms)
    lines = [f'po runs of seeds {sorted({s for _, _, s in curves})}; the SFT reference scores at KL 0'] + ceiling_table(root)
    lines += matched_kl_table(curves, methods, kls)
    walls = {}
    for p in root.glob('seed*/*/done.json'):
        walls.setdefault(p.parent.name.split('_')[0], []).append(read_result(p, {'wall_s': NUMBER}, DONE_FIX)['wall_s'])
    lines += ['', 'wall time per stage run (s, mean, runs): '
              + ', '.join(f'{k} {np.mean(v):.0f} (x{len(v)})' for k, v in sorted(walls.items()))]
    return '\n'.join(lines)
