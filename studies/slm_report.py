"""The Rho-1 SLM study's report (python -m studies.slm --stage=compare): what each run's eval.json and
curve.jsonl under the study's folder say, over seeds.

  compare.md           one row per (noise, arm): held-out exact match, trap exact match, clean val loss,
                       the selection rate of each token kind, and the tokens the arm needs to reach CLM's
                       final exact match at the same noise, with Rho-1's ratio (CLM's whole budget over
                       those tokens) and the paired ratio (per seed, CLM's own tokens to that value over
                       the arm's); CLM's row gives the tokens it needed to reach its own final value
                       (where it plateaued); the reference model's row first
                       and, where the checkpoints are here, the clean val loss of each byte of a line per
                       arm at the study's noise: which part of the task a model has not learned
  compare_curves.png   exact match against training tokens per arm, one panel per noise level, mean and
                       95% CI band over seeds (if matplotlib is installed)
Every interval is the t-based 95% CI over seeds (studies.stats.t_interval, the lab's one rule); a run whose
curve never reaches the target counts in "reached" and is left out of the tokens' mean.
"""
import math
from pathlib import Path

from data.loader import NUMBER, DataError, read_result
from data.mathmix.prepare import KINDS, LINE_BYTES
from slm import POINT_KEYS, read_curve
from studies.stats import crossing, t_interval

ORDER = ('oracle', 'clm', 'excess', 'reference', 'train', 'random')  # then by k
SCORE_KEYS = {**POINT_KEYS, 'trap_accuracy': NUMBER, 'val_loss_clean': NUMBER}
ARM_KEYS = {**SCORE_KEYS, 'noise': NUMBER, 'arm': str, 'seed': int, 'selection': dict}  # an arm's eval.json
REF_KEYS = {**SCORE_KEYS, 'ref_ckpt_sha256': str}  # the reference's eval.json
RESULT_FIX = 'delete it and rerun the study (a finished run only writes it again)'
REF_FIX = 'delete it: the study (python -m studies.slm) measures the reference again'


def cell(values, fmt='.3f'):
    if not values:
        return '-'
    mean, half = t_interval(values)
    return f'{mean:{fmt}}' + ('' if math.isnan(half) else f' ± {half:{fmt}}')  # one seed: no interval


def load_runs(root):
    """{(noise, arm): [eval.json with its curve points]}, in table order."""
    groups = {}
    for path in sorted(Path(root).glob('noise*/*/eval.json')):
        run = read_result(path, ARM_KEYS, RESULT_FIX)
        if run['arm'].split('_')[0] not in ORDER:
            raise DataError(f"{path} is damaged (arm {run['arm']!r} is none of {', '.join(ORDER)}): {RESULT_FIX}")
        run['curve'] = read_curve(path.parent / 'curve.jsonl')
        groups.setdefault((run['noise'], run['arm']), []).append(run)
    key = lambda g: (-g[0], ORDER.index(g[1].split('_')[0]), g[1])  # noqa: E731
    return {g: groups[g] for g in sorted(groups, key=key)}


def tokens_to_reach(run, target):
    """Training tokens at the first eval where exact match >= target (interpolated), or None."""
    return crossing([(p['tokens'], -p['accuracy']) for p in run['curve']], -target)


def clm_cells(clm_runs):
    """CLM's own row: the tokens each seed needed to first reach its final exact match (where it
    plateaued: the rest of its budget did not raise it)."""
    tokens = [tokens_to_reach(r, r['accuracy']) for r in clm_runs]
    return [f'{len(tokens)}/{len(clm_runs)}', cell([t / 1e3 for t in tokens], '.0f') + 'k', '-', '-']


def match_cells(runs, clm_runs):
    """Tokens to reach CLM's mean final exact match over the seeds that did; Rho-1's ratio (CLM's whole
    budget over those tokens); and the paired ratio: per seed, the tokens CLM needed to reach that value
    over the arm's (a CLM that plateaus early makes Rho-1's ratio large for any arm, this one not)."""
    if not clm_runs:
        return ['-'] * 4
    target = sum(r['accuracy'] for r in clm_runs) / len(clm_runs)
    reached = {r['seed']: tokens_to_reach(r, target) for r in runs}
    tokens = [t for t in reached.values() if t is not None]
    clm_tokens = {r['seed']: tokens_to_reach(r, target) for r in clm_runs}
    paired = [clm_tokens[s] / max(t, 1.0) for s, t in reached.items() if t is not None and clm_tokens.get(s) is not None]
    return [f'{len(tokens)}/{len(runs)}', cell([t / 1e3 for t in tokens], '.0f') + 'k' if tokens else '-',
            cell([clm_runs[0]['tokens'] / max(t, 1.0) for t in tokens], '.2f'), cell(paired, '.2f')]


