"""Comparing runs: the method x budget table of a No Train No Gain sweep (paired differences to the
baseline with t-based 95% CIs and Holm-adjusted p), the n-gram floors that say which regime a column is
in, what each method logs about itself, time to target, the cost-table sensitivity and the figure
(across_budgets.plot_runs). It reads only what runs wrote (config.json, log.jsonl, each field it reads
type-checked first: field_problem), through runs.read_run, and only what it can compare: another study's
runs, another corpus or a stray model shape are named and left out, and a folder with nothing comparable
is one error.

    python -m studies.ntng compare out/ablation --out=out/ablation/ablation   # -> ablation.md, ablation.png
"""
import collections
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from configurator import ConfigError, UserError, cli, key, require, require_writable
from data.loader import Corpus, DataError, atomic_write_bytes, data_dir, is_number, read_json
from data.ngram import ngram_floors
from budget import UNITS
from runs import IL_LABEL, MAY_CHANGE_ON_RESUME, METHOD_STATS, SHAPE_KEYS, first_difference, read_run
from studies.across_budgets import auto_target, cost_sensitivity, plot_runs, target_table
from studies.stats import finals_by_seed, group_runs, mean_std, paired_cells, t_interval, untrained

MARGIN = 0.02  # the equivalence margin in nats (TOST) every study's verdicts use, declared before the runs


# -----------------------------------------------------------------------------
# comparing runs: the method x budget table, time to target, the plot

def ablation_table(groups, baseline='baseline', seeds=0):
    """Markdown: rows = methods, columns = budgets; mean ± sd of final val loss over seeds (n), and for a
    method its paired difference to the baseline with a t-based 95% CI and a Holm-adjusted p (* below 0.05,
    never on a pending cell: see pending); then the steps taken."""
    budgets = sorted({b for g in groups.values() for b in g})
    cells, planned = paired_cells(groups, baseline), planned_seeds(groups, seeds)
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
                cell += delta_text(cells[label, b], len(complete), planned[b], untrained(complete))
            row.append(cell)
            step_row.append(f"{statistics.mean(r['steps'] for r in complete):.0f}")
        lines.append(f'| {label} | ' + ' | '.join(row) + ' |')
        steps.append(f'| {label} | ' + ' | '.join(step_row) + ' |')
    n_tests = sum(not math.isnan(c[2]) for k, c in cells.items() if not untrained(groups[k[0]][k[1]]))
    note = (f'Δ: paired difference to {baseline} over common seeds, t-based 95% CI; p: paired t-test, '
            f'Holm-adjusted over the table\'s {n_tests} comparisons; * p < 0.05 on a cell whose seeds are all in.')
    return '\n'.join(lines) + '\n\n' + note + '\n\n' + '\n'.join(steps) + untrained_note(groups, budgets)


def delta_text(cell, n, planned, idle):
    """A cell's difference to the baseline: Δ and its 95% CI; the Holm p where the cell is in the family (not
    one that trained no step), starred below 0.05 once all `planned` seeds are paired (else it is pending)."""
    delta, half, p, pairs = cell
    waiting = pending(pairs, planned)
    text = f' Δ {delta:+.4f}'
    if not math.isnan(half):
        text += f' [{delta - half:+.4f}, {delta + half:+.4f}]' + ('' if idle else f" p={p:.3g}{'*' if p < 0.05 and not waiting else ''}")
    return text + (f' ({pairs} paired)' if pairs != n else '') + (f' {waiting}' if waiting else '')


def untrained_note(groups, budgets):
    """The cells whose runs took no step: their val loss is the initial model's, a statement about the
    accounting, not about the method's steps (left out of the Holm family)."""
    cells = [f'{label} at {b:g}' for label, by_budget in groups.items() for b in budgets if untrained(by_budget.get(b, []))]
    return ('\n\ntrained no step (the costs charged before the first step exceed the budget; the val loss is the '
            'initial model\'s; left out of the Holm family): ' + ', '.join(cells)) if cells else ''


