"""No Train No Gain's comparison protocol: equal-effort tuning, paired-seed ablation, the comparison table.

No Train No Gain (Kaddour et al., NeurIPS 2023, arXiv 2307.06440) asks whether an efficient-training
method beats a fully decayed baseline at the same compute budget (budget.py counts it). The idea:
tune every method, the baseline included, over the same lr grid on seeds never reported (equal effort);
run every method at every budget on the same paired seeds (a seed fixes initialisation and data order);
table each method's paired difference to the baseline: t-based 95% CI, Holm-adjusted p, n-gram floors.

    python -m studies.ntng tune --jobs=2                                  # -> out/tune/tuned.json, tune.png
    python -m studies.ntng ablate --tuned=out/tune/tuned.json --jobs=2    # methods x budgets x seeds, then compare
    python -m studies.ntng compare out/ablation --out=ablation            # -> ablation.md, ablation.png
    python -m studies.ntng lr_check --tuned=out/tune/tuned.json --jobs=2  # tuned lr x0.5, x1, x2 at the largest budget
                                                                          # (studies/lr_check.py)
"""
import dataclasses
import hashlib
import importlib
import itertools
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from budget import pyplot
from configurator import ConfigError, UserError, check_distinct, cli, key, read_config_file, require, require_writable
from data.loader import NAME_RE, FolderLock, atomic_write_bytes, is_number
from runs import METHOD_STATS, derive_label, read_run, system_suffix
from studies.compare import (CompareConfig, check_one_config_per_row, check_one_run_per_cell, check_target, compare,
                             fields_problem, read_checked_run, run_folders, without_il_models)
from studies.plan import Run, run_plan, study_lock


# -----------------------------------------------------------------------------
# the No Train No Gain ablation in one command: methods x budgets x seeds

@dataclass(frozen=True)
class AblateConfig:
    config: str = key('config/ablation.py', 'path')  # COMMON, BUDGETS, QUICK_BUDGETS, METHODS (your own Python)
    out_dir: str = key('out/ablation', 'path')  # <row>/b<budget>/s<seed> run folders, ablation.md and .png
    methods: tuple = ('',)               # ('',) = every method in the config file
    budgets: tuple = key((0.0,), '>=0')  # (0.0,) = the config file's BUDGETS (QUICK_BUDGETS with --quick)
    seeds: tuple = key((0, 1, 2, 3, 4), '>=0')  # paired: a seed fixes initialisation and data order for every method
    quick: bool = False                  # a smoke sweep: QUICK_BUDGETS, one seed, QUICK_COMMON's keys over every row's
    baseline_schedule: str = key('cosine', ('cosine', 'wsd_branches'))  # 'wsd_branches' adds a WSD row trained as cooldown branches
    target: str = 'auto'                 # time-to-target: 'auto' (the sweep file's TARGET, else see compare), a number, 'none'
    tuned: str = ''                      # a tuned.json from `python -m studies.ntng tune` of this sweep: its values override METHODS'
    rst_table: str = ''                  # charge every run under this cost table (a second reference system: its rows
    # are labelled by its folder, e.g. 'stack [h200]'; compare them with the first system's runs side by side)
    jobs: int = key(1, '>0')             # runs at once, the CPU threads split between them
    nproc: int = key(1, '>0')            # processes per run: > 1 starts each under torchrun, one GPU each (studies.plan)

    def __post_init__(self):
        check_target(self.target)
        require(not self.rst_table or Path(self.rst_table).is_file(),
                f'--rst_table={self.rst_table} not found: give a cost table (config/rst/h200/... or your calibrate.py output)')
        check_distinct('seeds', self.seeds, '(0, 1, 2, 3, 4)')
        check_distinct('budgets', self.budgets, '(120.0, 240.0)')


