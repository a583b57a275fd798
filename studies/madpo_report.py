"""The MADPO study's report: ceilings, rewards at matched KL and the arms' paired differences, read from the
runs' done.json.

Every stage of madpo.py ends with <folder>/done.json (its results, wall time and keys); a po run's holds its
curve of (KL, reward) points along training, the SFT reference's first (data/reviews/evaluate.py), each KL a
mean over the held-out prompts (one sample each) with its 95% half-width (kl_ci).

Reward at a matched KL k is read per arm, tier and seed from a fitted frontier: reward = a + b sqrt(KL), least
squares over that seed's checkpoints of every beta with KL <= 2k and the SFT point at KL 0 (once), read at k.
A seed is 'not reached' when no checkpoint has KL >= k, and 'skipped past' when it reached k but has no
checkpoint in [k, 2k] (the fit would extrapolate): never extrapolated. A fit is a trend through every
checkpoint near k, so an arm with more checkpoints below k gains nothing from them, as it did on the
running-maximum frontier (the best reward at a KL up to k, interpolated from the KL-0 point), still shown
for comparison. A table cell is the mean over seeds with a 95% t interval; a difference between two arms is
paired by seed (a seed fixes the SFT model, pairs, reward model and the held-out prompts), with its paired t
interval (studies.stats, the lab's one rule).

    python -m studies.madpo --stage=compare     # -> <out_dir>/compare.md and frontier_<tier>.png
"""
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import madpo
from configurator import require
from runs import first_difference
from data.loader import NUMBER, DataError, atomic_write_bytes, is_number, of_kind, read_result
from data.reviews.pairs import TIERS
from studies.stats import holm, paired_test, t_interval

DONE_FIX = 'delete it, or rerun that stage with --overwrite=True'
DONE_KEYS = {'rm': {'ceiling': NUMBER, 'acc': NUMBER}, 'po': {'method': str, 'config': dict, 'curve': list}}  # what is read back
WEIGHT_KEYS = {'mean': NUMBER, 'frac_amplified': NUMBER, 'histogram_0_to_2_by_0.2': list}  # madpo_weights.json


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


def load_curves(root):
    """{(method, tier, seed): [curve point, ...]} over every beta's finished po run under root; a point is a dict
    with kl, reward, n_eval (the prompts each is a mean over) and, where the run recorded it, kl_ci (the KL
    estimate's 95% half-width over the prompts)."""
    curves, runs = {}, {}
    for path in sorted(Path(root).glob('seed*/po_*/done.json')):
        run = read_result(path, DONE_KEYS['po'], DONE_FIX)
        points = all(isinstance(p, dict) and is_number(p.get('kl')) and is_number(p.get('reward')) for p in run['curve'])
        config = run['config']
        if not (points and config.get('tier') in TIERS and of_kind(config.get('seed'), int)
                and of_kind(config.get('n_eval', 1), int)):
            raise DataError(f'{path} is damaged (its config tier, seed and n_eval, or its curve of kl and reward points): '
                            f'{DONE_FIX}')
        key = (run['method'], run['config']['tier'], run['config']['seed'])
        curves.setdefault(key, []).extend({**p, 'n_eval': run['config'].get('n_eval')} for p in run['curve'])
        runs.setdefault(key[:2], []).append((path.parent, config))
    for (method, tier), arm in runs.items():
        check_arm(method, tier, arm)
    return curves


def check_arm(method, tier, arm):
    """One arm's frontiers take one run a seed and beta, all of one configuration (the keys that decide a po
    run, madpo.stage_keys): a folder copied, or a study resumed with other keys and fewer --betas (whose old
    runs stay), is refused naming both runs instead of merged into a frontier."""
    seen, first, base = {}, arm[0][0], shared_keys(arm[0][1])
    for folder, config in arm:
        run, keys = (config['seed'], config.get('beta')), shared_keys(config)
        if run in seen:
            raise DataError(f'{seen[run]} and {folder} are both {method} on the {tier} tier at seed {run[0]}, beta '
                            f'{run[1]}: an arm takes one run a seed and beta: remove one')
        seen[run] = folder
        clash = first_difference(base, keys)
        if clash:
            raise DataError(f'{first} and {folder} are both {method} on the {tier} tier but were run with other '
                            f'--{clash[0]} ({clash[1]!r}, {clash[2]!r}): an arm is one configuration: move the stale '
                            'runs out, or rerun them with these keys')