def verdict(delta, half95, half90, p_holm, margin):
    """The four-way reading of one paired difference (lower is better): better / worse when the 95% CI excludes
    0 and the Holm-adjusted p is below 0.05; equivalent within +-margin when the 90% CI lies inside it (two
    one-sided t-tests at 5%, TOST, margin declared before the runs); otherwise not resolved."""
    if math.isnan(half95):
        return 'not resolved (one pair)'
    if p_holm < 0.05 and (delta + half95 < 0 or delta - half95 > 0):
        return 'better' if delta < 0 else 'worse'
    if -margin < delta - half90 and delta + half90 < margin:
        return f'equivalent within ±{margin:g}'
    return 'not resolved'


def verdict_with_ci(delta, half95, diffs, p_holm, margin):
    """verdict's reading of the paired differences `diffs` (mean delta), followed by the 90% CI it tested."""
    half90 = t_interval(diffs, 0.90)[1]
    ci90 = f' (90% CI [{delta - half90:+.4f}, {delta + half90:+.4f}])' if not math.isnan(half90) else ''
    return verdict(delta, half95, half90, p_holm, margin) + ci90


def pending(pairs, planned):
    """A paired comparison's reading while some of the seeds the design runs in every row are missing ('' once
    all are in): a verdict read from the first seeds to land would be read before its sample is."""
    return f'pending ({pairs} of {planned} paired seeds)' if pairs < planned else ''


def planned_seeds(groups, seeds):
    """{budget: the seeds every row's pair waits for there}: the design's count, or more where a row has finished more."""
    budgets = sorted({b for g in groups.values() for b in g})
    return {b: max(seeds, *(len(finals_by_seed(g.get(b, []))) for g in groups.values())) for b in budgets}


def verdict_table(groups, baseline, margin, seeds=0):
    """Markdown: each method and budget read in four words against the baseline, with the 90% CI the
    equivalence test uses."""
    cells, budgets = paired_cells(groups, baseline), sorted({b for g in groups.values() for b in g})
    planned = planned_seeds(groups, seeds)
    lines = ['| verdict | ' + ' | '.join(f'budget {b:g}' for b in budgets) + ' |', '|' + ' --- |' * (len(budgets) + 1)]
    for label, by_budget in groups.items():
        if label == baseline:
            continue
        row = []
        for b in budgets:
            if (label, b) not in cells or untrained(by_budget.get(b, [])):
                row.append('—')
                continue
            delta, half95, p, pairs = cells[label, b]
            if pending(pairs, planned[b]):
                row.append(pending(pairs, planned[b]))
                continue
            d = [x - y for x, y in paired_finals(groups, label, baseline, b)]
            row.append(verdict_with_ci(delta, half95, d, p, margin))
        lines.append(f'| {label} | ' + ' | '.join(row) + ' |')
    expected = f'the design runs ({seeds}) or than another row has' if seeds else 'the most any row has'
    return ('\n'.join(lines) + f'\n\nbetter / worse: 95% CI excludes 0 and Holm p < 0.05; equivalent: the 90% CI of the '
            f'paired difference inside ±{margin:g} nats (TOST at 5%, the margin declared in advance); else not resolved; '
            f'pending: the pair has finished fewer seeds than {expected} at that budget (read when all are in; a run '
            f'that cannot finish leaves it unread).')


