"""Budgets, Reference System Time (RST) and the budget-tied learning-rate schedule.

No Train No Gain (Kaddour et al., NeurIPS 2023, arXiv 2307.06440) compares methods at a fixed compute
budget, and charges every step the time it takes on one *reference* machine: the cost is looked up in
a table recorded once, never measured live, so a run stops at the same point on any machine, and a
method that makes steps cheaper (fewer layers) or dearer (scoring passes) is charged exactly that.

A budget is given in one unit: rst (reference seconds), tokens (trained), iters (optimizer steps),
flops (6N-style estimate) or wall (seconds, live). Every unit is counted on every run, so logs can be
plotted against RST whatever the budget was. The LR is a function of budget progress p = spent/budget
and reaches min_lr exactly at p = 1, when the run stops: the baseline is always fully decayed (a
schedule-free optimizer's stays at its peak after the warm-up: lr_at's decay=False). The
logged MFU divides the counted FLOPs by the device's peak (device_peak_flops: a known GPU's, or on a
CPU a matmul rate measured once and cached).

    python calibrate.py [config.py] [--key=value ...]   # measure a cost table on this machine (calibrate.py)
    python budget.py schedules [--key=value ...]        # every schedule against budget progress

budget.py imports no other file of the project's but configurator.py, data/loader.py and the optimizers'
(a leaf): the training loop charges through it, the lab's studies read what runs wrote.
"""
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch

from configurator import ConfigError, UserError, cli, require, require_writable
from data.loader import atomic_write_bytes

UNITS = ('rst', 'tokens', 'iters', 'flops', 'wall')
TABLE_DIR = Path(__file__).resolve().parent / 'config' / 'rst'


# -----------------------------------------------------------------------------
# LR schedules. Each maps budget progress p in [0, 1] (after warm-up w, a fraction of the budget)
# to a factor in [0, 1]; lr = min_lr + (peak - min_lr) * factor, so every schedule ends at min_lr at p = 1.

def cosine(p, w, **kw):
    return 0.5 * (1 + math.cos(math.pi * (p - w) / (1 - w)))


def linear(p, w, **kw):
    return 1 - (p - w) / (1 - w)


def onecycle(p, w, **kw):
    """No Train No Gain's BERT baseline: linear up to the peak at p = 0.5 (its warm-up), then down."""
    return (1 - p) / 0.5


def rex(p, w, **kw):
    """REX (Chen et al., MLSys 2022): (1 - x) / (1 - x/2) over the progress x after the warm-up, the
    paper's constant 1/2 (its public code uses 0.9); x = 0 where the warm-up ends, so the lr does not jump."""
    x = (p - w) / (1 - w)
    return (1 - x) / (1 - x / 2)


def wsd(p, w, cooldown_frac=0.2, cooldown_shape='1-sqrt', **kw):
    """Warm-up, stable at the peak, cooldown over the last cooldown_frac (Hägele et al. 2024, arXiv 2405.18392)."""
    start = 1 - cooldown_frac
    if p <= start:
        return 1.0
    x = (p - start) / cooldown_frac
    return 1 - math.sqrt(x) if cooldown_shape == '1-sqrt' else 1 - x


SCHEDULES = {'cosine': cosine, 'linear': linear, 'onecycle': onecycle, 'wsd': wsd, 'rex': rex}


def warmup_units(total, cfg):
    """Warm-up length in budget units: absolute when warmup_units > 0 (WSD branches need that),
    else a fraction of this budget; one-cycle's rise is its warm-up (half the budget)."""
    if cfg.schedule == 'onecycle':
        return 0.5 * total
    return cfg.warmup_units if cfg.warmup_units > 0 else cfg.warmup_frac * total


def lr_at(spent, total, cfg, decay=True):
    """The learning rate after `spent` of a `total` budget (lr, min_lr, schedule keys of the config).
    decay=False (a schedule-free optimizer, whose average does the decay's work): the warm-up, then lr to the end."""
    if spent >= total and decay:
        return cfg.min_lr  # exactly, not min_lr plus a rounding error
    spent, warmup = max(spent, 0.0), warmup_units(total, cfg)
    if spent < warmup:  # linear warm-up in absolute units, identical for every budget
        return cfg.lr * spent / warmup
    if not decay:
        return cfg.lr
    factor = SCHEDULES[cfg.schedule](spent / total, min(warmup / total, 0.999999),
                                     cooldown_frac=cfg.cooldown_frac, cooldown_shape=cfg.cooldown_shape)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * min(max(factor, 0.0), 1.0)


