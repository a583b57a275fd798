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
  control.md           the coin control's report (python -m studies.slm control; control_report): per arm
                       (clm, SLM, slm_coin_control at one noise and k) the runs that failed, with exact
                       intervals and Fisher's exact test, the tokens to 50% non-trap exact match paired by
                       seed, and the selection rate and mean excess loss of each byte role
Every interval of a mean is the t-based 95% CI over seeds (studies.stats.t_interval, the lab's one rule); a
run whose curve never reaches the target counts in "reached" and is left out of the tokens' mean. A count
of failed runs gets the exact (Clopper-Pearson) interval instead: a proportion of 10 is not a t mean.
"""
import math
import re
from pathlib import Path

from data.loader import NUMBER, DataError, is_number, read_result
from data.mathmix.prepare import EVAL_PAIRS, KINDS, LINE_BYTES, OPERANDS, ROLES, TRAP_DIGIT
from slm import POINT_KEYS, arm_name, read_curve
from runs import MAY_CHANGE_ON_RESUME, first_difference
from studies.stats import clopper_pearson, crossing, fisher_one_sided, holm, paired_test, t_interval

ORDER = ('oracle', 'clm', 'excess', 'slm_coin_control', 'reference', 'train', 'random')  # then by k
SCORE_KEYS = {**POINT_KEYS, 'trap_accuracy': NUMBER, 'val_loss_clean': NUMBER}
ARM_KEYS = {**SCORE_KEYS, 'noise': NUMBER, 'arm': str, 'seed': int, 'selection': dict}  # an arm's eval.json
REF_KEYS = {**SCORE_KEYS, 'ref_ckpt_sha256': str}  # the reference's eval.json
RESULT_FIX = 'delete it and rerun the study (a finished run only writes it again)'
REF_FIX = 'delete it: the study (python -m studies.slm) measures the reference again'


def family(arm):
    """An arm's name without its k: excess_k60 -> excess, slm_coin_control_k60 -> slm_coin_control."""
    return re.sub(r'_k\d+$', '', arm)


def cell(values, fmt='.3f'):
    if not values:
        return '-'
    mean, half = t_interval(values)
    return f'{mean:{fmt}}' + ('' if math.isnan(half) else f' ± {half:{fmt}}')  # one seed: no interval


def load_runs(root):
    """{(noise, arm): [eval.json with its curve points]}, in table order; each row one run a seed, all of one
    configuration (check_row)."""
    groups, folders = {}, {}
    for path in sorted(Path(root).glob('noise*/*/eval.json')):
        run = read_result(path, ARM_KEYS, RESULT_FIX)
        if not all(is_number(v) for v in run['selection'].values()):
            raise DataError(f"{path} is damaged (its selection rates are not all numbers): {RESULT_FIX}")
        if family(run['arm']) not in ORDER:
            raise DataError(f"{path} is damaged (arm {run['arm']!r} is none of {', '.join(ORDER)}): {RESULT_FIX}")
        run['curve'] = read_curve(path.parent / 'curve.jsonl')
        groups.setdefault((run['noise'], run['arm']), []).append(run)
        folders.setdefault((run['noise'], run['arm']), []).append(path.parent)
    for g in groups:
        check_row(g, groups[g], folders[g])
    key = lambda g: (-g[0], ORDER.index(family(g[1])), g[1])  # noqa: E731
    return {g: groups[g] for g in sorted(groups, key=key)}


PER_RUN = {'seed', 'run_dir', *MAY_CHANGE_ON_RESUME}  # the keys one arm's runs may differ in (compare's rule)


def check_row(row, runs, folders):
    """A row averages one run a seed, all of one configuration: a folder copied, or a study resumed with other
    keys and fewer seeds (whose old runs stay), is refused naming both runs instead of averaged in."""
    (noise, arm), first = row, {}
    for run, folder in zip(runs, folders):
        if run['seed'] in first:
            raise DataError(f"{first[run['seed']][1]} and {folder} are both {arm} at noise {noise:g}, seed {run['seed']}: "
                            'a row takes one run a seed: remove one')
        first[run['seed']] = run, folder
    (base, base_folder), config = next(iter(first.values())), lambda r: r.get('run_config') or {}  # noqa: E731
    for run, folder in zip(runs, folders):
        clash = first_difference(config(base), config(run), PER_RUN)
        if clash:
            raise DataError(f'{base_folder} and {folder} are both {arm} at noise {noise:g} but were run with other '
                            f'--{clash[0]} ({clash[1]!r}, {clash[2]!r}): a row averages one configuration: move the '
                            'stale runs out, or rerun them with these keys')


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


# -----------------------------------------------------------------------------
# the coin control's report (python -m studies.slm control): failures, tokens to a target, byte roles

FAIL_BELOW = 0.5  # a run failed (never learned the units digit) when its exact match never reached this: the
                  # study's --gate_oracle default. On 2026-11-30 the failed SLM runs ended at 0.07 and 0.10, every
                  # other at >= 0.886 (CLM's: every non-trap sum right, every trap sum wrong)
NONTRAP_TARGET = 0.5  # the tokens to reach this exact match on the non-trap problems
N_TRAP = sum((a + b) % 10 == TRAP_DIGIT for a, b in EVAL_PAIRS)  # eval.jsonl holds exactly EVAL_PAIRS
ONE_SIDED = (('excess', 'slm_coin_control'), ('excess', 'clm'))  # does the first fail more often than the second?
PAIRED = (('excess', 'clm'), ('slm_coin_control', 'clm'), ('slm_coin_control', 'excess'))  # first minus second


def nontrap_accuracy(point):
    """Exact match on the non-trap problems, from the point's overall and trap exact match."""
    n = len(EVAL_PAIRS)
    return (point['accuracy'] * n - point['trap_accuracy'] * N_TRAP) / (n - N_TRAP)


def failed(run):
    return max(p['accuracy'] for p in run['curve']) < FAIL_BELOW


def tokens_to_nontrap(run, target=NONTRAP_TARGET):
    """Training tokens at the first eval where non-trap exact match >= target (interpolated), or None."""
    return crossing([(p['tokens'], -nontrap_accuracy(p)) for p in run['curve']], -target)


def control_groups(root, noise, k):
    """{'clm' | 'excess' | 'slm_coin_control': [runs]} at noise (the arms that ran)."""
    groups = load_runs(root)
    names = {'clm': arm_name('excess', 1.0), 'excess': arm_name('excess', k),
             'slm_coin_control': arm_name('excess', k, 'coin_control')}
    return {arm: groups[noise, name] for arm, name in names.items() if (noise, name) in groups}


def failure_table(groups):
    lines = [f'failed runs (exact match never >= {FAIL_BELOW:g}), exact 95% interval (Clopper-Pearson)', '',
             '| arm | runs | failed | rate | 95% CI |', '|---|---|---|---|---|']
    count = {arm: (sum(map(failed, runs)), len(runs)) for arm, runs in groups.items()}
    for arm, (x, n) in count.items():
        lo, hi = clopper_pearson(x, n)
        lines.append(f'| {arm} | {n} | {x} | {x / n:.3f} | [{lo:.3f}, {hi:.3f}] |')
    tests = [(a, b) for a, b in ONE_SIDED if a in count and b in count]
    p = [fisher_one_sided(*count[a], *count[b]) for a, b in tests]
    lines += ['', "Fisher's exact test, one-sided (the first arm fails more often), Holm over the tests", '',
              '| test | failed | p | p (Holm) |', '|---|---|---|---|']
    lines += [f'| {a} > {b} | {count[a][0]}/{count[a][1]} vs {count[b][0]}/{count[b][1]} | {q:.4f} | {h:.4f} |'
              for (a, b), q, h in zip(tests, p, holm(p))]
    return '\n'.join(lines)


def tokens_table(groups):
    tokens = {arm: {r['seed']: tokens_to_nontrap(r) for r in runs} for arm, runs in groups.items()}
    lines = [f'tokens to {NONTRAP_TARGET:g} non-trap exact match (thousands; mean ± 95% CI over the seeds that '
             'reached it)', '', '| arm | reached | tokens |', '|---|---|---|']
    for arm, by_seed in tokens.items():
        reached = [t / 1e3 for t in by_seed.values() if t is not None]
        lines.append(f'| {arm} | {len(reached)}/{len(by_seed)} | {cell(reached, ".0f")} |')
    lines += ['', 'paired by seed (the seeds where both reached it): first minus second, thousands of tokens', '',
              '| pair | seeds | difference | p (paired t) |', '|---|---|---|---|']
    for a, b in [(a, b) for a, b in PAIRED if a in tokens and b in tokens]:
        seeds = sorted(s for s in tokens[a].keys() & tokens[b].keys() if None not in (tokens[a][s], tokens[b][s]))
        if not seeds:
            lines.append(f'| {a} - {b} | 0 | - | - |')
            continue
        mean, half, p = paired_test([tokens[a][s] / 1e3 for s in seeds], [tokens[b][s] / 1e3 for s in seeds])
        lines.append(f'| {a} - {b} | {len(seeds)} | {mean:.0f}' + ('' if math.isnan(half) else f' ± {half:.0f}') +
                     f" | {'-' if math.isnan(p) else f'{p:.4f}'} |")
    return '\n'.join(lines)


def role_ok(role, stats):
    """A curve point's stats of one role, as SelectiveLM.role_stats writes them."""
    return role in ROLES and isinstance(stats, dict) and all(is_number(stats.get(f)) for f in
                                                              ('tokens', 'selected', 'excess')) and \
        (stats.get('excess_selected') is None or is_number(stats['excess_selected']))


def role_totals(run):
    """{role: (tokens, selected fraction, mean excess, mean excess of the selected)} over the whole run (its last
    curve point's roles: counted since the run began), with 'operands' (a b c d pooled); {} for a run recorded
    before roles were."""
    for p in run['curve']:
        roles = p.get('roles', {})
        if not (isinstance(roles, dict) and all(role_ok(*item) for item in roles.items())):
            raise DataError(f"noise{round(100 * run['noise'])}/{run['arm']}_s{run['seed']}/curve.jsonl: the roles of "
                            f"its point at step {p.get('step')} are damaged: {RESULT_FIX}")
    sums = {}  # role: tokens, selected, excess summed, excess of the selected summed
    for role, st in run['curve'][-1].get('roles', {}).items():
        n, kept = st['tokens'], st['tokens'] * st['selected']
        sums[role] = [n, kept, n * st['excess'], kept * st['excess_selected'] if kept else 0.0]
    operands = [sums[ROLES[i]] for i in OPERANDS if ROLES[i] in sums]
    if operands:
        sums['operands'] = [sum(column) for column in zip(*operands)]
    return {role: (n, kept / n, excess / n, excess_kept / kept if kept else math.nan)
            for role, (n, kept, excess, excess_kept) in sums.items() if n}


def role_table(groups):
    """Per byte role (rows) and arm: the whole run's selection rate, and the mean excess loss of all the role's
    tokens / of the selected ones; each the mean over the seeds that recorded roles."""
    totals = {arm: [t for t in map(role_totals, runs) if t] for arm, runs in groups.items()}
    arms = [arm for arm in groups if totals[arm]]
    if not arms:
        return 'selection and excess by byte role: no run here recorded them (runs before slm.py counted roles)'

    def mean(arm, role, i):
        values = [t[role][i] for t in totals[arm] if role in t and not math.isnan(t[role][i])]
        return f'{sum(values) / len(values):.3f}' if values else '-'
    head = ['role', *[f'sel {a}' for a in arms], *[f'excess {a} (all / selected)' for a in arms]]
    lines = ['selection rate and mean excess loss (train - reference) by byte role of `ab+cd=` units tens newline '
             '(whole run, mean over seeds; operands a b c d)', '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for role in ('operands', *ROLES):
        row = [role, *[mean(a, role, 1) for a in arms], *[f'{mean(a, role, 2)} / {mean(a, role, 3)}' for a in arms]]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def control_text(root, noise, k):
    """The coin control's tables from the runs at noise and k under root, as markdown; writes nothing."""
    groups = control_groups(root, noise, k)
    if not groups:
        raise DataError(f'no clm, SLM or coin-control run at noise {noise:g} under {root}: '
                        'run `python -m studies.slm control`')
    seeds = ', '.join(f'{arm} {len(runs)}' for arm, runs in groups.items())
    return (f'the coin control at noise {noise:g}, k = {k:g} (runs: {seeds})\n\n' + failure_table(groups) + '\n\n' +
            tokens_table(groups) + '\n\n' + role_table(groups))


def control_report(root, noise, k):
    """control.md from the runs under root; returns the text."""
    text = control_text(root, noise, k)
    print(text)
    (Path(root) / 'control.md').write_text(text + '\n')
    return text