def read_sweep(path):
    """The sweep file's COMMON, BUDGETS, QUICK_BUDGETS, METHODS (and optional TUNE: extra grid axes;
    TUNED_AS: {row: another row whose tuned values it runs with}; LR_KEY: {row: the lr key its grid moves};
    QUICK_COMMON: COMMON's overrides under --quick; TARGET: time to target's val loss, fixed before the runs)."""
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
        'QUICK_COMMON': (is_dict_of(spec.get('QUICK_COMMON', {}), lambda v: True), "a dict of train.py keys (--quick's)"),
        'LR_KEY': (is_dict_of(spec.get('LR_KEY', {}), lambda v: isinstance(v, str) and v.endswith('lr')),
                   "a dict of row -> the lr key its grid moves (e.g. 'muon_lr')"),
        'TARGET': (spec.get('TARGET') is None or (type(spec['TARGET']) in (int, float) and 0 < spec['TARGET'] < math.inf),
                   'a positive number: the val loss of time to target, declared before the runs'),
    }
    for name, (ok, shape) in shapes.items():
        require(ok, f'{path}: {name} must be {shape} (see config/ablation.py)')
    for row in spec['METHODS']:  # a row is a folder of the sweep: '../x' would write outside --out_dir
        require(NAME_RE.fullmatch(row), f"{path}: METHODS row '{row}' names a run folder: give letters, digits, _ . - only, starting with a letter, digit or _")
    for row in spec.get('LR_KEY', {}):
        require(row in spec['METHODS'], f"{path}: LR_KEY names {row}, which METHODS does not have")
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
    quick = spec.get('QUICK_COMMON', {}) if cfg.quick else {}  # a GPU recipe's smoke test: a model and data a CPU runs
    methods = chosen_methods(spec, cfg.methods, cfg.config)
    rows = [*methods, *(['baseline'] if cfg.baseline_schedule == 'wsd_branches' else [])]  # the WSD row runs with the baseline's values
    tuned, tuned_il = read_tuned(cfg.tuned, spec, cfg.config, min(budgets), rows, seeds) if cfg.tuned else ({}, None)
    # the IL model that tuning's RHO-LOSS grid trained serves this sweep too if it was trained for this largest budget
    il = tuned_il if tuned_il and tuned_il['il_budget'] == max(budgets) else il_args(cfg.out_dir, max(budgets))
    system = {'rst_table': cfg.rst_table} if cfg.rst_table else {}
    plan = [planned_run(label, script, {**spec['COMMON'], **row_il(args, il, f'{cfg.out_dir}/{label}/b{b:g}/s{seed}'), **args,
                                        **tuned.get(spec.get('TUNED_AS', {}).get(label, label), {}), **quick, **system, 'budget': b,
                                        'seed': seed, 'label': label, 'out_dir': f'{cfg.out_dir}/{label}/b{b:g}/s{seed}'}, cfg.nproc)
            for b in budgets for seed in seeds for label, (script, args) in methods.items()]  # cheapest budget first
    if cfg.baseline_schedule == 'wsd_branches':
        plan += [planned_run('wsd (branches)', 'train.py', {
            **spec['COMMON'], **tuned.get('baseline', {}), **system, 'schedule': 'wsd', 'budget': min(budgets), 'seed': seed,
            'branch_budgets': tuple(b / min(budgets) for b in budgets), 'label': 'wsd (branches)',
            'out_dir': f'{cfg.out_dir}/wsd_branches/s{seed}'}, cfg.nproc) for seed in seeds]
    return plan


def planned_run(label, script, args, nproc=1):
    """One run of a sweep for the plan runner: RHO-LOSS's runs sharing an IL model wait for the first to build it;
    a WSD trunk skips and resumes its own branches; nproc > 1: under torchrun."""
    return Run(f"{label} budget {args['budget']:g} seed {args['seed']}", script, args,
               exclusive=args.get('il_out_dir', ''), self_resuming=bool(args.get('branch_budgets')), nproc=nproc)


