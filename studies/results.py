"""RESULTS.md, generated: every table in it is what a study's own report prints from the committed records.

The prose (what was run, on which commit and machine, and the findings) is written by hand in
studies/results.in.md; each `{{name}}` line there is replaced by the table of SECTIONS[name], computed
now from the record folder it names. tests/test_results.py regenerates the file and fails on any
difference, so a number in RESULTS.md cannot drift from its evidence. Figures are regenerated the same
way into docs/figures/, each with the sha256 of the records it was drawn from (docs/figures/sources.json),
which the test compares with the records as they are now. Every field a table reads of a record (a run's
config.json and log.jsonl, a tuned.json, a floors file, a score) is checked before it is read: a damaged
record is one line naming the file, the field and what it must be, with the fix, and nothing is written.

    python -m studies.results                  # rewrite RESULTS.md from the records
    python -m studies.results --figures=True   # ... and redraw docs/figures/
    python -m studies.results --check=True     # exit 1, naming the first line that differs (what the test does)
"""
import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from configurator import UserError, cli
from data.loader import atomic_write_bytes, is_number
from studies.compare import fields_problem, floors_problem
from studies.records import json_problem, read_whole_run

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / 'out' / 'records'
TEMPLATE, OUT, FIGURES = ROOT / 'studies' / 'results.in.md', ROOT / 'RESULTS.md', ROOT / 'docs' / 'figures'


@dataclass(frozen=True)
class Section:
    records: str                     # the record folder (under out/records) the table is computed from
    table: Callable                  # Path of that folder -> the markdown its study's report prints
    figure: Callable = None          # (Path of the folder, Path of the png) -> draws it; None: no figure


def declared_target():
    """Time to target's val loss as config/ablation.py declares it (TARGET), not one that moves with the columns;
    compare's default ('auto') where it declares none."""
    from studies.ntng import read_sweep
    target = read_sweep(str(ROOT / 'config' / 'ablation.py')).get('TARGET')
    return 'auto' if target is None else repr(float(target))


def local_paths(report, folder, *others):
    """The report with run paths the same on every clone: those under folder relative to it, those under another
    record folder relative to out/records."""
    for other in others:
        report = report.replace(str(other) + '/', f'{other.relative_to(RECORDS)}/')
    return report.replace(str(folder) + '/', '')


def ntng_table(folder, **kw):
    from studies.compare import compare_report
    floors = next(folder.rglob('*.floors.json'), None)  # the floors compare used when the sweep ran
    report, _, _ = compare_report([str(folder)], floors=recorded_floors(floors) if floors else '', target=declared_target(),
                                  whole=True, seeds=paired_seeds(), **kw)
    return local_paths(report, folder)


def ntng_figure(folder, png):
    from studies.compare import plot_runs, plotted_floors, read_floors, without_il_models
    from studies.stats import group_runs
    runs, _ = without_il_models(record_runs([folder]))
    floors = next(folder.rglob('*.floors.json'), None)
    plot_runs(group_runs(runs), str(png), plotted_floors(read_floors(recorded_floors(floors), runs)) if floors else None)


def second_system_table(folder):
    """The rows rerun under the second reference system beside the same rows and the baseline under the CPU
    table (the baseline's step counts are the same under both), and the declared decision rule's outcome."""
    from studies.compare import compare_report
    from studies.stats import group_runs, paired_cells
    cpu = RECORDS / 'ntng-cpu-2026-11-30' / 'ablation'
    rows = sorted({p.name for p in folder.iterdir() if p.is_dir()})
    dirs = [str(cpu / 'baseline')] + [str(cpu / row) for row in rows] + [str(folder)]
    report, runs, _ = compare_report(dirs, target='none', floors=recorded_floors(cpu / 'ablation.floors.json'), whole=True,
                                     seeds=paired_seeds())
    report = local_paths(report, folder, cpu)
    return report + '\n\n' + decision_rule(paired_cells(group_runs(runs), 'baseline'))