def pyplot(what):
    """matplotlib.pyplot without a display, or None (and one line saying what is not plotted) without it."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'(matplotlib is not installed: no plot of {what}; `pip install matplotlib` for one)')
        return None
    return plt


def plot_schedules(cfg, path='schedules.png'):
    """Every schedule against budget progress: a PNG with matplotlib, a text table without."""
    ps = [i / 100 for i in range(101)]
    curves = {name: [lr_at(p * cfg.budget, cfg.budget, dataclasses.replace(cfg, schedule=name)) / cfg.lr for p in ps]
              for name in SCHEDULES}  # at --budget: a --warmup_units warm-up is absolute
    print('p     ' + ''.join(f'{name:>10}' for name in curves))
    for i in range(0, 101, 10):
        print(f'{ps[i]:<6.2f}' + ''.join(f'{c[i]:>10.3f}' for c in curves.values()))
    plt = pyplot('the schedules')
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(ps, c, label=name)
    ax.set(xlabel='budget progress p = spent / budget', ylabel='lr / peak',
           title=f'schedules (warm-up {warmup_units(cfg.budget, cfg) / cfg.budget:g}, wsd cooldown {cfg.cooldown_frac:g} '
                 f'{cfg.cooldown_shape})')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f'wrote {path}')
    return path


# -----------------------------------------------------------------------------
# WSD cooldown branches: the plan (train.train_wsd_branches runs it)

def branch_plan(cfg):
    """WSD cooldown branches (SPEC section 7): the budgets (ascending), a run folder per budget
    (out_dir/budget_B, the largest is the trunk's), the spent amount at which the trunk saves each smaller
    budget's branch point ((1 - cooldown_frac) * B), and the config every budget shares. The warm-up is
    made absolute, so each branch equals a standalone WSD run at its budget bit for bit."""
    budgets = sorted(cfg.budget * m for m in cfg.branch_budgets)
    folders = {b: Path(cfg.out_dir) / f'budget_{b:g}' for b in budgets}
    points = {b: (1 - cfg.cooldown_frac) * b for b in budgets[:-1]}
    warmup = cfg.warmup_units or cfg.warmup_frac * cfg.budget
    base = dataclasses.replace(cfg, branch_budgets=(), warmup_units=warmup, overwrite=False)
    return budgets, folders, points, base


# -----------------------------------------------------------------------------
# cost tables

def shape_key(model_type, n_layer, n_head, n_embd, block_size, vocab_size, batch_size):
    """What a step's cost depends on: one table per model shape and micro-batch size."""
    return f'{model_type}_L{n_layer}_H{n_head}_D{n_embd}_T{block_size}_V{vocab_size}_B{batch_size}'


def table_path(key, override=''):
    return Path(override) if override else TABLE_DIR / f'{key}.json'


def calibrate_command(key, data='', table='', more=''):
    """The command that measures the table of shape key, in backticks as a message gives it, then what it
    cannot say (the vocabulary, the device). data: the run's --dataset and --tokenizer keys, which decide the
    vocabulary (a table measured on another vocabulary has another key); table: the --rst_table the run named;
    more: further keys (--overwrite=True for a damaged table, --rst_add for an entry it lacks)."""
    model_type, *parts = key.split('_')
    L, H, D, T, V, B = (int(part[1:]) for part in parts)
    keys = ' '.join(k for k in (data, f'--rst_table={table}' if table else '', more) if k)
    return (f'`python calibrate.py --model_type={model_type} --n_layer={L} --n_head={H} --n_embd={D} '
            f'--block_size={T} --batch_size={B}{" " + keys if keys else ""}` (vocab {V}; add --device=cuda on a GPU)')


def load_table(key, override='', required=True, needs=None, data=''):
    """The cost table of a shape; with required=False, None when there is none or it lacks an entry the run
    needs (RST is then not counted).
    needs: {kind: [entries]} the run will charge beyond the per-block ones (its optimizer, Hessian step)."""
    path = table_path(key, override)
    if path.is_dir():
        raise UserError(f'--rst_table={path} is a folder: give a table file (.json)')
    if not path.exists():
        if not required and not override:
            return None
        raise UserError(f'no RST cost table for this shape ({path}): measure one with '
                        f'{calibrate_command(key, data, override)}, or use --budget_unit=tokens|iters|flops|wall')
    try:
        table = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f'RST table {path} is not valid JSON ({e}): calibrate it again with '
                        f'{calibrate_command(key, data, override, "--overwrite=True")}') from None
    problem = table_problem(table, key)
    lacks = None if problem else next(((kind, e) for kind, entries in (needs or {}).items() for e in entries
                                       if str(e) not in table[kind]), None)
    if lacks and not required and not override:
        return None  # a budget in another unit: RST is simply not counted for a step the table does not price
    if lacks:  # --rst_add keeps every entry (and every run charged under them); it prices optimizers and their Hessian steps
        more = f"--rst_add=\"('{lacks[1]}',)\"" if lacks[0] == 'optimizer' else '--overwrite=True'
        raise UserError(f'RST table {path} has no {lacks[0]} entry for {lacks[1]}: price it with '
                        f'{calibrate_command(key, data, override, more)}')
    if problem and (foreign := foreign_table(table, key)):  # calibrate --overwrite=True would refuse it: never offered
        own = table_path(key)
        fix = (f'leave out --rst_table to use {own}' if override and own.is_file() else
               f'measure one with {calibrate_command(key, data)}' + (' and leave out --rst_table' if override else ''))
        first = '' if override else 'move it away, then '  # a table of another shape, or another file, at this shape's path
        raise UserError(f'RST table {path} {foreign}: {first}give a table of this shape, or {fix}')
    if problem:
        raise UserError(f'RST table {path} {problem}: calibrate it again with '
                        f'{calibrate_command(key, data, override, "--overwrite=True")}')
    return table