def row_il(args, il, run_dir):
    """A RHO-LOSS run's IL model: the sweep's shared one (il), or with il_budget_frac the run's own, beside its
    folder, trained at that fraction of its budget in one run (no doublings), so a charged run pays for exactly
    the IL model it uses."""
    if args.get('method') != 'rho':
        return {}
    if args.get('il_budget_frac'):
        return {'il_out_dir': f'{run_dir}_il', 'il_cache': f'{run_dir}_il_cache', 'il_doublings': 0}
    return il


def il_args(out_dir, budget):
    """RHO-LOSS's irreducible-loss model is trained once per sweep (by its first RHO-LOSS run: from the
    largest budget, doubling while its val loss improves, rho.train_il) and reused by every other, tuning
    runs and ablation runs alike."""
    return {'il_out_dir': f'{out_dir}/il', 'il_cache': f'{out_dir}/il_cache', 'il_budget': budget}


def ablate(cfg):
    require_writable(Path(cfg.out_dir) / 'ablation.md')
    plan = sweep_plan(cfg)
    with study_lock(cfg.out_dir):  # a second study on this folder refuses here, before it starts or truncates anything
        check_one_system(cfg.out_dir, cfg.rst_table)
        check_sweep_folder(plan, cfg.out_dir)
        run_plan(plan, cfg.jobs)
        return compare([cfg.out_dir], out=f'{cfg.out_dir}/ablation', target=sweep_target(cfg))


def check_sweep_folder(plan, out_dir):
    """Before any run: compare reads every run under out_dir, so the planned runs beside the runs there that the
    plan does not replace must make a table it can read: one run per cell (a tuning in this folder shares a label
    and seed across its grid) and one configuration per row (a rerun with other keys, e.g. --tuned, of some seeds
    only). Refused here in one line, not after hours of runs."""
    planned = [planned_cell(run) for run in plan if not run.self_resuming]  # a WSD trunk's branches are its own
    mine = [os.path.realpath(run.out_dir) for run in plan]  # a run in (or under) one of these is the plan's to replace

    def replaced(path):
        return any(os.path.commonpath([os.path.realpath(path), d]) == d for d in mine)
    found = run_folders([out_dir]) if any(Path(out_dir).rglob('config.json')) else []
    theirs = [r for r in without_il_models([read_checked_run(d) for d in found])[0] if 'error' not in r and not replaced(r['path'])]
    check_one_run_per_cell(theirs + planned)
    check_one_config_per_row(theirs + planned)


def planned_cell(run):
    """A planned run as compare will read it once it has run (its row, budget unit and seed), its config the keys
    the plan sets ('planned': the rest are its script's defaults, which compare checks once the run has written them)."""
    defaults = {f.name: f.default for f in dataclasses.fields(script_config(run.script))}
    config = json.loads(json.dumps(run.args))  # as config.json will record it: tuples as lists
    full = {**defaults, **config}
    return {'path': str(run.out_dir), 'label': derive_label(full) + system_suffix(full), 'unit': full['budget_unit'],
            'budget': full['budget'], 'seed': full['seed'], 'config': config, 'planned': True}


def check_one_system(out_dir, rst_table):
    """A sweep folder holds runs charged under one cost table: a sweep under another, into the same folder, would
    replace them (the plan runner replaces a run of other keys), so it is refused before any run."""
    for config in sorted(Path(out_dir).glob('*/b*/s*/config.json')):
        try:
            c = json.loads(config.read_text())['config']
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run's: the plan runner replaces it
        theirs = c.get('rst_table') or ''
        if c.get('budget_unit') == 'rst' and theirs != rst_table:
            raise UserError(f"{out_dir} holds runs charged under {theirs or 'the default cost table'} ({config.parent}): "
                            f"give another --out_dir for a sweep under {rst_table or 'the default cost table'}")