def today_table(folder):
    """Muon's and schedule-free AdamW's columns beside the CPU table's baseline (the same seeds, data order and
    cost table: paired), in the CPU table's four-way wording; budgets not yet run are dashes."""
    return beside_cpu(folder / 'ablation')


def rho_table(folder):
    """RHO-LOSS's readable rows (its IL model charged at a fraction of each budget; the 10% selection ratio with
    its own lr grid) beside the CPU table's baseline and its RHO-LOSS rows, and the 10% row's tuning."""
    tuned = folder / 'tune' / 'tuned.json'
    head = tuning(folder / 'tune', ('rho', 'rho_s0.1')) + '\n\n' if tuned.is_file() else '(the 10% row\'s tuning has not finished yet)\n\n'
    cpu_charged = RECORDS / 'ntng-cpu-2026-11-30' / 'ablation' / 'rho_il_charged'
    return (head + beside_cpu(folder / 'ablation', ('baseline', 'rho', 'rho_il_charged')) + '\n\n'
            + il_charges([cpu_charged, folder / 'ablation']))


IL_CHARGES = {k: (True, lambda v: is_number(v) and v >= 0, 'a number of RST (>= 0)')  # what an IL-charged run's
              for k in ('il_train_rst', 'il_precompute_rst')}                         # first log record says it paid


def il_charges(folders):
    """What each IL-charged run paid before its first step (its step-0 record), per row and budget, as means
    over its seeds: the IL model's training, the IL precompute (every non-holdout example, whatever the budget),
    the budget left for the target, and the steps the target took (fewest-most)."""
    from runs import read_log
    cells = {}
    for run in record_runs(folders):
        log = Path(run['path']) / 'log.jsonl'
        first = read_log(log)[0]  # whole (record_runs): line 1 is the run's first record
        if first.get('il_charged'):  # an IL model's own run folder (<run>_il) has no such record
            problem = fields_problem(first, IL_CHARGES, 'line 1: ')
            if problem:
                raise damaged(f'{shown(log)} {problem}', log)
            cells.setdefault((run['label'], run['budget']), []).append(
                (first['il_train_rst'], first['il_precompute_rst'], run['steps']))
    if not cells:
        return '(no IL-charged run has finished yet)'
    lines = ['| IL-charged row | budget (RST) | IL training (RST) | IL precompute (RST) | left for the target (RST) '
             '| target steps | n |', '| --- |' + ' --- |' * 6]
    for (label, budget), runs in sorted(cells.items(), key=lambda cell: (cell[0][0], cell[0][1])):
        il, pre = (sum(r[i] for r in runs) / len(runs) for i in (0, 1))
        steps = sorted(r[2] for r in runs)
        left = budget - il - pre
        lines.append(f'| {label} | {budget:g} | {il:.2f} | {pre:.2f} | {max(left, 0.0):.2f} ({max(left, 0.0) / budget:.0%}) '
                     f'| {steps[0]}' + (f'-{steps[-1]}' if steps[-1] != steps[0] else '') + f' | {len(runs)} |')
    return '\n'.join(lines)


def beside_cpu(runs, cpu_rows=('baseline',)):
    """The rows under runs beside these rows of the CPU table (the same seeds, data order and cost table:
    paired with its baseline), in the CPU table's four-way wording."""
    from studies.compare import compare_report
    cpu = RECORDS / 'ntng-cpu-2026-11-30' / 'ablation'
    if not any(runs.rglob('config.json')):
        return '(no run of these rows has finished yet)'
    report, _, _ = compare_report([str(cpu / row) for row in cpu_rows] + [str(runs)], target=declared_target(),
                                  floors=recorded_floors(cpu / 'ablation.floors.json'), whole=True, seeds=paired_seeds())
    return local_paths(report, runs, cpu)