def shared_keys(config):
    """What decides a po run (madpo.stage_keys, read from its recorded config) but its seed and beta."""
    recorded = SimpleNamespace(**{**dict.fromkeys(sum(madpo.READS.values(), ())), **config})  # an older one: None
    return {k: v for k, v in madpo.stage_keys(recorded, 'po').items() if k not in ('seed', 'beta')}


def load_runs(root):
    """{(method, tier, seed): [(kl, reward), ...]} over every beta's finished po run under root."""
    return {key: [(p['kl'], p['reward']) for p in points] for key, points in load_curves(root).items()}


def matched_kl_cell(per_seed):
    """'mean ± CI (n)' over the seeds, or 'not reached (j/n)' when some seed's frontier stops short."""
    got = [r for r in per_seed if r is not None]
    if not per_seed:
        return '-'
    if len(got) < len(per_seed):
        return f'not reached ({len(got)}/{len(per_seed)})'
    mean, ci = t_interval(got)
    return f'{mean:.2f} ± {ci:.2f} ({len(got)})' if len(got) > 1 else f'{mean:.2f} (1 seed)'


def tier_table(corner, rows):
    """A markdown table of one row per (label, a cell per tier); rows with every cell '-' left out."""
    return (['', f'| {corner} | ' + ' | '.join(TIERS) + ' |', '|---' * (len(TIERS) + 1) + '|']
            + [f'| {label} | ' + ' | '.join(cells) + ' |' for label, cells in rows if set(cells) != {'-'}])


def matched_kl_table(curves, methods, kls):
    """The running-maximum reading at each matched KL: the earlier reader, kept for comparison."""
    lines = []
    for kl in kls:
        lines += ['', f'running-maximum reading at KL = {kl:g} nats (the earlier reader, for comparison: the best '
                      f'reward at a KL up to {kl:g}, interpolated linearly from the KL-0 point; mean ± 95% CI over seeds, (seeds))']
        lines += tier_table('method', [(method, [matched_kl_cell([reward_at_kl(pts, kl) for (m, t, _), pts in sorted(curves.items())
                                                                  if (m, t) == (method, tier)]) for tier in TIERS])
                                       for method in methods])
    return lines


# -----------------------------------------------------------------------------
# the fitted frontier: a trend through the checkpoints near the matched KL

NOT_REACHED, SKIPPED = 'not reached', 'skipped past'  # why a seed is not read at k: no checkpoint at KL >= k; none in [k, 2k]
PAIRS = (('madpo4', 'dpo'), ('madpo4', 'ipo'), ('madpo4_oracle', 'madpo4'),  # the paired differences: (arm, baseline)
         ('madpo4_tq0.5', 'madpo4'), ('madpo4_tq0.5', 'dpo'), ('madpo4_tq0.5', 'ipo'))


def fit_window(points, kl):
    """The (kl, reward) points a fit at kl uses: the SFT point at KL 0 once (every beta's curve opens with the
    same one) and the checkpoints with 0 < KL <= 2 kl."""
    return sorted({p for p in points if p[0] == 0}) + sorted(p for p in points if 0 < p[0] <= 2 * kl)


def fitted_frontier(points, kl):
    """(a, b) of reward = a + b sqrt(KL) fitted by least squares over fit_window(points, kl), or why the run is
    not read at kl: NOT_REACHED (no point at KL >= kl) or SKIPPED (no point in [kl, 2 kl]: the fit would
    extrapolate; also when the window holds a single KL, through which no curve is fixed)."""
    if not points or max(k for k, _ in points) < kl:
        return NOT_REACHED
    window = fit_window(points, kl)
    if max(k for k, _ in window) < kl or len({k for k, _ in window}) < 2:
        return SKIPPED
    x = np.sqrt([k for k, _ in window])
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), np.array([r for _, r in window]), rcond=None)
    return float(a), float(b)


def fitted_reward_at_kl(points, kl):
    """The fitted frontier's reward at kl, or why it is not read there (NOT_REACHED, SKIPPED)."""
    fit = fitted_frontier(points, kl)
    return fit if isinstance(fit, str) else fit[0] + fit[1] * math.sqrt(kl)


def seed_reads(curves, kl):
    """{(method, tier, seed): (reward at kl, the fit's slope d reward / d KL there, the 95% half-width of the
    KL estimate of the checkpoint nearest kl, None where not recorded), or the reason string} from load_curves."""
    reads = {}
    for key, points in curves.items():
        fit = fitted_frontier([(p['kl'], p['reward']) for p in points], kl)
        if isinstance(fit, str):
            reads[key] = fit
            continue
        nearest = min((p for p in points if p['kl'] > 0), key=lambda p: abs(p['kl'] - kl))
        reads[key] = (fit[0] + fit[1] * math.sqrt(kl), fit[1] / (2 * math.sqrt(kl)), nearest.get('kl_ci'))
    return reads