def foreign_table(table, key):
    """Why a parsed file is not this shape's cost table to measure again over (calibrate --overwrite=True), or
    None: a table of another shape (the runs charged under it keep it), or a JSON object that is no table at all
    (a run's config.json). Anything else at the path (unparsable, a list, this shape's table however damaged, a
    table that lost its key) is a damaged table there, which calibrate may replace."""
    if not isinstance(table, dict):
        return None
    other = table.get('key')
    if isinstance(other, str) and other != key and 'fwd_bwd' in table:
        return f"is the cost table of shape {other}, this run is {key}"
    if 'key' not in table and 'fwd_bwd' not in table:
        return 'is not a cost table (no key, no fwd_bwd entries)'
    return None


MIN_SECONDS = 1e-6  # below one kernel launch: an entry this small is damage, and a budget would take forever to spend


def table_problem(table, key):
    """What is wrong with a parsed cost table for shape key, or None: it must be a dict for this key with
    a positive finite time per active-block count (1..n_layer) for fwd_bwd and fwd, and per optimizer."""
    if not isinstance(table, dict):
        return f'is a {type(table).__name__}, not a table'
    if table.get('key') != key:
        return f"is for shape {table.get('key')}, this run is {key}"
    n_layer = int(key.split('_L')[1].split('_')[0]) if '_L' in key else None
    for kind in ('fwd_bwd', 'fwd', 'optimizer', 'hessian'):
        entries = table.get(kind)
        if not isinstance(entries, dict) or (kind != 'hessian' and not entries):
            return f'has no {kind} entries'
        bad = [k for k, v in entries.items() if not (is_amount(v) and v > 0)]  # true is no number of seconds
        if bad:
            return f'has a {kind} entry {bad[0]} that is not a positive number of seconds'
        fast = [k for k, v in entries.items() if v < MIN_SECONDS]
        if fast:
            return f'has a {kind} entry {fast[0]} of {entries[fast[0]]:g} s, faster than any step ({MIN_SECONDS:g} s)'
    missing = [str(n) for n in range(1, (n_layer or 0) + 1) if str(n) not in table['fwd_bwd'] or str(n) not in table['fwd']]
    return f'lacks fwd_bwd/fwd for {len(missing)} active-block count(s) ({missing[0]}..)' if missing else None