def paired_finals(groups, label, baseline, b):
    """[(method final, baseline final)] over the seeds both completed at budget b."""
    mine, base = finals_by_seed(groups[label].get(b, [])), finals_by_seed(groups.get(baseline, {}).get(b, []))
    return [(mine[s], base[s]) for s in sorted(mine.keys() & base.keys())]


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
    """The count-based n-gram floors (orders 1-7) of the runs' one val split, over the whole split and over
    the windows their evals score (cached in the corpus folder), as a record {'corpus', 'floors',
    'windows', 'window_floors'}; a string saying why not when the runs span corpora or the floors cannot
    be computed."""
    corpora = {(r['dataset'], r['tokenizer']) for r in runs}
    if len(corpora) != 1 or None in next(iter(corpora)):
        return ''
    dataset, tokenizer = next(iter(corpora))
    windows = {r.get('eval_windows') for r in runs}
    windows = next(iter(windows)) if len(windows) == 1 else None
    try:
        folder = data_dir(dataset, tokenizer)
        return {'corpus': {'dataset': dataset, 'tokenizer': tokenizer, 'identity': Corpus(folder).identity()},
                'floors': ngram_floors(folder, max_order=7),
                'windows': list(windows) if windows else None,
                'window_floors': ngram_floors(folder, max_order=7, windows=windows) if windows else None}
    except DataError as e:
        return f'(n-gram floors unavailable: {e})'


def plotted_floors(used):
    """The floors a plot marks: the eval windows' where recorded (what the curves are scored on), else the split's."""
    return (used.get('window_floors') or used.get('floors')) if isinstance(used, dict) else None


def floor_table(v):
    return isinstance(v, dict) and len(v) > 0 and all(is_number(x) and x > 0 for x in v.values())


def eval_windows(v):
    return isinstance(v, list) and len(v) == 2 and all(type(n) is int and n > 0 for n in v)


FLOORS_FIELDS = {  # a floors record's keys (corpus_floors writes them; floors_note and the plot read them)
    'corpus': (True, lambda v: isinstance(v, dict), 'the dataset and tokenizer the floors were counted on'),
    'floors': (True, floor_table, "the val split's floors (n-gram order -> positive number)"),
    'window_floors': (False, lambda v: not v or floor_table(v), "the eval windows' floors (n-gram order -> positive number)"),
    'windows': (False, lambda v: v is None or eval_windows(v), 'the eval windows [block_size, count]'),
}


def fields_problem(record, fields, where=''):
    """Why a parsed record lacks a required field or holds one of another kind, naming it (where + key), or None."""
    if not isinstance(record, dict):
        return f"{where.rstrip('.') or 'the file'} holds a {type(record).__name__} ({short(record)}), not a record"
    for k, (required, ok, what) in fields.items():
        if k not in record and required:
            return f'{where}{k} is missing ({what})'
        if k in record and not ok(record[k]):
            return f'{where}{k}={short(record[k])} is not {what}'
    return None



def floors_problem(saved):
    """Why a parsed floors record cannot be read, naming the field, or None (the windows wherever their floors are)."""
    windows = {'windows': (True, eval_windows, FLOORS_FIELDS['windows'][2])}
    return fields_problem(saved, FLOORS_FIELDS) or (fields_problem(saved, windows) if saved.get('window_floors') else None)


def read_floors(path, runs):
    """The floors record compare wrote beside an earlier table (<out>.floors.json), checked field by field
    (floors_problem) and against the runs' corpus: floors of another corpus would misplace every column."""
    saved = read_json(path)
    problem = floors_problem(saved) if saved else 'it holds no JSON record'
    require(problem is None, f'--floors={path} is not a floors record written by compare (<out>.floors.json): {problem}')
    corpus = saved['corpus']
    wanted = {(r['dataset'], r['tokenizer']) for r in runs}
    require(wanted == {(corpus.get('dataset'), corpus.get('tokenizer'))},
            f"--floors={path} holds the floors of {corpus.get('dataset')}/{corpus.get('tokenizer')}, the runs are on "
            f"{', '.join(f'{d}/{t}' for d, t in sorted(wanted, key=str))}")
    return saved