def sweep_target(cfg):
    """--target, or when it is 'auto' the sweep file's TARGET if it declares one: a target fixed before the runs
    does not move when a column completes, as compare's 'auto' (the baseline's largest complete budget) does."""
    if cfg.target != 'auto' or cfg.quick:
        return cfg.target
    target = read_sweep(cfg.config).get('TARGET')
    return 'auto' if target is None else repr(float(target))


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
    nproc: int = key(1, '>0')            # processes per run: > 1 starts each under torchrun, one GPU each (studies.plan)

    def __post_init__(self):
        check_distinct('seeds', self.seeds, '(1000,)')


def tune_point(args, common, lr, extra, lr_key='lr'):
    """A method's overrides at learning rate lr (of its lr_key: Muon's grid moves muon_lr, its AdamW part
    stays at COMMON's lr): Lion keeps lr x weight_decay at its configured product."""
    point = {**args, lr_key: lr, **extra}
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
    earlier_tuning(out / 'tuned.json', record)  # checked before hours of runs, not after (and again at the write)
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
        results[g.label] = {**{k: v for k, v in tune_point(g.args, common, best['lr'], best['extra'], g.lr_key).items()
                               if k in (g.lr_key, 'weight_decay', *g.axes)}, 'lr_key': g.lr_key, 'grid': g.summaries(),
                            'at_edge': edges}
        print(f"{g.label}: best {g.lr_key} {best['lr']:.3g} {best['extra'] or ''} final val loss {best['final']:.4f}"
              + (f" (still at an edge of its {', '.join(edges)} axis, which can extend no further: the optimum may "
                 'lie beyond it)' if edges else ''), flush=True)
    record = write_tuned(out / 'tuned.json', record, results, next((g.il for g in grids if g.il), None))
    plot_tuning(record['tuned'], out / 'tune.png')
    print(f"wrote {out / 'tuned.json'}")
    return results