def is_amount(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


class Budget:
    """Counts every unit, charges RST from the table, and says how far the run is (progress p)."""

    def __init__(self, unit, total, table, flops_per_token, tokens_per_example, batch_size):
        if unit not in UNITS:
            raise ConfigError(f"--budget_unit must be one of {', '.join(UNITS)}, got '{unit}'")
        if not total > 0:
            raise ConfigError(f'--budget must be > 0, got {total}')
        self.unit, self.total, self.table = unit, float(total), table
        self.flops_per_token, self.tokens_per_example, self.batch_size = flops_per_token, tokens_per_example, batch_size
        self.spent = {u: 0.0 for u in UNITS}
        if table is None:
            self.spent['rst'] = None  # not counted: no cost table for this shape
        self.spent.update(scored_examples=0.0, hessian_steps=0.0)
        self.by_entry = {}  # RST charged per cost-table entry ('fwd_bwd:4', 'optimizer:adamw', ...): compare's sensitivity
        self.before_start = 0.0  # of the budget's unit, paid before the first step: the schedule spans the rest

    def _rst(self, kind, entry, scale=1.0):
        if self.table is not None:
            cost, name = self.table[kind][str(entry)] * scale, f'{kind}:{entry}'
            self.spent['rst'] += cost
            self.by_entry[name] = self.by_entry.get(name, 0.0) + cost

    def charge_train(self, n_examples, n_layers):
        """Forward+backward of n_examples at n_layers active blocks."""
        self._rst('fwd_bwd', n_layers, n_examples / self.batch_size)
        tokens = n_examples * self.tokens_per_example
        self.spent['tokens'] += tokens
        self.spent['flops'] += tokens * self.flops_per_token(n_layers)

    def charge_forward(self, n_examples, n_layers):
        """A forward-only scoring pass (batch selection, reference models)."""
        self._rst('fwd', n_layers, n_examples / self.batch_size)
        self.spent['scored_examples'] += n_examples
        self.spent['flops'] += n_examples * self.tokens_per_example * self.flops_per_token(n_layers) / 3

    def charge_optimizer(self, name):
        self._rst('optimizer', name)
        self.spent['iters'] += 1

    def charge_hessian(self, entry, n_examples, n_layers):
        """Sophia's Gauss-Newton-Bartlett step on n_examples: a no-grad pass that samples the labels, a
        forward+backward against them and the EMA (the table's entry is per micro-batch)."""
        self._rst('hessian', entry, n_examples / self.batch_size)
        self.spent['hessian_steps'] += 1
        self.spent['flops'] += 4 / 3 * n_examples * self.tokens_per_example * self.flops_per_token(n_layers)

    def charge_before_start(self, spent):
        """Costs paid before this run began (an IL model's training and precompute), added to its count. A cost
        that is not a non-negative number (an edited record) is refused: a negative one made the budget unreachable."""
        bad = {u: v for u, v in spent.items() if v is not None and not is_amount(v)}
        if bad:
            raise UserError(f"a cost paid before the start ({', '.join(f'{u}={v!r}' for u, v in bad.items())}) is not a "
                            'non-negative number: the record it was read from (an IL cache\'s sidecar) is damaged; rebuild it')
        for unit, value in spent.items():
            if self.spent.get(unit) is not None and value is not None:
                self.spent[unit] += value
        self.before_start += spent.get(self.unit) or 0.0
        if self.spent['rst'] is not None and spent.get('rst'):
            self.by_entry['before_start'] = self.by_entry.get('before_start', 0.0) + spent['rst']

    def one_step(self, n_examples, n_layers, optimizer):
        """What a plain training step (n_examples at n_layers blocks, then the optimizer) spends in this
        budget's unit; None for wall time, which is measured, not known in advance."""
        if self.unit == 'wall':
            return None
        step = Budget(self.unit, 1.0, self.table, self.flops_per_token, self.tokens_per_example, self.batch_size)
        step.charge_train(n_examples, n_layers)
        step.charge_optimizer(optimizer)
        return step.spent[self.unit]

    def add_wall(self, seconds):
        self.spent['wall'] += seconds

    @property
    def progress(self):
        return min(self.spent[self.unit] / self.total, 1.0)

    @property
    def done(self):
        return self.spent[self.unit] >= self.total

    def schedule_span(self):
        """(offset, length) of the budget the LR schedule spans: what is left after the costs paid before the
        first step (an IL model charged to the run), so the run warms up from its first step and reaches min_lr
        exactly when the budget is spent, not partway down a schedule sized for the whole budget."""
        return self.before_start, max(self.total - self.before_start, 0.0)

    def state_dict(self):
        return {**self.spent, 'rst_by_entry': dict(self.by_entry), 'before_start': self.before_start}

    def load_state_dict(self, state):
        state = dict(state)
        self.by_entry = dict(state.pop('rst_by_entry', {}))  # a checkpoint from before it was counted: {}
        fallback = self.by_entry.get('before_start', 0.0) if self.unit == 'rst' else 0.0  # older checkpoints: RST only
        self.before_start = state.pop('before_start', fallback)
        counts = {**state, **{f'rst_by_entry[{k}]': v for k, v in self.by_entry.items()}, 'before_start': self.before_start}
        bad = next((k for k, v in counts.items() if not (v is None and k == 'rst') and not is_amount(v)), None)
        if bad is not None or state.get(self.unit) is None:  # nan or a negative count: a budget never (or at once) spent
            raise ValueError(f'budget spent {bad or self.unit}={counts.get(bad or self.unit)!r} is not a non-negative number')
        self.spent.update(state)


class Meter:
    """Averages the train loss and the logs over a log interval (each log over the steps that logged it:
    Sophia's win rate comes only on Hessian steps); rates use the training wall clock
    (budget.spent['wall']), which stops during eval and checkpoints."""

    def __init__(self, budget):
        self.budget = budget
        self._reset()

    def _reset(self):
        self.loss, self.logs, self.n = 0.0, {}, 0
        self.since = {k: self.budget.spent[k] for k in ('wall', 'tokens', 'flops')} | {'p': self.budget.progress}

    def add(self, loss, logs):
        self.loss, self.n = self.loss + loss, self.n + 1
        for k, v in logs.items():
            total, count = self.logs.get(k, (0.0, 0))
            self.logs[k] = (total + v, count + 1)

    def read(self, peak_flops, world_size):
        spent = self.budget.spent
        dt = max(spent['wall'] - self.since['wall'], 1e-9)
        tok_s = (spent['tokens'] - self.since['tokens']) / dt / world_size
        dp = self.budget.progress - self.since['p']
        flops_s = (spent['flops'] - self.since['flops']) / dt / world_size  # what ran: dropped blocks, scoring
        rates = {'tokens_per_s': tok_s, 'mfu': flops_s / peak_flops,
                 'eta_s': (1 - self.budget.progress) * dt / dp if dp > 0 else None}
        loss, logs = float(self.loss) / max(self.n, 1), {k: float(t) / c for k, (t, c) in self.logs.items()}
        self._reset()
        return loss, logs, rates


# -----------------------------------------------------------------------------
# peak FLOP/s: the denominator of the MFU that Meter.read reports

# dense bf16 peaks from the vendors' sheets (half of the 'with sparsity' figure); the more specific names first,
# each matched as a whole word of torch.cuda.get_device_name ('L4' is not 'L40S', 'H100' not 'H100 PCIe')
GPU_BF16_PEAK = (('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H200 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
                 ('A100', 312e12), ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12), ('A10', 125e12), ('4090', 165e12))


def measure_cpu_peak(sizes=(1024, 2048, 4096), repeats=3, dtype=torch.float32):
    """The best FLOP/s of square fp32 matmuls at these sizes: the honest 'peak' of a CPU MFU (the best,
    not a median: other processes' load only ever slows a matmul down)."""
    g = torch.Generator().manual_seed(0)  # leave the global RNG alone: a resume restores it before this runs
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
        a @ b  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def cpu_peak_cache():
    """Where measured CPU peaks are kept: $NANO_EFFICIENT_PEAK_CACHE, else ~/.cache/nano-efficient/."""
    default = Path.home() / '.cache' / 'nano-efficient' / 'peak_flops.json'
    return Path(os.environ.get('NANO_EFFICIENT_PEAK_CACHE') or default)


def cpu_key():
    """A CPU peak holds for one CPU model, thread count and torch version."""
    info = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').exists() else ''
    names = [line.split(':', 1)[1].strip() for line in info.splitlines() if line.startswith('model name')]
    cpu = names[0] if names else platform.processor()
    return f'{cpu} | {torch.get_num_threads()} threads | torch {torch.__version__}'


# what a cache cut short looks like (a prefix of json.dumps of {cpu key: peak}): only that is written over
CUT_SHORT_CACHE = re.compile(r'\s*(\{(\s*"[^"\\]*"\s*:\s*[-+\d.eE]+\s*,)*\s*("[^"\\]*("\s*(:\s*[-+\d.eE]*)?)?)?\s*)?')


def read_peak_cache(path):
    """The CPU-peak cache at path: a dict ({} where there is none yet, or a cache cut short), or None where the
    file is something else (another JSON, a log, a checkpoint, a file it cannot read), never written over."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError):
        return None
    try:
        cache = json.loads(text)
    except ValueError:
        return {} if len(text) < 1 << 16 and CUT_SHORT_CACHE.fullmatch(text) else None
    return cache if isinstance(cache, dict) and all(isinstance(v, (int, float)) for v in cache.values()) else None


def cached_cpu_peak(remeasure=False):
    """This machine's CPU peak, measured once and cached (a cache cut short, or an unwritable one: measured
    again). remeasure: measure now and keep the larger of the two (a peak measured under load was too low).
    A file at the cache's path that is not a cache is left as it is (read_peak_cache)."""
    path, cpu = cpu_peak_cache(), cpu_key()
    cache = read_peak_cache(path)
    known = cache.get(cpu) if cache and isinstance(cache.get(cpu), (int, float)) and cache.get(cpu) > 0 else None
    if known and not remeasure:
        return known
    peak = max(measure_cpu_peak(), known or 0.0)
    if cache is None:
        print(f'warning: {path} is not a readable CPU-peak cache: left as it is, the peak not kept (set '
              'NANO_EFFICIENT_PEAK_CACHE to another file, or give --peak_flops)', file=sys.stderr)
        return peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({**cache, cpu: peak}, indent=1).encode())
    except OSError as e:
        print(f'warning: could not cache the CPU peak in {path} ({e.strerror or e}): set NANO_EFFICIENT_PEAK_CACHE to a '
              'writable file, or give --peak_flops', file=sys.stderr)
    return peak