def of_cell(reads, method, tier):
    """{seed: read} of one arm and tier."""
    return {s: r for (m, t, s), r in sorted(reads.items()) if (m, t) == (method, tier)}


def fitted_cell(per_seed):
    """'mean ± CI (n)' over the seeds, or how many seeds were read and why the others were not."""
    got = [r[0] for r in per_seed if not isinstance(r, str)]
    if len(got) == len(per_seed):
        return matched_kl_cell(got)
    why = Counter(r for r in per_seed if isinstance(r, str))
    return f'{len(got)}/{len(per_seed)} read (' + ', '.join(f'{n} {w}' for w, n in sorted(why.items())) + ')'


def kl_error_cell(per_seed):
    """'±h → ±dr': the KL estimate's 95% half-width at the matched KL and the reward the fit moves across it
    (|slope| x h), means over the seeds read."""
    got = [r for r in per_seed if not isinstance(r, str) and r[2] is not None]
    if not got:
        return '-'
    return f'±{np.mean([h for _, _, h in got]):.2f} → ±{np.mean([abs(s) * h for _, s, h in got]):.2f}'


def paired_read(mine, base):
    """mine - base over the seeds both arms were read on ({seed: read}): (mean, 95% half-width, p of the paired t
    test, seeds), or why it is not read: '-' (neither has the cell) or 'not read (seeds read / seeds)'."""
    both = mine.keys() & base.keys()
    seeds = sorted(s for s in both if not isinstance(mine[s], str) and not isinstance(base[s], str))
    if len(seeds) < 2:  # no interval from one pair
        return f'not read ({len(seeds)}/{len(both)} seeds)' if both else '-'
    return (*paired_test([mine[s][0] for s in seeds], [base[s][0] for s in seeds]), len(seeds))


def paired_cell(read, p_holm):
    """A paired_read as 'better'/'worse' only where its 95% CI excludes 0 and its Holm-adjusted p (over every
    paired difference of the report) is below 0.05, else 'not resolved (±half-width)'."""
    if isinstance(read, str):
        return read
    d, half, _, n = read
    if abs(d) > half and p_holm < 0.05:
        return f"{'better' if d > 0 else 'worse'}: {d:+.2f} ± {half:.2f}, Holm p {p_holm:.3f} ({n})"
    return f'not resolved (±{half:.2f}): {d:+.2f}, Holm p {p_holm:.3f} ({n})'


def paired_family(curves, pairs, kls):
    """{(kl, arm, baseline, tier): paired cell} for every paired difference at every matched KL, with Holm's
    adjustment over all of them: one family, so reading many differences does not make one of them a finding."""
    reads = {(kl, a, b, t): paired_read(of_cell(at, a, t), of_cell(at, b, t))
             for kl in kls for at in [seed_reads(curves, kl)] for a, b in pairs for t in TIERS}
    tested = [k for k, r in reads.items() if not isinstance(r, str)]
    adjusted = dict(zip(tested, holm([reads[k][2] for k in tested])))
    return {k: paired_cell(r, adjusted.get(k)) for k, r in reads.items()}


def fitted_tables(curves, methods, kls, n_eval):
    """At each matched KL: the fitted reading per arm and tier, the KL's own sampling error there, and the
    paired differences of PAIRS (curves: load_curves; n_eval: the prompts each KL is a mean over)."""
    lines, pairs = [], [(a, b) for a, b in PAIRS if a in methods and b in methods]
    cells = paired_family(curves, pairs, kls)
    for kl in kls:
        reads = seed_reads(curves, kl)
        lines += ['', f'reward at KL = {kl:g} nats, fitted frontier: per seed, reward = a + b sqrt(KL) fitted to the '
                      f'checkpoints of every beta with KL <= {2 * kl:g} and the SFT point at KL 0, read at {kl:g} '
                      f'(mean ± 95% CI over seeds, (seeds); a seed is {NOT_REACHED} without a checkpoint at KL >= {kl:g}, '
                      f'{SKIPPED} without one in [{kl:g}, {2 * kl:g}]: never extrapolated)']
        lines += tier_table('method', [(m, [fitted_cell(list(of_cell(reads, m, t).values())) for t in TIERS]) for m in methods])
        lines += ['', f'the KL\'s sampling error at {kl:g} nats, shown and carried along the fit, not added to the '
                      f'intervals: ±h → ±dr, the 95% half-width of the KL estimate ({n_eval} prompts, one sample each) '
                      f'of the checkpoint nearest {kl:g} and the reward the fit moves across it (slope x h), means over the '
                      f'seeds read. A seed\'s checkpoints share its prompts, so their KL errors move together; each seed '
                      f'has its own, so the intervals over seeds above and below already carry this error']
        lines += tier_table('method', [(m, [kl_error_cell(list(of_cell(reads, m, t).values())) for t in TIERS]) for m in methods])
        if pairs:
            lines += ['', f'paired differences at KL = {kl:g} nats, fitted frontier: mean over seeds of arm - baseline with '
                          f'its paired t 95% CI, over the seeds both were read on, (seeds); better or worse only where the '
                          f'CI excludes 0 and the p of the paired t test, Holm-adjusted over every paired difference of '
                          f'this report ({len(pairs)} pairs x {len(kls)} KLs x the tiers read), is below 0.05']
            lines += tier_table('arm - baseline', [(f'{a} - {b}', [cells[(kl, a, b, t)] for t in TIERS]) for a, b in pairs])
    return lines