def finals_table(folder):
    """Each scored run's final on all of val beside its eval windows' (studies/finals.py): the runs whose
    checkpoints were still on the machine that ran them, from this folder, the H200-table reruns, RHO-LOSS's
    readable rows and the 480-RST reruns at the lr their checks found better (the baseline's among them: the baseline the Δ columns pair
    with), except those of this folder's own rows (Muon's), which are shown as they ran."""
    from studies.finals import report
    rerun = RECORDS / 'ntng-lr-check-2026-12-06' / 'ablation_lr'
    reruns = [p for p in sorted(rerun.glob('*')) if p.is_dir() and not (folder / 'ablation' / p.name).is_dir()]
    folders = [folder / 'ablation', RECORDS / 'ntng-h200-2026-12-06', RECORDS / 'ntng-rho-2026-12-07' / 'ablation'] + reruns
    record_runs(folders)  # report leaves an unreadable run out: a record's is refused
    return report([str(f) for f in folders])


def decision_rule(cells):
    """The declared rule, read off the cells: stacking's gain is specific to the reference system if under
    the H200 table its 120-RST delta is under half its CPU one in magnitude, or its 240-RST CI includes 0."""
    cpu, gpu, gpu240 = cells.get(('stack', 120.0)), cells.get(('stack [h200]', 120.0)), cells.get(('stack [h200]', 240.0))
    if not (cpu and gpu and gpu240):
        return 'decision rule: pending (stacking under the H200 table is not yet run at 120 and 240 RST)'
    shrank = abs(gpu[0]) < abs(cpu[0]) / 2
    includes_zero = gpu240[0] - gpu240[1] <= 0 <= gpu240[0] + gpu240[1]
    outcome = ('specific to the reference system' if shrank or includes_zero else 'holding under both reference systems')
    return (f'decision rule: |Δ| at 120 RST under the H200 table {abs(gpu[0]):.4f} against half its CPU-table value '
            f'{abs(cpu[0]) / 2:.4f}: {"below" if shrank else "not below"}; its 240-RST 95% CI '
            f'[{gpu240[0] - gpu240[1]:+.4f}, {gpu240[0] + gpu240[1]:+.4f}] {"includes" if includes_zero else "excludes"} 0 '
            f'-> stacking\'s gain is stated as {outcome}.')


def lr_check(folder):
    from studies.lr_check import lr_check_table
    record_runs([folder])  # the table leaves an unreadable run out: a record's is refused
    return lr_check_table(folder)


def lr_rerun_table(folder, budget=480.0):
    """The largest budget's column with the rows whose lr check found a better lr there rerun at it (folder
    ablation_lr/<row>/, seeds 0-4; the baseline among them): every other row of the CPU table and of today's as it
    ran, all paired with the rerun baseline; then each rerun row against the same row at its 120-RST lr."""
    from studies.compare import compare_report, run_folders
    column = f'b{budget:g}'
    reruns = {p.name: p / column for p in sorted((folder / 'ablation_lr').glob('*')) if (p / column).is_dir()}
    if 'baseline' not in reruns or not run_folders([str(reruns['baseline'])]):
        return f"(pending: no run of the baseline's {budget:g}-RST rerun has finished yet)"
    cpu, today = RECORDS / 'ntng-cpu-2026-11-30' / 'ablation', RECORDS / 'ntng-today-2026-12-06' / 'ablation'
    as_ran = {p.name: p / column for base in (cpu, today) for p in sorted(base.iterdir()) if (p / column).is_dir()}
    rows = [str(path) for path in {**as_ran, **reruns}.values()]
    report, _, _ = compare_report(rows, target='none', floors=recorded_floors(cpu / 'ablation.floors.json'), whole=True,
                                  seeds=paired_seeds())
    report = local_paths(report, folder, cpu, today)
    return report + '\n\n' + '\n'.join(rerun_line(name, path, as_ran[name], budget) for name, path in reruns.items()
                                    if name in as_ran)  # a row rerun with no column as it ran has nothing to pair with


