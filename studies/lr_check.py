"""The tuned learning rates checked where they are used: each row's tuned lr x0.5, x1 and x2 at the largest
budget, on the tuning seed.

No Train No Gain's protocol tunes every row at the smallest budget; a row whose best lr moves with the budget
is then compared at the larger budgets at an lr that was not its best there. This runs each row as the sweep
would run it at the largest budget (its tuned values, its IL model), with its lr (its LR_KEY: Muon's
muon_lr) times each factor; Lion's weight decay follows its lr, as in tuning, and a RHO-LOSS row with an
IL model of its own (il_budget_frac) trains that model at the scaled lr too. Where x1 is not the best of
the three, that row's largest-budget column is to be rerun at the better lr.

    python -m studies.ntng lr_check --tuned=out/tune/tuned.json --jobs=2     # -> out/lr_check/, lr_check.md
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from configurator import UserError, check_distinct, key, require, require_writable
from data.loader import atomic_write_bytes
from runs import IL_LABEL, read_run, run_diverged
from studies.compare import check_one_config_per_row, run_config
from studies.ntng import AblateConfig, planned_run, read_sweep, row_il, sweep_plan, tune_point
from studies.plan import run_plan, study_lock

FACTORS = (0.5, 1.0, 2.0)  # the three the table judges; others (x4) get a column of their own
RUN_FOLDER = re.compile(r'x(\d+(?:\.\d+)?)/s(\d+)$')  # <row>/x<factor>/s<seed>; an IL model's s<seed>_il is not one


@dataclass(frozen=True)
class LrCheckConfig:
    config: str = key('config/ablation.py', 'path')  # the sweep file
    tuned: str = key('out/tune/tuned.json', 'path')  # its tuning: each row's chosen lr is what is checked
    out_dir: str = key('out/lr_check', 'path')       # <row>/x<factor>/s<seed> run folders, lr_check.md
    methods: tuple = ('',)               # ('',) = every method in the config file
    budget: float = key(0.0, '>=0')      # 0 = the largest of the config file's BUDGETS
    seed: int = key(-1, '>=-1')          # -1 = the tuning's first seed (tuned.json's): a check, never a reported run
    factors: tuple = key(FACTORS, '>0')  # multiples of each row's tuned lr (of its LR_KEY)
    jobs: int = key(1, '>0')             # runs at once, the CPU threads split between them

    def __post_init__(self):
        check_distinct('factors', self.factors, '(0.5, 1.0, 2.0)')


def lr_check_plan(cfg):
    spec = read_sweep(cfg.config)
    budget = cfg.budget or max(spec['BUDGETS'])
    sweep = AblateConfig(config=cfg.config, out_dir=cfg.out_dir, methods=cfg.methods, seeds=(0,), tuned=cfg.tuned,
                         budgets=tuple(sorted({min(spec['BUDGETS']), budget})))  # read as the sweep's, re-seeded below
    runs = [r for r in sweep_plan(sweep) if r.args['budget'] == budget]  # sweep_plan has checked tuned.json
    tuning_seeds = json.loads(Path(cfg.tuned).read_text()).get('seeds') or []
    require(cfg.seed >= 0 or tuning_seeds, f'--tuned={cfg.tuned} names no tuning seed: give --seed')
    seed = cfg.seed if cfg.seed >= 0 else tuning_seeds[0]
    plan = []
    for run in runs:
        label, lr_key = run.args['label'], spec.get('LR_KEY', {}).get(run.args['label'], 'lr')
        shared_il = {k: run.args[k] for k in ('il_out_dir', 'il_cache', 'il_budget') if k in run.args}
        for f in cfg.factors:
            out_dir = f'{cfg.out_dir}/{label}/x{f:g}/s{seed}'
            args = {**tune_point(run.args, run.args, run.args[lr_key] * f, {}, lr_key), 'seed': seed, 'out_dir': out_dir}
            plan.append(planned_run(f'{label} x{f:g}', run.script, {**args, **row_il(args, shared_il, out_dir)}))
    return plan


def lr_check(cfg):
    require_writable(Path(cfg.out_dir) / 'lr_check.md')
    plan = lr_check_plan(cfg)
    with study_lock(cfg.out_dir):  # a second study on this folder refuses here, before it starts anything
        lr_check_rows(cfg.out_dir)  # a folder whose table would be refused is refused before the runs
        run_plan(plan, cfg.jobs, diverged_ok=True)  # an lr too high for the budget is a result
        table = lr_check_table(cfg.out_dir)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(cfg.out_dir) / 'lr_check.md', (table + '\n').encode())
    print(table)


# -----------------------------------------------------------------------------
# the table

def lr_check_table(folder):
    """Markdown: per row (and budget and seed) the final val loss at each factor (and on all of val where
    studies.finals scored it), whether x1 is the best of x0.5, x1, x2, and other factors in a column of their own.
    A run not finished is pending; one whose loss went non-finite is diverged (worse than any finite loss)."""
    lines = ['final val loss on the eval windows (on all of val, where scored by `python -m studies.finals`)', '',
             '| row | budget | seed | lr x0.5 | lr x1 (tuned) | lr x2 | tuned lr best of three | other factors |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for (label, budget, seed), by_factor in lr_check_rows(folder).items():
        cells = [cell(by_factor.get(f)) for f in FACTORS]
        more = '; '.join(f'x{f:g}: {cell(by_factor[f])}' for f in sorted(by_factor) if f not in FACTORS)
        lines.append(f"| {label} | {budget:g} | {seed} | " + ' | '.join(cells)
                     + f' | {best_of_three(by_factor)} | {more or "—"} |')
    return '\n'.join(lines)


def lr_keys(runs):
    """What a row of the check varies by design: the lr its factors move (lr, muon_lr, ...) and Lion's weight
    decay, which follows its lr."""
    return {k for r in runs for k in r['config'] if k.endswith('lr') or k == 'weight_decay'}


def lr_check_rows(folder):
    """{(row, budget, seed): {factor: run}} of the check's run folders: a row compares one seed's runs at one
    budget (a check on another seed or budget is a row of its own, never a cell of this one), one run a factor,
    all of one configuration but for the lr (check_one_config_per_row); a second run of a cell (a copied
    folder, x1 beside x1.0) is refused, naming both."""
    from studies.finals import all_val_loss
    rows, runs = {}, []
    for config in sorted(Path(folder).glob('*/x*/s*/config.json')):
        match, run = RUN_FOLDER.search(config.parent.relative_to(folder).as_posix()), read_run(config.parent)
        if match and 'error' not in run and run['label'] != IL_LABEL:
            run['all_val'] = all_val_loss(run) if run['complete'] else None
            run['diverged'] = not run['complete'] and run_diverged(config.parent)
            run['config'] = run_config(config.parent)
            label, factor = run['label'].replace(' (tuning)', ''), float(match.group(1))
            row = rows.setdefault((label, run['budget'], run['seed']), {})
            if factor in row:
                raise UserError(f"{row[factor]['path']} and {run['path']} are both {label} lr x{factor:g} at budget "
                                f"{run['budget']:g} seed {run['seed']}: a cell takes one run: remove or move one of them")
            row[factor] = run
            runs.append(run)
    check_one_config_per_row(runs, varies=lr_keys(runs))
    return rows


def cell(run):
    if run is None or not (run['complete'] or run['diverged']):
        return 'pending'
    if run['diverged']:
        return 'diverged'
    return f"{run['final']:.4f}" + (f" ({run['all_val']:.4f})" if run['all_val'] is not None else '')


def best_of_three(by_factor):
    """'yes' if x1 has the lowest final of x0.5, x1, x2, else which does (and on all of val, where all three are
    scored); a diverged run counts as worse than every finite final."""
    runs = [by_factor.get(f) for f in FACTORS]
    if not all(r and (r['complete'] or r['diverged']) for r in runs):
        return 'pending'

    def verdict(key):
        best = min(FACTORS, key=lambda f: math.inf if by_factor[f]['diverged'] else by_factor[f][key])
        return 'yes' if best == 1.0 else f'no: x{best:g}'
    scored = all(r['diverged'] or r['all_val'] is not None for r in runs)
    return verdict('final') + (f" (all of val: {verdict('all_val')})" if scored else '')