def floors_note(used, groups, baseline):
    """The n-gram floors (whole val split and, where recorded, the windows the evals score), and per budget
    between which orders the baseline's mean final val loss sits: above the trigram floor a table measures
    how fast a method learns n-gram statistics."""
    if not isinstance(used, dict):
        return used
    scopes = [('val split', used['floors'])] + ([(f"eval windows ({used['windows'][1]} x {used['windows'][0]} tokens)",
                                                  used['window_floors'])] if used.get('window_floors') else [])
    lines = [f'n-gram floors, {name} (nats/token, interpolated Kneser-Ney counted on train): '
             + ', '.join(f'{k} {v:.3f}' for k, v in floors.items()) for name, floors in scopes]
    for b, rs in sorted(groups.get(baseline, {}).items()):
        done = [r['final'] for r in rs if r['complete']]
        if done:
            m = mean_std(done)[0]
            lines.append(f'budget {b:g}: the {baseline} ({m:.3f}) sits ' + '; '.join(
                f'{between(m, floors)} on the {name.split(" (")[0]}' for name, floors in scopes))
    return '\n'.join(lines)


def between(loss, floors):
    """Where a loss sits among the floors (which fall with the order): 'between the 4-gram and 5-gram floors'."""
    below = [k for k, v in floors.items() if v >= loss]   # floors the loss is under: orders it beats
    above = [k for k, v in floors.items() if v < loss]    # floors it has not reached
    if not below:
        return f'above the {next(iter(floors))} floor'
    if not above:
        return f'below the {list(floors)[-1]} floor'
    return f'between the {below[-1]} and {above[0]} floors'


def compare(run_dirs, out='ablation', target='auto', baseline='baseline', floors='', margin=MARGIN):
    """The ablation table (and time to target, plot) of run folders, or of every run under a sweep folder,
    written to <out>.md, <out>.png and <out>.floors.json (the n-gram floors it used: a record of the sweep
    carries them, and `--floors=` reads them back where the corpus is not at hand)."""
    require(Path(out).name not in ('', '.', '..') and not out.endswith(os.sep), f"--out='{out}' names no file: give "
            'a path without its extension, e.g. --out=out/ablation')
    for path in (f'{out}.md', f'{out}.png', f'{out}.floors.json'):
        require_writable(path)
    report, runs, used = compare_report(run_dirs, target, baseline, floors, margin)
    print(report)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(f'{out}.md'), (report + '\n').encode())
    if used and not floors:
        atomic_write_bytes(Path(f'{out}.floors.json'), json.dumps(used, indent=1).encode())
    units = sorted({r['unit'] for r in runs})
    plotted = [r for r in runs if r['unit'] == units[0]]
    png = plot_runs(group_runs(plotted), f'{out}.png', plotted_floors(used), baseline)
    print(f'wrote {out}.md' + (f' and {png} (budget unit {units[0]})' if png else ''))
    return report