def table(groups, ref):
    cols = ['noise', 'arm', 'seeds', 'exact match', 'trap exact match', 'clean val loss',
            *[f'sel {k}' for k in KINDS], 'reached CLM', 'tokens to CLM final', 'CLM budget / tokens (Rho-1)',
            'CLM tokens / tokens (paired)']
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    if ref:
        lines.append(f"| - | reference (clean data, {ref['tokens'] / 1e6:.2f}M tokens) | 1 | {ref['accuracy']:.3f} | "
                     f"{ref['trap_accuracy']:.3f} | {ref['val_loss_clean']:.4f} |" + ' - |' * (len(KINDS) + 4))
    for (noise, arm), runs in groups.items():
        sel = [cell([r['selection'][k] for r in runs if k in r['selection']]) for k in KINDS]
        match = match_cells(runs, groups.get((noise, 'clm'), [])) if arm != 'clm' else clm_cells(runs)
        row = [f'{noise:g}', arm, str(len(runs)), cell([r['accuracy'] for r in runs]),
               cell([r['trap_accuracy'] for r in runs]), cell([r['val_loss_clean'] for r in runs], '.4f'), *sel, *match]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def line_table(line_losses, noise):
    """line_losses: {model: [{byte: loss} per seed]} -> the per-byte table (mean over seeds)."""
    lines = [f'clean val loss of each byte of a line `ab+cd=` units tens (final checkpoints; arms at noise {noise:g}; '
             'mean over seeds)', '', '| model | seeds | ' + ' | '.join(LINE_BYTES) + ' |', '|' + '---|' * (len(LINE_BYTES) + 2)]
    for name, per_seed in line_losses.items():
        means = [sum(seed[b] for seed in per_seed) / len(per_seed) for b in LINE_BYTES]
        lines.append(f'| {name} | {len(per_seed)} | ' + ' | '.join(f'{m:.3f}' for m in means) + ' |')
    return '\n'.join(lines)


def report(root, noise, k, line_losses=None):
    """compare.md and the curves from every finished run under root (line_losses: line_table's input, or
    None); returns the text."""
    text = report_text(root, noise, k, line_losses)
    print(text)
    (Path(root) / 'compare.md').write_text(text + '\n')
    plot_curves(Path(root), load_runs(root))
    return text


def report_text(root, noise, k, line_losses=None):
    """The study's tables from every finished run under root, as markdown; writes nothing."""
    root, groups = Path(root), load_runs(root)
    if not groups:
        raise DataError(f'no finished runs under {root}: run `python -m studies.slm` first')
    ref_path = root / 'ref' / 'eval.json'
    ref = read_result(ref_path, REF_KEYS, REF_FIX) if ref_path.exists() else None
    text = (f'mathmix held-out exact match after the budget, mean ± 95% CI over seeds (t); arms at noise {noise:g} '
            f'select k = {k:g} of each batch\'s tokens\n\n' + table(groups, ref))
    if line_losses:
        text += '\n\n' + line_table(line_losses, noise)
    return text


def plot_curves(root, groups):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return print('(matplotlib is not installed: no curves plot; the table above has the figures)')
    levels = sorted({noise for noise, _ in groups}, reverse=True)
    fig, axes = plt.subplots(1, len(levels), figsize=(5.5 * len(levels), 4), squeeze=False)
    for ax, level in zip(axes[0], levels):
        for (noise, arm), runs in groups.items():
            if noise != level:
                continue
            n = min(len(r['curve']) for r in runs)  # the same eval steps in every seed
            x = [runs[0]['curve'][i]['tokens'] for i in range(n)]
            stats = [t_interval([r['curve'][i]['accuracy'] for r in runs]) for i in range(n)]
            mean = [m for m, _ in stats]
            half = [0.0 if math.isnan(h) else h for _, h in stats]
            ax.plot(x, mean, label=f'{arm} ({len(runs)})')
            ax.fill_between(x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2)
        ax.set(title=f'noise {level:g}', xlabel='training tokens', ylabel='held-out exact match', ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.savefig(root / 'compare_curves.png', dpi=110, bbox_inches='tight')
    print(f"wrote {root / 'compare_curves.png'}")