def device_peak_flops(device, remeasure=False):
    """Dense bf16 peak of a known GPU; on a CPU the best fp32 matmul rate measured on this machine
    (cached_cpu_peak; remeasure when an MFU above 100% shows the cached peak was measured too low)."""
    if str(device).startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        for gpu, peak in GPU_BF16_PEAK:
            if re.search(rf'\b{re.escape(gpu)}\b', name):
                return peak
        warnings.warn(f'unknown GPU {name}: MFU uses 312 TFLOP/s; set --peak_flops')
        return 312e12
    return cached_cpu_peak(remeasure)


# -----------------------------------------------------------------------------
# calibration: measure a cost table on this machine

def mean_std(xs):
    """Mean and sample sd (0 for one value): calibrate's coefficients of variation."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _median_seconds(fn, warmup=2, repeats=7, sync=lambda: None):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_table(model, optimizers, batch, autocast, device):
    """Seconds per micro-batch: fwd+bwd and fwd at 1..L active blocks, per optimizer update, and per
    Hessian estimate of the optimizers that have one. optimizers: {name: (optimizer, its step hooks)};
    batch: the model's inputs, then its targets (GPT: x, y; T5: enc_in, dec_in, targets)."""
    inputs = batch[:-1]
    sync = torch.cuda.synchronize if str(device).startswith('cuda') else (lambda: None)
    table = {'fwd_bwd': {}, 'fwd': {}, 'optimizer': {}, 'hessian': {}}

    def fwd_bwd():
        with autocast:
            loss = model(*batch, weight=1 / batch[-1].numel())  # the loop's fused mean
        loss.backward()
        model.zero_grad(set_to_none=True)

    def fwd():
        with torch.no_grad(), autocast:
            model(*batch)

    for n in range(1, model.n_layer + 1):
        model.set_active_layers(n)
        table['fwd_bwd'][str(n)] = _median_seconds(fwd_bwd, sync=sync)
        table['fwd'][str(n)] = _median_seconds(fwd, sync=sync)
    model.set_active_layers(model.n_layer)
    for name, (optimizer, hooks) in optimizers.items():
        with autocast:
            model(*batch, weight=1 / batch[-1].numel()).backward()
        table['optimizer'][name] = _median_seconds(optimizer.step, sync=sync)
        model.zero_grad(set_to_none=True)
        if hooks:  # Sophia-G's Hessian estimate on one micro-batch, as the loop runs it per micro-batch
            from optim_sophia import gnb_hessian_step, sampled_label_loss

            def estimate():
                with autocast:
                    loss = sampled_label_loss(model, inputs, batch[-1])
                loss.backward()
                return loss
            table['hessian'][name] = _median_seconds(lambda: gnb_hessian_step(optimizer, estimate), sync=sync)
    return table