def compare_report(run_dirs, target='auto', baseline='baseline', floors='', margin=MARGIN, whole=False, seeds=0):
    """compare's report, writing nothing -> (report, the readable runs, the floors record used or None).
    RHO-LOSS's IL model runs are left out (not a method); runs in different budget units get a table each
    (their budgets are not comparable); a run found twice, or two runs of one cell and seed, are refused.
    whole=True (committed records, which hold finished runs only): a damaged or partial run is refused, not
    left out of the means with a note. seeds: how many paired seeds the design runs in every cell (a verdict
    waits for them all); 0: the most any row has finished at that budget."""
    require(run_dirs, 'compare needs run folders, or a folder that holds them: python -m studies.ntng compare '
                      'out/ablation [--out=ablation]')
    run_dirs = run_folders(run_dirs)
    runs, il_runs = without_il_models([read_checked_run(d) for d in run_dirs])
    check_one_run_per_cell(runs)
    bad = [r for r in runs if 'error' in r or not r['complete']]
    if whole and bad:
        raise UserError(f"{bad[0]['path']}: {bad[0].get('error', 'budget not spent (partial or damaged log)')}: a "
                        f'record holds finished runs only; restore it from git, or record the run again')
    runs = [r for r in runs if 'error' not in r]
    require(runs or bad, f'the {len(il_runs)} run(s) given are IL models of RHO-LOSS, not methods: give the sweep\'s method runs')
    if not runs:
        raise UserError(f"no readable runs among the {len(bad)} folder(s) given ({bad[0]['path']}: {bad[0]['error']}): "
                        f'a run folder holds config.json and log.jsonl')
    runs, foreign = comparable(runs, baseline)
    check_one_config_per_row(runs)
    if not any(r['complete'] for r in runs):
        raise UserError(f'nothing to compare yet: none of the {len(runs)} run(s) given has spent its budget '
                        f"(first: {runs[0]['path']}); compare reads finished runs")
    used = read_floors(floors, runs) if floors else corpus_floors(runs)
    units = sorted({r['unit'] for r in runs})
    sections = [(f'budget unit: {u}\n\n' if len(units) > 1 else '') +
                unit_report([r for r in runs if r['unit'] == u], target, baseline, used, margin, seeds) for u in units]
    report = '\n\n'.join(sections)
    labels = sorted({r['label'] for r in runs})
    if baseline not in labels:
        report += f"\n\nno run is labelled '{baseline}', so no differences are shown: --baseline= one of {', '.join(labels)}"
    if bad:
        report += '\n\nmissing or partial runs (left out of the means):\n' + '\n'.join(
            f"- {r['path']}: {r.get('error', 'budget not spent')}" for r in bad)
    if foreign:
        report += '\n\nleft out, not comparable with the table\'s runs:\n' + '\n'.join(f"- {r['path']}: {why}" for r, why in foreign)
    if il_runs:
        report += (f'\n\n{len(il_runs)} run(s) of RHO-LOSS\'s IL model left out (not a method; rho_il_charged\'s '
                   'budget pays for its training, rho\'s leaves it out as the paper does)')
    return report, runs, used if isinstance(used, dict) else None


OTHER_STUDIES = ('slm.py', 'madpo.py')  # entry points whose runs belong to other studies' tables, never to this one's


def comparable(runs, baseline):
    """(the runs one table may hold, [(run, why) left out]): runs that are not another study's, on the
    baseline's corpus (without a baseline, most runs'), each row of one model shape (its most runs'). A run
    of another script (an SLM arm, a MADPO stage) or corpus, or a stray shape, is never averaged into a row."""
    def corpus(r):
        return r['dataset'], r['tokenizer']
    ours = [r for r in runs if r.get('script', '') not in OTHER_STUDIES]
    base = [r for r in ours if r['label'] == baseline]
    reference = collections.Counter(corpus(r) for r in base or ours).most_common(1)
    shapes = {label: collections.Counter(r['shape'] for r in ours if r['label'] == label).most_common(1)[0][0]
              for label in {r['label'] for r in ours}}
    left = []
    for r in runs:
        if r not in ours:
            left.append((r, f"a run of {r['script']}, whose study has its own table"))
        elif corpus(r) != reference[0][0]:
            left.append((r, f"another corpus ({r['dataset']}/{r['tokenizer']}) than the table's"))
        elif r['shape'] != shapes[r['label']]:
            left.append((r, f"another model shape or batch than the rest of its row ({r['label']})"))
    keep = [r for r in runs if all(r is not x for x, _ in left)]
    if not keep:
        raise UserError(f"nothing comparable among the {len(runs)} run(s) given: they are runs of "
                        f"{', '.join(sorted({r['script'] for r in runs}))}, whose studies have their own tables "
                        '(python -m studies.slm / studies.madpo --stage=compare)')
    return keep, left


# -----------------------------------------------------------------------------
# what compare reads of a run folder, each field checked before it is read

def is_text(v):
    return v is None or isinstance(v, str)


def is_scalar(v):  # a model shape value: compared and counted, so never a list or a dict
    return v is None or isinstance(v, (str, int, float))


