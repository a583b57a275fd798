"""Budgets, Reference System Time (RST) and the budget-tied learning-rate schedule.

No Train No Gain (Kaddour et al., NeurIPS 2023, arXiv 2307.06440) compares methods at a fixed compute
budget, and charges every step the time it takes on one *reference* machine: the cost is looked up in
a table recorded once, never measured live, so a run stops at the same point on any machine, and a
method that makes steps cheaper (fewer layers) or dearer (scoring passes) is charged exactly that.

A budget is given in one unit: rst (reference seconds), tokens (trained), iters (optimizer steps),
flops (6N-style estimate) or wall (seconds, live). Every unit is counted on every run, so logs can be
plotted against RST whatever the budget was. The LR is a function of budget progress p = spent/budget
and reaches min_lr exactly at p = 1, when the run stops: the baseline is always fully decayed.

    python budget.py calibrate [config.py] [--key=value ...]   # measure a cost table on this machine
"""
import dataclasses
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from configurator import ConfigError, UserError, cli, require

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


def lr_at(spent, total, cfg):
    """The learning rate after `spent` of a `total` budget (lr, min_lr, schedule keys of the config)."""
    if spent >= total:
        return cfg.min_lr  # exactly, not min_lr plus a rounding error
    spent, warmup = max(spent, 0.0), warmup_units(total, cfg)
    if spent < warmup:  # linear warm-up in absolute units, identical for every budget
        return cfg.lr * spent / warmup
    factor = SCHEDULES[cfg.schedule](spent / total, min(warmup / total, 0.999999),
                                     cooldown_frac=cfg.cooldown_frac, cooldown_shape=cfg.cooldown_shape)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * min(max(factor, 0.0), 1.0)


def plot_schedules(cfg, path='schedules.png'):
    """Every schedule against budget progress: a PNG with matplotlib, a text table without."""
    ps = [i / 100 for i in range(101)]
    curves = {name: [lr_at(p, 1.0, dataclasses.replace(cfg, schedule=name)) / cfg.lr for p in ps] for name in SCHEDULES}
    print('p     ' + ''.join(f'{name:>10}' for name in curves))
    for i in range(0, 101, 10):
        print(f'{ps[i]:<6.2f}' + ''.join(f'{c[i]:>10.3f}' for c in curves.values()))
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('(matplotlib is not installed: table only; `pip install matplotlib` for the plot)')
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(ps, c, label=name)
    ax.set(xlabel='budget progress p = spent / budget', ylabel='lr / peak',
           title=f'schedules (warm-up {cfg.warmup_frac:g}, wsd cooldown {cfg.cooldown_frac:g} {cfg.cooldown_shape})')
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


def calibrate_command(key):
    L, H, D, T, V, B = (int(part[1:]) for part in key.split('_')[1:])
    return (f'python budget.py calibrate --n_layer={L} --n_head={H} --n_embd={D} --block_size={T} '
            f'--batch_size={B}  (vocab {V}, from the dataset)')


def load_table(key, override='', required=True):
    """The cost table of a shape; with required=False, None when there is none (RST is then not counted)."""
    path = table_path(key, override)
    if not path.exists():
        if not required and not override:
            return None
        raise UserError(f'no RST cost table for this shape ({path}): measure one with '
                        f'`{calibrate_command(key)}`, or use --budget_unit=tokens|iters|flops|wall')
    try:
        table = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f'RST table {path} is not valid JSON ({e}): calibrate it again') from None
    if table.get('key') != key:
        raise UserError(f"RST table {path} is for shape {table.get('key')}, this run is {key}")
    return table


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

    def _rst(self, kind, entry, scale=1.0):
        if self.table is not None:
            self.spent['rst'] += self.table[kind][str(entry)] * scale

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
        """Costs paid before this run began (an IL model's training and precompute), added to its count."""
        for unit, value in spent.items():
            if self.spent.get(unit) is not None and value is not None:
                self.spent[unit] += value

    def add_wall(self, seconds):
        self.spent['wall'] += seconds

    @property
    def progress(self):
        return min(self.spent[self.unit] / self.total, 1.0)

    @property
    def done(self):
        return self.spent[self.unit] >= self.total

    def state_dict(self):
        return dict(self.spent)

    def load_state_dict(self, state):
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
# calibration: measure a cost table on this machine

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
            loss = model(*batch).mean()
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
            model(*batch).mean().backward()
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