def long_table(folder, budget=960.0, rerun_budget=480.0):
    """The baseline's and stacking's column at `budget` (seeds 0-4, each at the lr its 480-RST check chose) beside
    their 480-RST reruns at the same lrs, then the declared test of a change between the columns: per seed,
    stacking's gap to the baseline at `budget` against its gap at 480 (paired over the seeds both columns finished)."""
    from studies.compare import compare_report
    if not any(folder.rglob('config.json')):
        return f'(no run of the {budget:g}-RST column has finished yet)'
    cpu, rerun = RECORDS / 'ntng-cpu-2026-11-30' / 'ablation', RECORDS / 'ntng-lr-check-2026-12-06' / 'ablation_lr'
    dirs = [str(rerun / row / f'b{rerun_budget:g}') for row in ('baseline', 'stack')] + [str(folder)]
    report, runs, _ = compare_report(dirs, target=declared_target(), floors=recorded_floors(cpu / 'ablation.floors.json'),
                                     whole=True, seeds=paired_seeds())
    report = local_paths(report, folder, rerun)
    return report + '\n\n' + gap_change_line(runs, budget, rerun_budget)


def paired_seeds():
    """How many paired seeds the No Train No Gain protocol runs in every cell: a verdict waits for them all."""
    from studies.ntng import AblateConfig
    return len(AblateConfig.seeds)


def gap_change_line(runs, budget, earlier):
    """Stacking's gap to the baseline (stack - baseline, per seed) at `budget` against the same gap at `earlier`."""
    from studies.compare import pending
    from studies.stats import finals_by_seed, group_runs, paired_test
    groups = group_runs(runs)
    gaps = {}
    for b in (budget, earlier):
        base, stack = (finals_by_seed(groups.get(row, {}).get(b, [])) for row in ('baseline', 'stack'))
        gaps[b] = {s: stack[s] - base[s] for s in stack.keys() & base.keys()}
    seeds = sorted(gaps[budget].keys() & gaps[earlier].keys())
    planned = max(paired_seeds(), *(len(finals_by_seed(g.get(b, []))) for g in groups.values() for b in (budget, earlier)))
    head = (f"stacking's gap to the baseline at {budget:g} RST against its gap at {earlier:g} RST, "
            f"paired seeds {', '.join(map(str, seeds)) or 'none yet'}")
    if pending(len(seeds), planned):
        return f'{head}: {pending(len(seeds), planned)}'
    d, half, p = paired_test([gaps[budget][s] for s in seeds], [gaps[earlier][s] for s in seeds])
    change = 'not resolved' if d - half <= 0 <= d + half else ('stacking loses ground' if d > 0 else 'stacking gains ground')
    return f'{head}: Δ {d:+.4f} [{d - half:+.4f}, {d + half:+.4f}] p={p:.3g} -> {change}'


def rerun_line(name, rerun, tuned, budget):
    """One rerun row against the same row at its tuned lr, paired on the seeds both finished, read in the four
    words (studies.compare.verdict_with_ci; one comparison, so its p is not adjusted) with the sweep's declared margin."""
    from studies.compare import MARGIN, pending, verdict_with_ci
    from studies.ntng import read_sweep
    from studies.stats import finals_by_seed, paired_test
    lr_key = read_sweep(str(ROOT / 'config' / 'ablation.py')).get('LR_KEY', {}).get(name, 'lr')  # Muon's: muon_lr
    runs = [record_runs([path], keys=(lr_key,)) for path in (rerun, tuned)]
    new, old = (finals_by_seed(r) for r in runs)
    seeds = sorted(new.keys() & old.keys())
    lrs = [r[0]['config'][lr_key] for r in runs]
    head = (f"{name} at {lr_key} {lrs[0]:g} against {name} at its tuned {lr_key} {lrs[1]:g}, {budget:g} RST, "
            f"paired seeds {', '.join(map(str, seeds)) or 'none yet'}")
    planned = max(len(new), len(old), paired_seeds())  # read when every seed the design runs has its pair
    if pending(len(seeds), planned):
        return f'{head}: {pending(len(seeds), planned)}'
    d, half, p = paired_test([new[s] for s in seeds], [old[s] for s in seeds])
    reading = verdict_with_ci(d, half, [new[s] - old[s] for s in seeds], p, MARGIN)
    return f'{head}: Δ {d:+.4f} [{d - half:+.4f}, {d + half:+.4f}] p={p:.3g} -> {reading}'