CONFIG_FIELDS = {  # config.json's keys compare reads: (required, the check, what it must be)
    'budget': (True, lambda v: is_number(v) and v > 0, 'a positive number'),
    'budget_unit': (True, lambda v: v in UNITS, f"one of {', '.join(UNITS)}"),
    'seed': (True, lambda v: isinstance(v, int) and not isinstance(v, bool), 'an integer'),
    **{k: (False, is_text, 'text') for k in ('label', 'method', 'arch', 'optimizer', 'schedule', 'dataset', 'tokenizer', 'rst_table')},
    **{k: (False, is_scalar, 'a single value') for k in SHAPE_KEYS},
}
LOG_FIELDS = ('step', 'val_loss', 'tokens', *UNITS, *METHOD_STATS)  # numbers wherever a log record has them


def field_problem(path):
    """Why a run folder's config.json or log.jsonl holds a field compare cannot read, in one line naming the
    file, the field and what it must be ('log.jsonl line 9: val_loss='abc' is not a finite number'); None
    when every field is readable (a missing or unparsable file is read_run's to report)."""
    try:
        info = json.loads((Path(path) / 'config.json').read_text())
    except (OSError, ValueError):
        return None
    config = info.get('config') if isinstance(info, dict) else None
    if not isinstance(config, dict):
        return "config.json holds no 'config' record of the run's keys"
    for k, (required, ok, what) in CONFIG_FIELDS.items():
        if k not in config and required:
            return f'config.json has no {k} ({what})'
        if k in config and not ok(config[k]):
            return f'config.json: {k}={short(config[k])} is not {what}'
    lines = (Path(path) / 'log.jsonl').read_text(errors='replace').splitlines() if (Path(path) / 'log.jsonl').is_file() else []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines):  # only a killed run's last line may be partial (read_log drops it)
                return f'log.jsonl line {i} is not a JSON record (the log is damaged)'
            continue
        problem = record_problem(record, config['budget_unit'])
        if problem:
            return f'log.jsonl line {i}: {problem}'
    return None


def record_problem(record, unit):
    """Why one log record cannot be read, or None. A unit other than the budget's may be None: the run had no
    cost table pricing its steps (RST is then not counted), which the budget's own unit never is."""
    if not isinstance(record, dict):
        return f'a {type(record).__name__} ({short(record)}), not a record'
    for k in LOG_FIELDS:
        if k in record and not is_number(record[k]) and not (record[k] is None and k in UNITS and k != unit):
            return f'{k}={short(record[k])} is not a finite number'
    if is_number(record.get('val_loss')) and record['val_loss'] < 0:
        return f"val_loss={short(record['val_loss'])} is negative (a cross-entropy never is)"
    entries = record.get('rst_by_entry', {})
    if not (isinstance(entries, dict) and all(is_number(v) for v in entries.values())):
        return f'rst_by_entry={short(entries)} is not a table of cost entry -> RST'
    return None


def short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + '...'


def read_checked_run(path):
    """runs.read_run of a folder whose every field compare reads is of its type, with its config.json's keys
    ('config': what check_one_config_per_row compares), else {'path', 'error'}."""
    problem = field_problem(path)
    if problem:
        return {'path': str(path), 'error': f'unreadable ({problem})'}
    run = read_run(path)
    return run if 'error' in run else {**run, 'config': run_config(path)}