def cv(xs):
    """Coefficient of variation: sample sd / mean."""
    m, sd = mean_std(xs)
    return sd / m


def calibrate(cfg, run, model, batch, optimizers, key):
    """Measure the cost table of this shape on this machine and save it with the machine's description.
    calibrate.py's command: calibrate.calibration_inputs(cfg) builds the arguments (the model, a batch of the run's shapes, every optimizer).
    cfg.rst_add (optimizer names): measure and add only those entries to the existing table (add_entries)."""
    path = table_path(key, cfg.rst_table)
    require_writable(path)  # before minutes of measuring
    if cfg.rst_add:
        return add_entries(cfg, run, model, batch, optimizers, path)
    if cfg.compile:  # RST is a reference cost: one table serves eager and compiled runs of the shape alike
        print('calibrate times the eager model (--compile is not applied): compiled runs are charged these times')
    tables = [measure_table(model, optimizers, batch, run.autocast(), run.device) for _ in range(cfg.rst_repeats)]
    table = {kind: {e: statistics.median(t[kind][e] for t in tables) for e in entries} for kind, entries in tables[0].items()}
    if len(tables) > 1:  # each entry's coefficient of variation over the repeats: how far one table can be trusted
        table['cv'] = {kind: {e: cv([t[kind][e] for t in tables]) for e in entries} for kind, entries in tables[0].items()}
    table.update(key=key, repeats=len(tables), machine=platform.processor() or platform.machine(), platform=platform.platform(),
                 device=str(run.device), torch=torch.__version__, date=str(date.today()),
                 threads=torch.get_num_threads(), compile=False, dtype=str(run.dtype))  # the eager model is timed
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(table, indent=1).encode())
    worst = max(((v, f'{k}[{e}]') for k, entries in table.get('cv', {}).items() for e, v in entries.items()), default=None)
    print(f"wrote {path}: fwd_bwd {table['fwd_bwd']}" + (f' | largest CV {worst[0]:.1%} ({worst[1]})' if worst else ''))
    return path