def rho_axis_table(folder, extension=None):
    """Sophia-G's tuning grid as rho x lr: each point's final val loss and mean win rate (the fraction of
    coordinates not clipped; the authors tune rho for 0.1-0.5), the CPU tuning's points and, once recorded, the
    rho axis's extension (its record folder's sophiag/); the chosen point in bold: the extension's tuned.json's
    choice once recorded (tuning over the whole grid), else the CPU tuning's."""
    extension = extension or RECORDS / 'ntng-sophia-rho-2026-12-07'
    tuned_json = extension / 'tuned.json' if (extension / 'tuned.json').is_file() else folder / 'tuned.json'
    record = read_tuned(tuned_json, {'sophiag': ('lr', 'rho')})
    tuned = record['tuned']['sophiag']
    points = {}
    for run in record_runs([folder / 'sophiag', extension / 'sophiag'], keys=('rho', 'lr')):
        points[(run['config']['rho'], run['config']['lr'])] = (run['final'], run['stats'].get('win_rate', math.nan))
    rhos, lrs = sorted({k[0] for k in points}), sorted({k[1] for k in points})
    lines = [f"budget {record['budget']:g} RST, seed(s) {', '.join(map(str, record['seeds']))}: final val loss "
             '(mean win rate over the run); the chosen point in bold; — not run', '',
             '| rho | ' + ' | '.join(f'lr {lr:g}' for lr in lrs) + ' |', '| --- |' + ' --- |' * len(lrs)]
    for rho in rhos:
        cells = []
        for lr in lrs:
            if (rho, lr) not in points:
                cells.append('—')
                continue
            final, win = points[(rho, lr)]
            text = f'{final:.4f} ({win:.3f})'
            cells.append(f'**{text}**' if (rho, lr) == (tuned['rho'], tuned['lr']) else text)
        lines.append(f'| {rho:g} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def tuning(folder, rows=()):
    from studies.ntng import tuning_table
    read_tuned(folder / 'tuned.json')
    return tuning_table(folder / 'tuned.json', rows)


def today_tuning(folder):
    """The rows the 2026-12-06 tuning added (its tuned.json also carries the CPU tuning's rows, unchanged), beside the
    baseline's grid for reference."""
    return tuning(folder / 'tune', ('baseline', 'muon', 'sfadamw'))


def madpo_table(folder):
    from studies.madpo import MadpoStudyConfig
    from studies.madpo_report import report
    return report(folder, MadpoStudyConfig.arms, MadpoStudyConfig.matched_kls)


def madpo_precision_table(folder):
    from studies.madpo import PrecisionConfig
    from studies.madpo_report import report
    return report(folder, PrecisionConfig.arms, PrecisionConfig.matched_kls)


def madpo_precision_figure(folder, png):
    from studies.madpo import PrecisionConfig
    madpo_figure(folder, png, PrecisionConfig.arms)


def madpo_figure(folder, png, arms=None):
    import shutil
    import tempfile
    from studies.madpo import MadpoStudyConfig
    from studies.madpo_report import load_runs, methods_of, plot_frontiers
    curves = load_runs(folder)
    with tempfile.TemporaryDirectory() as tmp:
        plot_frontiers({k: v for k, v in curves.items() if k[1] == 'high'}, methods_of(curves, arms or MadpoStudyConfig.arms), Path(tmp))
        shutil.copyfile(Path(tmp) / 'frontier_high.png', png)


def slm_table(folder):
    from studies.slm import StudyConfig
    from studies.slm_report import report_text
    return report_text(folder, StudyConfig.noise, StudyConfig.k)


def slm_control_table(folder):
    from studies.slm import ControlConfig
    from studies.slm_report import control_text, report_text
    return (report_text(folder, ControlConfig.noise, ControlConfig.k) + '\n\n'
            + control_text(folder, ControlConfig.noise, ControlConfig.k))


def slm_figure(folder, png):
    import shutil
    import tempfile
    from studies.slm_report import load_runs, plot_curves
    with tempfile.TemporaryDirectory() as tmp:
        plot_curves(Path(tmp), load_runs(folder))
        shutil.copyfile(Path(tmp) / 'compare_curves.png', png)


def update_costs(folder):
    """Each optimizer's update as the committed cost tables of the ablation's shape charge it: seconds, x AdamW's
    update, and a plain step's cost (4-block fwd+bwd, the update; Sophia-G's Hessian step every 10th) relative to
    the baseline's, which sets how many steps a budget buys; where the entry was added later (calibrate.py
    --rst_add), the machine and date of its measurement."""
    lines = []
    for name, path in (('CPU', 'config/rst/gpt_L4_H4_D128_T128_V256_B32.json'), ('H200 (rescaled)', 'config/rst/h200/gpt_L4_H4_D128_T128_V256_B32.json')):
        table = cost_table(path)
        full = table['fwd_bwd'][max(table['fwd_bwd'], key=int)]
        baseline = full + table['optimizer']['adamw']
        for opt in ('adamw', 'lion', 'sophiag', 'muon', 'sfadamw'):
            update = table['optimizer'].get(opt)
            if update is None:
                lines.append([name, opt, 'not measured', '', '', ''])
                continue
            step = full + update + table['hessian'].get(opt, 0.0) / 10
            added = table.get('added', {}).get(f'optimizer:{opt}')
            lines.append([name, opt, f'{update * 1e3:.3f}', f"{update / table['optimizer']['adamw']:.2f}", f'{step / baseline:.3f}',
                          f"added {added['date']} ({added['device']}, {added['threads']} threads)" if added else f"calibrated {table['date']}"])
    header = ['table', 'optimizer', 'update (ms)', 'x AdamW update', 'step / baseline step', 'measured']
    return '\n'.join('| ' + ' | '.join(row) + ' |' for row in (header, ['---'] * len(header), *lines))


SECTIONS = {
    'ntng_cpu_tuning': Section('ntng-cpu-2026-11-30/tune', tuning),
    'ntng_cpu': Section('ntng-cpu-2026-11-30/ablation', ntng_table, ntng_figure),
    'ntng_h200': Section('ntng-h200-2026-12-06', second_system_table),
    'ntng_lr_check': Section('ntng-lr-check-2026-12-06', lr_check),
    'ntng_lr_rerun': Section('ntng-lr-check-2026-12-06', lr_rerun_table),
    'ntng_960': Section('ntng-960-2026-12-07', long_table),
    'sophia_rho_axis': Section('ntng-cpu-2026-11-30/tune', rho_axis_table),
    'update_costs': Section('ntng-today-2026-12-06', update_costs),
    'today_tuning': Section('ntng-today-2026-12-06', today_tuning),
    'today': Section('ntng-today-2026-12-06', today_table),
    'ntng_rho': Section('ntng-rho-2026-12-07', rho_table),
    'finals_all_val': Section('ntng-today-2026-12-06', finals_table),
    'slm': Section('slm-2026-11-30', slm_table, slm_figure),
    'madpo': Section('madpo-2026-11-30', madpo_table, madpo_figure),
    'slm_control': Section('slm-control-2026-12-06', slm_control_table),
    'madpo_precision': Section('madpo-precision-2026-12-06', madpo_precision_table, madpo_precision_figure),
}


def evidence_hash(folder):
    """sha256 over every run's config.json and log.jsonl (and tuned.json) under folder: what a figure shows."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob('*') if p.name in ('config.json', 'log.jsonl', 'tuned.json')):
        h.update(str(path.relative_to(folder)).encode() + b'\0' + path.read_bytes())
    return h.hexdigest()


def render():
    """RESULTS.md's text: the template with each {{name}} line replaced by its section's table."""
    text = TEMPLATE.read_text()
    unknown = set(re.findall(r'^\{\{(\w+)\}\}$', text, re.M)) - set(SECTIONS)
    if unknown:
        raise UserError(f"{TEMPLATE} names unknown section(s) {', '.join(sorted(unknown))}: add them to SECTIONS")

    check_records_whole(RECORDS)

    def table(match):
        section = SECTIONS[match.group(1)]
        folder = RECORDS / section.records
        if not folder.is_dir():
            raise UserError(f'the record folder {folder} of section {match.group(1)} is missing')
        return section.table(folder)
    return re.sub(r'^\{\{(\w+)\}\}$', table, text, flags=re.M)


def check_records_whole(records):
    """Refuse damaged evidence before any table is read: every .json file under the records and every line of a
    .jsonl one is JSON (studies.records.json_problem: the readers drop a killed run's partial last line, so a
    record cut short would otherwise pass for a shorter run and quietly change a table's means)."""
    for path in sorted(p for p in records.rglob('*.json*') if p.suffix in ('.json', '.jsonl')):
        problem = json_problem(path)
        if problem:
            raise damaged(f'{shown(path)} {problem}', path)


# -----------------------------------------------------------------------------
# what the tables read of a record, each field checked before it is read (the runs' through studies.compare's
# checks, as studies.records checks a run it copies): a damaged record is one line, never a traceback or a table
# quietly changed

def shown(path):
    """A path as a message names it: relative to the repository where it lies in it."""
    path = Path(path)
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def damaged(what, path):
    """The one line that refuses a damaged record: what is wrong where, and the fix (git holds the record whole)."""
    return UserError(f'{what}: the record is damaged; restore it (git checkout -- {shown(path)}) or record its run again')


def positive(v):
    return is_number(v) and v > 0


def record_runs(folders, keys=()):
    """runs.read_run of every run folder under folders, each refused in one line unless it is whole
    (studies.records.read_whole_run: compare's field checks, the budget spent) and config.json's `keys` (numbers a
    table reads beyond compare's fields: an lr, Sophia-G's rho) are positive numbers, found under 'config'."""
    runs = []
    for path in sorted({p.parent for f in map(Path, folders) if f.is_dir() for p in f.rglob('config.json')}):
        run, problem = read_whole_run(path)
        config = json.loads((path / 'config.json').read_text())['config'] if run else {}
        problem = problem or fields_problem(config, positive_fields(keys), 'config.json: ')
        if problem:
            raise damaged(f'{shown(path)}/{problem}', path)
        runs.append({**run, 'config': {k: config[k] for k in keys}})
    return runs


def positive_fields(keys):
    return {k: (True, positive, 'a positive number') for k in keys}


TUNED_FIELDS = {  # a tuned.json's keys the tables read (studies.ntng.tuning_table): (required, the check, what it must be)
    'budget': (True, positive, 'a positive number'),
    'seeds': (True, lambda v: isinstance(v, list) and all(type(s) is int for s in v), 'a list of seeds'),
    'tuned': (True, lambda v: isinstance(v, dict), "a record of each row's tuning"),
}
ROW_FIELDS = {  # ... of each row's tuning (its lr, the lr_key's, is checked after them)
    'grid': (True, lambda v: isinstance(v, list), 'a list of grid points'),
    'lr_key': (False, lambda v: isinstance(v, str), 'the name of the lr the grid moves'),
    'at_edge': (False, lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), 'a list of axis names'),
}
POINT_FIELDS = {  # ... of each grid point
    'lr': (True, positive, 'a positive number'),
    'extra': (True, lambda v: isinstance(v, dict) and all(is_number(x) for x in v.values()),
              "a record of the point's other axes (numbers)"),
    'final': (True, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v),
              'a number (inf where the point failed)'),
}