def weight_table(root):
    """Per MADPO arm and tier: what its weights did to the training pairs (madpo_weights.json, the same for every
    beta of a seed: each seed counted once): tau, the fractions damped (w < 1) and amplified (w > 1), and the
    histogram of w in bins of 0.2 over [0, 2), as fractions of the pairs; means over the seeds."""
    per = {}
    for path in sorted(Path(root).glob('seed*/po_madpo*/madpo_weights.json')):
        arm, tier = path.parent.name[len('po_'):].split('_b')[0], path.parent.name.rsplit('_', 1)[1]
        per.setdefault((arm, tier), {}).setdefault(path.parent.parent.name, read_result(path, WEIGHT_KEYS, DONE_FIX))
    if not per:
        return []
    bins = [f'{0.2 * i:.1f}-{0.2 * (i + 1):.1f}' for i in range(10)]
    lines = ['', 'MADPO\'s weights w(m) on the training pairs (means over the seeds, each seed once; a run from before '
                 'tau and the damped fraction were recorded shows -): tau, the fraction of pairs damped (w < 1) and '
                 'amplified (w > 1), and the histogram of w as fractions of the pairs',
             '', '| arm | tier | seeds | tau | damped | amplified | ' + ' | '.join(bins) + ' |', '|---' * (6 + len(bins)) + '|']
    for (arm, tier), seeds in sorted(per.items()):
        runs = list(seeds.values())
        mean = lambda k: f'{np.mean([r[k] for r in runs]):.3f}' if all(k in r for r in runs) else '-'
        hist = np.mean([np.array(r['histogram_0_to_2_by_0.2']) / sum(r['histogram_0_to_2_by_0.2']) for r in runs], 0)
        lines.append(f'| {arm} | {tier} | {len(runs)} | {mean("tau")} | {mean("frac_damped")} | {mean("frac_amplified")} | '
                     + ' | '.join(f'{h:.2f}' for h in hist) + ' |')
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
    """Ceilings and reward-model accuracies per tier; per matched KL the fitted reading per arm and tier, the
    KL's sampling error and the paired differences; the running-maximum reading; wall time per stage. As
    markdown; writes nothing."""
    root = Path(root)
    curves = load_curves(root)
    require(curves or list(root.glob('seed*/rm_*/done.json')), f'no finished rm or po run under {root}/seed*/: run those stages first')
    methods = methods_of(curves, arms)
    n_eval = '/'.join(str(n) for n in sorted({p['n_eval'] for pts in curves.values() for p in pts}, key=str))
    lines = [f'po runs of seeds {sorted({s for _, _, s in curves})}; the SFT reference scores at KL 0'] + ceiling_table(root)
    lines += weight_table(root)
    lines += fitted_tables(curves, methods, kls, n_eval)
    lines += matched_kl_table({key: [(p['kl'], p['reward']) for p in pts] for key, pts in curves.items()}, methods, kls)
    walls = {}
    for p in root.glob('seed*/*/done.json'):
        walls.setdefault(p.parent.name.split('_')[0], []).append(read_result(p, {'wall_s': NUMBER}, DONE_FIX)['wall_s'])
    lines += ['', 'wall time per stage run (s, mean, runs): '
              + ', '.join(f'{k} {np.mean(v):.0f} (x{len(v)})' for k, v in sorted(walls.items()))]
    return '\n'.join(lines)