def calibrate(cfg, run, model, batch, optimizers, key):
    """Measure the cost table of this shape on this machine and save it with the machine's description.
    train.calibration_inputs(cfg) builds the arguments (the model, a batch of the run's shapes, every optimizer)."""
    table = measure_table(model, optimizers, batch, run.autocast(), run.device)
    table.update(key=key, machine=platform.processor() or platform.machine(), platform=platform.platform(),
                 device=str(run.device), torch=torch.__version__, date=str(date.today()),
                 threads=torch.get_num_threads(), compile=cfg.compile, dtype=str(run.dtype))
    path = table_path(key, cfg.rst_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    print(f"wrote {path}: fwd_bwd {table['fwd_bwd']}")
    return path


# -----------------------------------------------------------------------------
# comparing runs: the method x budget table, time to target, the plot

def derive_label(c):
    if c.get('label'):
        return c['label']
    if c.get('method'):
        return c['method']
    if c.get('arch', 'full') != 'full':
        return c['arch']
    if c.get('optimizer', 'adamw') != 'adamw':
        return c['optimizer']
    return 'wsd' if c.get('schedule') == 'wsd' else 'baseline'


def read_run(path):
    """A run folder -> its label, budget, seed, evals [(rst, tokens, val_loss)], steps, and completeness."""
    path = Path(path)
    try:
        c = json.loads((path / 'config.json').read_text())['config']
        records = [json.loads(l) for l in (path / 'log.jsonl').read_text().splitlines() if l.strip()]
    except (OSError, ValueError, KeyError) as e:
        return {'path': str(path), 'error': f'unreadable ({type(e).__name__})'}
    evals = [r for r in records if 'val_loss' in r]
    spent = max((r.get(c['budget_unit'], 0) for r in records), default=0)
    return {'path': str(path), 'label': derive_label(c), 'budget': c['budget'], 'unit': c['budget_unit'],
            'seed': c['seed'], 'steps': max((r['step'] for r in records), default=0),
            'evals': [(e.get('rst'), e['tokens'], e['val_loss']) for e in evals],
            'final': evals[-1]['val_loss'] if evals else None, 'complete': bool(evals) and spent >= c['budget']}


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# two-sided 95% quantiles of Student's t by degrees of freedom (1.96 past 30)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df):
    return T95[int(df) - 1] if df < len(T95) + 1 else 1.96


def t_interval(xs):
    """(mean, half-width of the t-based 95% CI); the half-width is nan for fewer than 2 values. The one
    significance rule of the lab: budget.py compare, slm.py and madpo.py tables all use it."""
    m, sd = mean_std(xs)
    return m, (t95(len(xs) - 1) * sd / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


def welch_interval(a, b):
    """(mean(a) - mean(b), half-width of its 95% CI) for unpaired samples (Welch's t, df floored)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if len(a) < 2 or len(b) < 2:
        return ma - mb, math.nan
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    if va + vb == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return ma - mb, t95(max(1, math.floor(df))) * math.sqrt(va + vb)


def crossing(points, target):
    """First x at which y <= target along [(x, y)], linearly interpolated; None when never reached."""
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (y0 - target) / (y0 - y) * (x - x0)
    return None


def group_runs(runs):
    groups = {}
    for r in runs:
        groups.setdefault(r['label'], {}).setdefault(r['budget'], []).append(r)
    return groups


def ablation_table(groups, baseline='baseline'):
    """Markdown: rows = methods, columns = budgets; mean ± std of final val loss over seeds, the delta to
    the baseline, * when its 95% CI (welch_interval) excludes 0; and the steps taken."""
    budgets = sorted({b for g in groups.values() for b in g})
    head = '| method | ' + ' | '.join(f'budget {b:g}' for b in budgets) + ' |'
    lines = [head, '|' + ' --- |' * (len(budgets) + 1)]
    steps = [head.replace('method', 'steps'), lines[1]]
    for label, by_budget in groups.items():
        cells, step_cells = [], []
        for b in budgets:
            finals = [r['final'] for r in by_budget.get(b, []) if r['complete']]
            if not finals:
                cells.append('—')
                step_cells.append('—')
                continue
            m, sd = mean_std(finals)
            cell = f'{m:.4f} ± {sd:.4f} (n={len(finals)})'
            base = [r['final'] for r in groups.get(baseline, {}).get(b, []) if r['complete']]
            if label != baseline and base:
                delta, half = welch_interval(finals, base)
                cell += f" {delta:+.4f}{'*' if abs(delta) > half else ''}"  # nan half-width: no star
            cells.append(cell)
            step_cells.append(f"{statistics.mean(r['steps'] for r in by_budget[b] if r['complete']):.0f}")
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
        steps.append(f'| {label} | ' + ' | '.join(step_cells) + ' |')
    return '\n'.join(lines) + '\n\n' + '\n'.join(steps)


def target_table(groups, target, baseline='baseline'):
    """Time to target (AlgoPerf turned around): per method, RST and tokens at the first eval at or below
    the target in its largest-budget runs (interpolated), and the smallest budget whose fully decayed
    endpoint reaches it (interpolated between budgets); speedup = baseline time / method time."""
    rows, base_time = [], None
    lines = [f'target val loss {target:.4f}', '',
             '| method | first eval <= target: RST (tokens), seeds reached | speedup | decayed endpoint: budget | speedup |',
             '| --- | --- | --- | --- | --- |']
    for label, by_budget in groups.items():
        largest = [r for r in by_budget[max(by_budget)] if r['complete']]
        hits = [(crossing([(e[0], e[2]) for e in r['evals']], target) if r['evals'][-1][0] is not None else math.nan,
                 crossing([(e[1], e[2]) for e in r['evals']], target)) for r in largest]
        reached = [h for h in hits if h[1] is not None]  # RST is nan for runs without a cost table
        first = statistics.mean(h[0] for h in reached) if reached else None
        ends = [(b, statistics.mean(r['final'] for r in rs if r['complete'])) for b, rs in sorted(by_budget.items())
                if any(r['complete'] for r in rs)]
        endpoint = crossing(ends, target)
        rows.append((label, first, reached, len(hits), endpoint))
        if label == baseline:
            base_time = (first, endpoint)
    for label, first, reached, n, endpoint in rows:
        speed = ['—' if not t or not base_time or not base_time[i] or math.isnan(t) else f'{base_time[i] / t:.2f}x'
                 for i, t in enumerate((first, endpoint))]
        rst = '—' if first is None or math.isnan(first) else f'{first:.1f}'
        first_s = f"{rst} ({statistics.mean(h[1] for h in reached):,.0f} tokens), {len(reached)}/{n}" \
            if reached else f'not reached, 0/{n}'
        end_s = f'{endpoint:.1f}' if endpoint is not None else 'not reached'
        lines.append(f'| {label} | {first_s} | {speed[0]} | {end_s} | {speed[1]} |')
    return '\n'.join(lines)


def plot_runs(groups, path):
    """Val loss against RST spent, one line per method (mean over seeds, shaded min-max), a panel per budget."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print('(matplotlib is not installed: no plot; `pip install matplotlib` for one)')
        return None
    budgets = sorted({b for g in groups.values() for b in g})
    every = [r for g in groups.values() for rs in g.values() for r in rs if r['evals']]
    x = 0 if all(r['evals'][-1][0] is not None for r in every) else 1  # RST when every run has it, else tokens
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for label, by_budget in groups.items():
            runs = [r for r in by_budget.get(b, []) if r['evals']]
            if not runs:
                continue
            start, end = max(r['evals'][0][x] for r in runs), min(r['evals'][-1][x] for r in runs)
            if end <= start:  # a single eval per run: its mean and spread at the end
                finals = [r['final'] for r in runs]
                ax.errorbar([end], [statistics.mean(finals)], yerr=[[statistics.mean(finals) - min(finals)],
                            [max(finals) - statistics.mean(finals)]], fmt='o', capsize=3, label=label)
                continue
            grid = np.linspace(start, end, 60)  # from the first eval every seed has: no extrapolation
            ys = np.array([np.interp(grid, [e[x] for e in r['evals']], [e[2] for e in r['evals']]) for r in runs])
            ax.plot(grid, ys.mean(0), label=label)
            ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2)
        ax.set(title=f'budget {b:g}', xlabel=['RST spent (s)', 'tokens'][x], ylabel='val loss')
        if ax.lines or ax.collections:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def compare(run_dirs, out='ablation', target='auto', baseline='baseline'):
    runs = [read_run(d) for d in run_dirs]
    bad = [r for r in runs if 'error' in r or not r['complete']]
    runs = [r for r in runs if 'error' not in r]
    if not runs:
        raise UserError(f"no readable runs among the {len(bad)} folder(s) given ({bad[0]['path']}: {bad[0]['error']}): "
                        f'a run folder holds config.json and log.jsonl')
    groups = group_runs(runs)
    report = ablation_table(groups, baseline)
    if target != 'none':
        base = groups.get(baseline, {})
        finals = [r['final'] for r in base.get(max(base), []) if r['complete']] if base else []
        value = float(target) if target != 'auto' else (statistics.mean(finals) if finals else None)
        if value is not None:
            report += '\n\n' + target_table(groups, value, baseline)
    if bad:
        report += '\n\nmissing or partial runs (left out of the means):\n' + '\n'.join(
            f"- {r['path']}: {r.get('error', 'budget not spent')}" for r in bad)
    print(report)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f'{out}.md').write_text(report + '\n')
    png = plot_runs(groups, f'{out}.png')
    print(f'wrote {out}.md' + (f' and {png}' if png else ''))
    return report