def write_tuned(path, record, results, il):
    """tuned.json: the rows the file holds now (re-read under its lock, not as it was before the runs: a tune of
    other rows into the same out_dir may have written it since) with this tuning's rows over them -> the record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(path.parent / f'.{path.name}.lock', lambda pid: UserError(
        f'{path} is being written by another tune (pid {pid})')).acquire(wait=True)  # a write's moment: wait for it
    try:
        earlier = earlier_tuning(path, record)
        record = {**record, 'tuned': {**earlier.get('tuned', {}), **results}}  # rows tuned earlier for this sweep stay
        il = il or earlier.get('il')
        if il:
            record['il'] = il  # the IL model the RHO-LOSS grid trained: ablate reuses it at the same il_budget
        atomic_write_bytes(path, json.dumps(sealed(record), indent=1).encode())
    finally:
        lock.release()
    return record


def earlier_tuning(path, record):
    """The tuned.json already at path (its methods are kept), {} if none; refused when it is not one, was
    edited since tune wrote it, or was made for another sweep (other COMMON, budget or seeds, or another
    definition of a row it tuned): it would be overwritten. Rows the sweep file added since are welcome."""
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        earlier = type(e).__name__
    problem = earlier if isinstance(earlier, str) else tuned_problem(earlier)
    require(problem is None, f'{path} is not a tuned.json from `python -m studies.ntng tune` ({problem}): move it away or '
                             'give another --out_dir')
    earlier = unsealed(earlier, path)
    differ = [k for k in ('common', 'budget', 'seeds') if earlier[k] != record[k]]
    differ += [f'METHODS[{row!r}]' for row in earlier['tuned'] if earlier['methods'].get(row) != record['methods'].get(row)]
    require(not differ, f"{path} holds a tuning of another sweep (its {', '.join(differ)} differ): give another "
                        f'--out_dir, or move it away to tune afresh')
    return earlier


def sealed(record):
    """A tuned.json's record with the sha256 of its content: a hand edit (a relabelled row, a moved lr) is
    refused by unsealed rather than run as if tune had chosen it."""
    body = {k: v for k, v in record.items() if k != 'sha256'}
    return {**body, 'sha256': hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def unsealed(record, path):
    """The record of a tuned.json (its fields checked already: tuned_problem) whose sha256 matches its content,
    else a UserError naming the edit."""
    if 'sha256' not in record:
        raise UserError(f'{path} carries no sha256 of its content (a tuned.json written before tune sealed its '
                        'output, or by hand): run `python -m studies.ntng tune` again, or seal it with '
                        '`python -m studies.ntng seal PATH` once you have checked it by eye')
    if sealed(record)['sha256'] != record['sha256']:
        raise UserError(f'{path} was edited after tune wrote it (its sha256 no longer matches its content): '
                        'run tune again, or seal it with `python -m studies.ntng seal PATH` if the edit is yours')
    return record


MAX_EXTENSIONS = 3  # times an edge extends one axis of a tuning grid


class TuneGrid:
    """One method's lr grid: lr0 x 2^k for k in ks, crossed with its TUNE axes, on the tuning seeds."""

    def __init__(self, label, script, args, spec, budget, cfg):
        self.label, self.script, self.args, self.budget, self.seeds = label, script, args, budget, cfg.seeds
        self.common, self.out = spec['COMMON'], Path(cfg.out_dir) / label
        self.lr_key = spec.get('LR_KEY', {}).get(label, 'lr')  # the lr the grid moves: Muon's muon_lr
        self.lr0 = args.get(self.lr_key, self.common.get(self.lr_key, 2e-3))
        self.axes = {name: tuple(sorted(values)) for name, values in spec.get('TUNE', {}).get(label, {}).items()}
        self.ks = list(range(-(cfg.points // 2), cfg.points - cfg.points // 2))
        self.extended = dict.fromkeys(['lr', *self.axes], 0)  # an edge extends an axis MAX_EXTENSIONS times
        self.il = il_args(cfg.out_dir, max(spec['BUDGETS'])) if args.get('method') == 'rho' else {}
        self.nproc = cfg.nproc

    def grid(self):  # the method's own lr first: RHO-LOSS's first run trains the shared IL model with it
        extras = [dict(zip(self.axes, v)) for v in itertools.product(*self.axes.values())] or [{}]
        return [(self.lr0 * 2.0 ** k, extra) for k in sorted(self.ks, key=abs) for extra in extras]

    def plan(self):
        return [planned_run(self.label, self.script, {
                    **self.common, **self.il, **tune_point(self.args, self.common, lr, extra, self.lr_key), 'budget': self.budget,
                    'seed': seed, 'label': f'{self.label} (tuning)', 'out_dir': str(self.out / point_name(lr, extra) / f's{seed}')},
                    self.nproc) for lr, extra in self.grid() for seed in self.seeds]

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
        args = {**self.common, **self.args, **tune_point(self.args, self.common, self.lr0, {name: value}, self.lr_key)}
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
    record = read_tuned_record(path, spec)
    tuned, methods, il = record['tuned'], record['methods'], record.get('il')
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
                         f"(python -m studies.ntng tune --methods=...), or leave them out with --methods")
    shared = sorted(set(record.get('seeds', [])) & set(seeds))
    require(not shared, f'--tuned={path} was tuned on seed(s) {shared}, which this sweep reports: tuning seeds are '
                        'never reported; give --seeds without them, or tune on other seeds')
    return {label: {k: v for k, v in t.items() if k not in ('grid', 'at_edge', 'lr_key')} for label, t in tuned.items()}, il


def read_tuned_record(path, spec=None):
    """A tuned.json's record, every field checked (tuned_problem) and its seal, before any run: a value a run
    would refuse only after its folder exists (lr Infinity, weight_decay 'x', a key no script has) is named here."""
    if not Path(path).is_file():
        raise UserError(f'--tuned={path} not found: give the tuned.json that `python -m studies.ntng tune` wrote '
                        '(<its --out_dir>/tuned.json), or leave --tuned out')
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f'--tuned={path} is not a JSON file ({type(e).__name__}): give the tuned.json that '
                        '`python -m studies.ntng tune` wrote') from None
    problem = tuned_problem(record, spec)
    require(problem is None, f'--tuned={path} is not a tuned.json from `python -m studies.ntng tune`: {problem}: '
                             f'tune again, or correct it and seal it (python -m studies.ntng seal {path})')
    return unsealed(record, path)


def is_positive(v):
    return is_number(v) and v > 0


TUNED_FIELDS = {  # a tuned.json's keys (tune writes them; read_tuned reads them): (required, the check, what it must be)
    'common': (True, lambda v: isinstance(v, str), "the sweep file's COMMON as text"),
    'methods': (True, lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                "a record of row -> the sweep file's METHODS entry as text"),
    'budget': (True, is_positive, 'a positive number (the budget tuned at)'),
    'seeds': (True, lambda v: isinstance(v, list) and all(type(x) is int for x in v), 'a list of integer seeds'),
    'tuned': (True, lambda v: isinstance(v, dict) and all(isinstance(t, dict) for t in v.values()),
              'a record of row -> its tuned values'),
    'il': (False, lambda v: isinstance(v, dict), "a record of the IL model's il_out_dir, il_cache, il_budget"),
}
IL_FIELDS = {'il_out_dir': (True, lambda v: isinstance(v, str) and v != '', 'a folder'),
             'il_cache': (True, lambda v: isinstance(v, str) and v != '', 'a folder'),
             'il_budget': (True, is_positive, 'a positive number')}


def tuned_problem(record, spec=None):
    """Why a tuned.json's record cannot be run, naming the field ("tuned.lion.lr=inf is not a positive number"),
    or None. With the sweep file's spec a row of it may hold only what tune writes for it: its lr key, weight
    decay, its TUNE axes (each of the kind of value its axis has), the grid and the edges."""
    problem = fields_problem(record, TUNED_FIELDS)
    if problem is None and 'il' in record:
        problem = fields_problem(record['il'], IL_FIELDS, 'il.')
    if problem:
        return problem
    for row, t in record['tuned'].items():
        lr_key = t.get('lr_key', 'lr')
        axes = (spec or {}).get('TUNE', {}).get(row, {})
        fields = {'lr_key': (False, lambda v: isinstance(v, str) and v.endswith('lr'), "the lr key its grid moves ('muon_lr')"),
                  lr_key if isinstance(lr_key, str) else 'lr': (True, is_positive, 'a positive number'),
                  'weight_decay': (False, lambda v: is_number(v) and v >= 0, 'a number >= 0'),
                  'grid': (False, lambda v: isinstance(v, list), 'a list of grid points'),
                  'at_edge': (False, lambda v: isinstance(v, list), 'a list of axes'),
                  **{name: (False, axis_kind(values), f'a value of the kind of TUNE {row} {name} {values!r}')
                     for name, values in axes.items()}}
        problem = fields_problem(t, fields, f'tuned.{row}.')
        if problem:
            return problem
        unknown = [k for k in t if k not in fields]
        if spec is not None and row in spec['METHODS'] and unknown:
            return f"tuned.{row}.{unknown[0]} is not a key tune writes for {row} (it writes {', '.join(fields)})"
    return None


def axis_kind(values):
    """The check that a value is of the kind a TUNE axis's values are (numbers, or one type: True is no number)."""
    if is_number_value(values[0]):
        return is_number
    return lambda v: type(v) is type(values[0])


def tuning_table(path, rows=()):
    """A tuned.json as a markdown table: each row's chosen values and every grid point's final val loss
    (rows: only these, e.g. the rows a later tuning added; () = all)."""
    record = json.loads(Path(path).read_text())
    lines = [f"tuned at budget {record['budget']:g} on seed(s) {', '.join(map(str, record['seeds']))}; final val "
             'loss per grid point, the chosen one in bold', '', '| row | chosen | grid (lr: final val loss) | at an edge |',
             '| --- | --- | --- | --- |']
    for label, t in ((k, v) for k, v in record['tuned'].items() if not rows or k in rows):
        lr_key = t.get('lr_key', 'lr')
        chosen = ', '.join(f'{k} {value_text(v)}' for k, v in t.items() if k not in ('grid', 'at_edge', 'lr_key'))
        points = sorted(t['grid'], key=lambda g: (sorted(g['extra'].items()), g['lr']))
        grid = '; '.join(('**{}**' if g['lr'] == t[lr_key] and all(t.get(k) == v for k, v in g['extra'].items()) else '{}')
                         .format(f"{value_text(g['lr'])}{''.join(f' {k}={value_text(v)}' for k, v in g['extra'].items())}: "
                                 f"{g['final']:.4f}") for g in points)
        lines.append(f"| {label} | {chosen} | {grid} | {', '.join(t.get('at_edge', [])) or 'no'} |")
    return '\n'.join(lines)


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


# -----------------------------------------------------------------------------
# the command line: python -m studies.ntng {tune|ablate|lr_check|compare|seal}

COMMANDS = {'tune': 'tune [sweep_file.py] [--key=value ...]', 'ablate': 'ablate [sweep_file.py] [--key=value ...]',
            'lr_check': 'lr_check [sweep_file.py] [--key=value ...]',
            'compare': 'compare SWEEP_FOLDER|RUN_FOLDER ... [--key=value ...]', 'seal': 'seal TUNED_JSON'}


def seal(path):
    """Write a tuned.json's sha256 after checking its structure: for a file written before tune sealed its
    output, or an edit of your own that you have checked by eye."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f'{path} is not a tuned.json from `python -m studies.ntng tune` ({type(e).__name__})') from None
    problem = tuned_problem(record)  # the structure read_tuned needs
    require(problem is None, f'{path} is not a tuned.json from `python -m studies.ntng tune` ({problem})')
    atomic_write_bytes(path, json.dumps(sealed(record), indent=1).encode())
    print(f"sealed {path}: sha256 {sealed(record)['sha256'][:16]}")


@dataclass(frozen=True)
class SealConfig:
    """seal takes no keys: one path."""


def main(argv):
    usage = 'usage: python -m studies.ntng {tune|ablate|lr_check|compare|seal} ...  (each command takes --help)'
    if not argv or argv[0] in ('-h', '--help'):  # --help: usage on stdout, exit 0; nothing: on stderr, exit 2
        print(usage if not argv else usage + '\n' + '\n'.join(f'  python -m studies.ntng {u}' for u in COMMANDS.values()),
              file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"unknown command '{argv[0]}': {usage}", file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    if command == 'seal':
        if len(rest) != 1 or rest[0].startswith('-'):
            print(f'usage: python -m studies.ntng {COMMANDS[command]}', file=sys.stderr if rest != ['--help'] else sys.stdout)
            sys.exit(0 if rest == ['--help'] else 2)
        return cli(lambda c: seal(rest[0]), SealConfig, [], COMMANDS[command])
    if command in ('ablate', 'tune', 'lr_check'):  # their config.py is the sweep file
        from studies import lr_check
        rest = [f'--config={a}' if a.endswith('.py') and not a.startswith('--') else a for a in rest]
        entry, config = {'ablate': (ablate, AblateConfig), 'tune': (tune, TuneConfig),
                         'lr_check': (lr_check.lr_check, lr_check.LrCheckConfig)}[command]
        return cli(entry, config, rest, COMMANDS[command])
    dirs = [a for a in rest if not a.startswith('-')]
    return cli(lambda c: compare(dirs, c.out, c.target, c.baseline, c.floors, c.margin), CompareConfig,
               [a for a in rest if a.startswith('-')], COMMANDS[command])


if __name__ == '__main__':
    main(sys.argv[1:])