def tuned_problem(record, chosen):
    """Why a parsed tuned.json cannot be read by the tables, naming the field ('tuned.muon.grid[0].extra is
    missing (...)'), or None. chosen: {row: keys} of its chosen values a table reads beyond its lr."""
    problem = fields_problem(record, TUNED_FIELDS) or next(
        (f'tuned.{row} is missing (its tuning)' for row in chosen if row not in record['tuned']), None)
    return problem or next((p for row, tuning in record['tuned'].items()
                            if (p := row_problem(tuning, f'tuned.{row}.', chosen.get(row, ())))), None)


def row_problem(tuning, where, chosen):
    """Why one row's tuning cannot be read: its fields, its chosen lr (and the chosen keys a table reads), each point."""
    problem = fields_problem(tuning, ROW_FIELDS, where)
    if problem:
        return problem
    points = (fields_problem(point, POINT_FIELDS, f'{where}grid[{i}].') for i, point in enumerate(tuning['grid']))
    return fields_problem(tuning, positive_fields((tuning.get('lr_key', 'lr'), *chosen)), where) or next(filter(None, points), None)


def read_record(path):
    """A record file's JSON value, refused in one line where the file is missing or holds no JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise damaged(f"{shown(path)} is {'not a JSON record' if Path(path).is_file() else 'missing'}", path) from None


def read_tuned(path, chosen=None):
    """A recorded tuned.json, refused in one line naming the field unless every field the tables read is readable
    (tuned_problem); chosen: {row: keys} of its chosen values a table reads beyond its lr (rho_axis_table's rho)."""
    record = read_record(path)
    problem = tuned_problem(record, chosen or {})
    if problem:
        raise damaged(f'{shown(path)}: {problem}', path)
    return record


def recorded_floors(path):
    """A recorded floors file (<out>.floors.json), refused in one line naming the field unless compare can read it
    (studies.compare.floors_problem), as the path compare_report takes: the fix named is git's, not a rerun."""
    problem = floors_problem(read_record(path))
    if problem:
        raise damaged(f'{shown(path)}: {problem}', path)
    return str(path)


def dated_entries(v):
    return isinstance(v, dict) and all(isinstance(a, dict) and {'date', 'device', 'threads'} <= a.keys() for a in v.values())


COST_TABLE_DATES = {  # what update_costs shows of a cost table beyond what budget.load_table checks
    'date': (True, lambda v: isinstance(v, str), 'the date it was calibrated'),
    'added': (False, dated_entries, "a record of each added entry's date, device and threads"),
}


def cost_table(path):
    """A committed cost table (config/rst/...) as update_costs reads it: checked as budget.load_table checks a run's,
    and the dates it shows (COST_TABLE_DATES)."""
    from budget import load_table
    try:
        table = load_table(Path(path).stem, override=str(ROOT / path))
    except UserError as e:  # its fix (calibrate again) would replace the committed evidence
        raise UserError(f'{str(e).split(": calibrate")[0].split(": price")[0]}: restore it (git checkout -- {path})') from None
    problem = fields_problem(table, COST_TABLE_DATES)
    if problem:
        raise UserError(f'{path}: {problem}: restore it (git checkout -- {path})')
    return table


def draw_figures():
    FIGURES.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, section in SECTIONS.items():
        if section.figure:
            folder = RECORDS / section.records
            section.figure(folder, FIGURES / f'{name}.png')
            sources[f'{name}.png'] = {'records': section.records, 'sha256': evidence_hash(folder)}
    atomic_write_bytes(FIGURES / 'sources.json', json.dumps(sources, indent=1).encode())


@dataclasses.dataclass(frozen=True)
class ResultsConfig:
    figures: bool = False   # also redraw docs/figures/ (needs matplotlib)
    check: bool = False     # write nothing: exit 1 if RESULTS.md differs from what the records give


def main(cfg):
    if cfg.figures:  # checked before anything is written: without it each figure would be a file never drawn
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError('--figures=True draws with matplotlib, which is not installed: pip install matplotlib, or '
                            'leave out --figures') from None
    text = render()
    if cfg.check:
        old = OUT.read_text().splitlines() if OUT.exists() else []
        new = text.splitlines()
        diff = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        if old != new:
            print(f'RESULTS.md line {diff + 1} differs from the records: `python -m studies.results` rewrites it',
                  file=sys.stderr)
            sys.exit(1)
        print('RESULTS.md matches the records')
        return
    atomic_write_bytes(OUT, text.encode())
    print(f'wrote {OUT}')
    if cfg.figures:
        draw_figures()
        print(f'wrote {FIGURES}')


if __name__ == '__main__':
    cli(main, ResultsConfig)