# -----------------------------------------------------------------------------
# the No Train No Gain ablation in one command: methods x budgets x seeds

@dataclass(frozen=True)
class AblateConfig:
    config: str = 'config/ablation.py'  # COMMON, BUDGETS, QUICK_BUDGETS, METHODS (your own Python)
    out_dir: str = 'out/ablation'
    methods: tuple = ('',)               # ('',) = every method in the config file
    budgets: tuple = (0.0,)              # (0.0,) = the config file's BUDGETS (QUICK_BUDGETS with --quick)
    seeds: tuple = (0, 1, 2)
    quick: bool = False                  # a smoke sweep: QUICK_BUDGETS, one seed
    baseline_schedule: str = 'cosine'    # 'wsd_branches' adds a WSD row trained as cooldown branches
    target: str = 'auto'                 # time-to-target: 'auto' (baseline at the largest budget), a number, 'none'

    def __post_init__(self):
        require(self.baseline_schedule in ('cosine', 'wsd_branches'), "--baseline_schedule must be 'cosine' or 'wsd_branches'")
        check_target(self.target)


def _is_number(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def check_target(target):
    require(target in ('auto', 'none') or _is_number(target), f"--target must be 'auto', 'none' or a number, got '{target}'")


def sweep_plan(cfg):
    import runpy
    if not Path(cfg.config).is_file():
        raise ConfigError(f'--config={cfg.config} not found: give the sweep file (your own Python), e.g. config/ablation.py')
    spec = runpy.run_path(cfg.config)
    missing = [k for k in ('COMMON', 'BUDGETS', 'QUICK_BUDGETS', 'METHODS') if k not in spec]
    require(not missing, f"{cfg.config} does not define {', '.join(missing)} (see config/ablation.py)")
    budgets = [b for b in cfg.budgets if b > 0] or list(spec['QUICK_BUDGETS' if cfg.quick else 'BUDGETS'])
    seeds = cfg.seeds[:1] if cfg.quick else cfg.seeds
    methods = {k: v for k, v in spec['METHODS'].items() if k in cfg.methods or cfg.methods == ('',)}
    unknown = set(cfg.methods) - set(spec['METHODS']) - {''}
    require(not unknown, f"unknown method(s) {', '.join(sorted(unknown))}: the config file has {', '.join(spec['METHODS'])}")
    # RHO-LOSS's irreducible-loss model is trained once per sweep, at the largest budget, and reused
    il = {'il_out_dir': f'{cfg.out_dir}/il', 'il_cache': f'{cfg.out_dir}/il_cache', 'il_budget': max(budgets)}
    plan = [(label, script, {**spec['COMMON'], **(il if args.get('method') == 'rho' else {}), **args, 'budget': b,
                             'seed': seed, 'label': label, 'out_dir': f'{cfg.out_dir}/{label}/b{b:g}/s{seed}'})
            for seed in seeds for b in budgets for label, (script, args) in methods.items()]
    if cfg.baseline_schedule == 'wsd_branches':
        plan += [('wsd (branches)', 'train.py', {**spec['COMMON'], 'schedule': 'wsd', 'budget': min(budgets), 'seed': seed,
                  'branch_budgets': tuple(b / min(budgets) for b in budgets), 'label': 'wsd (branches)',
                  'out_dir': f'{cfg.out_dir}/wsd_branches/s{seed}'}) for seed in seeds]
    return plan


def run_command(script, args):
    resume = not args.get('branch_budgets') and (Path(args['out_dir']) / 'ckpt.pt').exists()
    args = {**args, 'init_from': 'resume'} if resume else {**args, 'overwrite': not args.get('branch_budgets')}
    return [sys.executable, script] + [f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}' for k, v in args.items()]


def run_finished(out_dir):
    """A run folder whose log shows its whole budget spent."""
    run = read_run(out_dir)
    return 'error' not in run and run['complete']


def ablate(cfg):
    plan, t0, done_units = sweep_plan(cfg), time.time(), 0.0
    total_units = sum(a['budget'] * max(a.get('branch_budgets', (1,))) for _, _, a in plan)
    for i, (label, script, args) in enumerate(plan):
        units = args['budget'] * max(args.get('branch_budgets', (1,)))
        if not args.get('branch_budgets') and run_finished(args['out_dir']):
            total_units -= units
            continue
        out = subprocess.run(run_command(script, args), capture_output=True, text=True, cwd=Path(__file__).parent)
        if out.returncode != 0:
            raise UserError(f"{label} (budget {args['budget']:g}, seed {args['seed']}) failed: "
                            f"{(out.stderr.strip().splitlines() or ['?'])[-1]} (see {args['out_dir']})")
        done_units += units
        eta = (time.time() - t0) / done_units * (total_units - done_units)
        final = [l for l in out.stdout.splitlines() if l.startswith('done:')]
        print(f'[{i + 1}/{len(plan)}] {label} budget {args["budget"]:g} seed {args["seed"]}: '
              f'{final[-1] if final else "done"} | sweep eta {eta / 60:.1f} min', flush=True)
    il_model = Path(cfg.out_dir) / 'il'  # RHO-LOSS's IL model: its cost is reported apart, it is not a method
    run_dirs = sorted(str(p.parent) for p in Path(cfg.out_dir).rglob('config.json') if il_model not in p.parents)
    return compare(run_dirs, out=f'{cfg.out_dir}/ablation', target=cfg.target)


@dataclass(frozen=True)
class CompareConfig:
    out: str = 'ablation'        # writes <out>.md and, with matplotlib, <out>.png
    target: str = 'auto'         # time-to-target: 'auto' (baseline mean at the largest budget), a number, 'none'
    baseline: str = 'baseline'   # the label deltas and speedups are taken against

    def __post_init__(self):
        check_target(self.target)


def main(argv):
    import train  # the commands that build models; train imports budget, never the reverse at import time
    usage = 'usage: python budget.py {calibrate|ablate|compare|schedules} [config.py] [--key=value ...]'
    if not argv or argv[0] not in ('calibrate', 'ablate', 'compare', 'schedules'):
        print(usage, file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    if command == 'calibrate':
        return cli(lambda c: calibrate(c, *train.calibration_inputs(c)), train.TrainConfig, rest)
    rest = [f'--target={a[9:]!r}' if a.startswith('--target=') and _is_number(a[9:]) else a for a in rest]  # a str key
    if command == 'ablate':
        return cli(ablate, AblateConfig, rest)
    if command == 'schedules':
        return cli(plot_schedules, train.TrainConfig, rest)
    dirs = [a for a in rest if not a.startswith('--')]
    return cli(lambda c: compare(dirs, c.out, c.target, c.baseline) if dirs else _no_runs(), CompareConfig,
               [a for a in rest if a.startswith('--')])


def _no_runs():
    raise UserError('compare needs run folders: python budget.py compare out/ablation/*/*/* [--out=ablation]')


if __name__ == '__main__':
    main(sys.argv[1:])