ANCHOR = ('fwd_bwd', 'optimizer:adamw')  # a baseline step: fwd+bwd at every block, then AdamW's update


def add_entries(cfg, run, model, batch, optimizers, path):
    """Price new optimizers in a table measured on another machine, keeping every entry it has (and so every
    run charged under it): time the new updates beside a baseline step on this machine and scale them by
    table / here of that step. An update's cost relative to a baseline step is what carries between
    machines of one kind; the table keeps the measurement under 'added'."""
    table = load_existing(path, cfg.rst_add, optimizers)
    L = str(model.n_layer)
    tables = [measure_table(model, {n: optimizers[n] for n in ('adamw', *cfg.rst_add)}, batch, run.autocast(), run.device)
              for _ in range(cfg.rst_repeats)]
    here = {kind: {e: statistics.median(t[kind][e] for t in tables) for e in t0} for kind, t0 in tables[0].items()}
    scale = (table['fwd_bwd'][L] + table['optimizer']['adamw']) / (here['fwd_bwd'][L] + here['optimizer']['adamw'])
    added = dict(table.get('added', {}))
    for name in cfg.rst_add:
        for kind in ('optimizer', 'hessian'):
            if name in here[kind]:
                table[kind][name] = here[kind][name] * scale
                added[f'{kind}:{name}'] = {'seconds_here': here[kind][name], 'baseline_step_here': here['fwd_bwd'][L] + here['optimizer']['adamw'],
                                           'scale': scale, 'machine': platform.processor() or platform.machine(),
                                           'platform': platform.platform(), 'device': str(run.device), 'torch': torch.__version__,
                                           'date': str(date.today()), 'threads': torch.get_num_threads(), 'repeats': len(tables)}
    table['added'] = added
    atomic_write_bytes(path, json.dumps(table, indent=1).encode())
    print(f"added to {path}: " + ', '.join(f"optimizer:{n} {table['optimizer'][n]:.6g} s "
                                          f"({here['optimizer'][n] / here['optimizer']['adamw']:.3g}x adamw's update here)"
                                          for n in cfg.rst_add) + f' | scaled by {scale:.4g} (a baseline step: table / here)')
    return path