def run_config(path):
    """A run folder's keys as its config.json records them ({} where it holds none)."""
    try:
        config = json.loads((Path(path) / 'config.json').read_text()).get('config')
    except (OSError, ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


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


# keys that differ between the runs of one row by design: the seed, and what a run may change on resume (where
# it runs and how it reports: runs.MAY_CHANGE_ON_RESUME, out_dir, init_from and overwrite among them); the label
# names the row (derived when not given). Every other key is the configuration a row's mean is of.
PER_RUN_KEYS = frozenset({'seed', 'label', *MAY_CHANGE_ON_RESUME})


def row_config(run, varies=()):
    """The keys a run shares with the rest of its row: its config less PER_RUN_KEYS and `varies`, with a path
    inside its own folder (a RHO-LOSS run's own IL model, <out_dir>_il) written relative to that folder."""
    config = run.get('config') or {}
    own = config.get('out_dir') if isinstance(config.get('out_dir'), str) and config.get('out_dir') else None
    return {k: ('<run>' + v[len(own):] if own and isinstance(v, str) and v.startswith(own) else v)
            for k, v in config.items() if k not in PER_RUN_KEYS and k not in varies}


def config_clash(mine, theirs, varies=()):
    """(key, my value, their value) of the first key two runs of one row differ in, or None. A planned run
    ('planned': its config holds only the keys the plan sets) is compared on those keys."""
    a, b = row_config(mine, varies), row_config(theirs, varies)
    keys = sorted(a) if mine.get('planned') else sorted(b) if theirs.get('planned') else None
    return first_difference(a, b, keys=keys)


def check_one_config_per_row(runs, varies=()):
    """The runs of one row (method label x budget) are one configuration over several seeds: a row mixing runs of
    another lr (a sweep rerun into the same folder with other keys) would average two configurations into one
    mean, so it is refused, naming the row, the key and both values. varies: keys a table varies within a row
    by design (lr_check's lr)."""
    first = {}
    for r in runs:
        if 'error' in r:
            continue
        row = (r['label'], r['unit'], r['budget'])
        clash = config_clash(first.setdefault(row, r), r, varies)
        if clash:
            k, was, now = clash
            raise UserError(f"{first[row]['path']} and {r['path']} are both {r['label']} at budget {r['budget']:g} but were "
                            f'run with other --{k} ({short(was)}, {short(now)}): a row averages one configuration: give '
                            'a sweep of other keys another --out_dir, or remove the stale runs')


def unit_report(runs, target, baseline, floors, margin, seeds=0):
    """compare's report for runs in one budget unit: the table, the floors, what methods log, time to target."""
    groups = group_runs(runs)
    parts = [ablation_table(groups, baseline, seeds), verdict_table(groups, baseline, margin, seeds) if baseline in groups else '',
             floors_note(floors, groups, baseline), method_stats(groups)]
    if runs[0]['unit'] == 'rst':
        parts.append(cost_sensitivity(groups, baseline))
    if target != 'none':
        chosen = (auto_target(groups.get(baseline, {})) if target == 'auto'
                  else (float(target), ", as given (--target, or the sweep file's TARGET)"))
        if chosen is not None:
            parts.append(target_table(groups, chosen[0], baseline, how=chosen[1]))
    return '\n\n'.join(p for p in parts if p)


def is_loss(text):
    """Whether text is a val loss a run could reach: a finite positive number."""
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False


def check_target(target):
    require(target in ('auto', 'none') or is_loss(target),
            f"--target must be 'auto', 'none' or a val loss (a positive number), got '{target}'")


@dataclass(frozen=True)
class CompareConfig:
    out: str = 'ablation'        # writes <out>.md and, with matplotlib, <out>.png
    target: str = 'auto'         # time-to-target: 'auto' (the baseline's worst seed at its largest full budget), a number, 'none'
    baseline: str = 'baseline'   # the label deltas and speedups are taken against
    margin: float = key(MARGIN, '>0')  # equivalence margin in nats (TOST), declared before the runs
    floors: str = ''             # a <out>.floors.json of an earlier compare to read the n-gram floors from ('' = the corpus)

    def __post_init__(self):
        check_target(self.target)


@dataclass(frozen=True)
class NoKeys:
    """studies.compare takes no keys: it has no command of its own."""


def main():
    """The reading behind the lab's commands is not a command itself: one line naming the one that is, exit 2."""
    def refuse(_):
        raise UserError('studies.compare has no command of its own: `python -m studies.ntng compare RUN_FOLDERS...` '
                        'prints its table')
    return cli(refuse, NoKeys, [])


if __name__ == '__main__':
    main()