def load_existing(path, names, optimizers):
    """The table rst_add extends: it must exist and be sound, and not price the optimizers already."""
    unknown = [n for n in names if n not in optimizers or n == 'adamw']
    if unknown:
        raise UserError(f"--rst_add names {unknown[0]!r}: give optimizers other than adamw, of {', '.join(n for n in optimizers if n != 'adamw')}")
    if not path.is_file():
        raise UserError(f'--rst_add extends a table, and {path} does not exist: calibrate it whole first (without --rst_add)')
    try:
        table = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f'RST table {path} is not valid JSON ({e}): calibrate it again') from None
    problem = table_problem(table, table.get('key') if isinstance(table, dict) else None)
    if problem:
        raise UserError(f'RST table {path} {problem}: calibrate it whole again (without --rst_add)')
    there = [n for n in names if n in table['optimizer']]
    if there:
        raise UserError(f'RST table {path} prices optimizer:{there[0]} already: remove that entry by hand to measure it again')
    return table


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The keys `python budget.py schedules` reads: train.TrainConfig's schedule keys, the same defaults
    (tests/test_budget.py checks that they agree)."""
    lr: float = 2e-3                # peak learning rate
    min_lr: float = 0.0             # reached exactly when the budget is spent
    budget: float = 180.0           # in any unit: the plot is against progress p = spent / budget
    schedule: str = 'cosine'        # the schedule named in the title (every schedule is drawn)
    warmup_frac: float = 0.02       # of the budget
    warmup_units: float = 0.0       # > 0: warm-up in budget units instead (the same for every budget)
    cooldown_frac: float = 0.2      # wsd: the cooldown's share of the budget
    cooldown_shape: str = '1-sqrt'  # wsd: '1-sqrt' or 'linear'
    out: str = 'schedules.png'      # the figure (with matplotlib)

    def __post_init__(self):
        require(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        require(self.cooldown_shape in ('1-sqrt', 'linear'), "--cooldown_shape must be '1-sqrt' or 'linear'")
        require(0 <= self.min_lr <= self.lr and self.budget > 0 and 0 < self.cooldown_frac <= 1,
                'need 0 <= --min_lr <= --lr, --budget > 0 and 0 < --cooldown_frac <= 1')
        require(0 <= self.warmup_frac < 1 and 0 <= self.warmup_units < self.budget,
                'need 0 <= --warmup_frac < 1 and 0 <= --warmup_units < --budget')


def main(argv):
    usage = 'usage: python budget.py schedules [--key=value ...]   (cost tables: python calibrate.py --help)'
    if not argv or argv[0] in ('-h', '--help'):  # --help: usage on stdout, exit 0; nothing: on stderr, exit 2
        print(usage, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] != 'schedules':
        print(f"unknown command '{argv[0]}': {usage}", file=sys.stderr)
        sys.exit(2)
    return cli(lambda c: plot_schedules(c, c.out), ScheduleConfig, argv[1:], 'schedules [--key=value ...]')


if __name__ == '__main__':
    main(sys.argv[1:])
