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
import json
import math
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from configurator import ConfigError, UserError

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
    """REX (Chen et al., MLSys 2022): (1 - p) / (1 - p/2), the paper's constant 1/2 (its public code uses 0.9)."""
    return (1 - p) / (1 - p / 2)


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
    spent = min(max(spent, 0.0), total)
    warmup = warmup_units(total, cfg)
    if spent < warmup:  # linear warm-up in absolute units, identical for every budget
        return cfg.lr * spent / warmup
    factor = SCHEDULES[cfg.schedule](spent / total, min(warmup / total, 0.999999),
                                     cooldown_frac=cfg.cooldown_frac, cooldown_shape=cfg.cooldown_shape)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * min(max(factor, 0.0), 1.0)


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


def load_table(key, override=''):
    path = table_path(key, override)
    if not path.exists():
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

    def charge_hessian(self, name, n_layers):
        """Sophia's Gauss-Newton-Bartlett step: a forward+backward on a micro-batch plus the EMA."""
        self._rst('hessian', name)
        self.spent['hessian_steps'] += 1
        self.spent['flops'] += self.batch_size * self.tokens_per_example * self.flops_per_token(n_layers)

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


def measure_table(model, make_optimizer, batch, autocast, device):
    """Seconds per micro-batch: fwd+bwd and fwd at 1..L active blocks, and per optimizer update."""
    x, y = batch
    sync = torch.cuda.synchronize if str(device).startswith('cuda') else (lambda: None)
    table = {'fwd_bwd': {}, 'fwd': {}, 'optimizer': {}, 'hessian': {}}

    def fwd_bwd():
        with autocast:
            loss = model(x, y).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def fwd():
        with torch.no_grad(), autocast:
            model(x, y)

    for n in range(1, model.n_layer + 1):
        model.set_active_layers(n)
        table['fwd_bwd'][str(n)] = _median_seconds(fwd_bwd, sync=sync)
        table['fwd'][str(n)] = _median_seconds(fwd, sync=sync)
    model.set_active_layers(model.n_layer)
    for name in ('adamw', 'lion', 'sophiag'):
        optimizer = make_optimizer(name)
        with autocast:
            model(x, y).mean().backward()
        step = (lambda: optimizer.step(bs=x.numel())) if name == 'sophiag' else optimizer.step
        table['optimizer'][name] = _median_seconds(step, sync=sync)
        model.zero_grad(set_to_none=True)
        if name == 'sophiag':
            from optim_sophia import gnb_hessian_step
            table['hessian'][name] = _median_seconds(lambda: gnb_hessian_step(optimizer, lambda: model.logits(x)), sync=sync)
    return table


def calibrate(cfg):
    import train  # train imports budget: import here to keep the module graph one-way at import time
    run = train.setup_device(cfg)
    corpus = train.load_corpus(cfg)
    model = train.build_model(cfg, corpus.vocab_size).to(run.device)
    key = train.run_shape_key(cfg, model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, corpus.vocab_size, (cfg.batch_size, model.config.block_size), generator=g).to(run.device)
    table = measure_table(model, lambda name: train.build_optimizer(cfg, model, name), (x, x), run.autocast(), run.device)
    table.update(key=key, machine=platform.processor() or platform.machine(), platform=platform.platform(),
                 device=str(run.device), torch=torch.__version__, date=str(date.today()),
                 threads=torch.get_num_threads(), compile=cfg.compile, dtype=str(run.dtype))
    path = table_path(key, cfg.rst_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    print(f"wrote {path}: fwd_bwd {table['fwd_bwd']}")
    return path


if __name__ == '__main__':
    from configurator import cli
    import train
    commands = {'calibrate': calibrate}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python budget.py {{{'|'.join(commands)}}} [config.py] [--key=value ...]", file=sys.stderr)
        sys.exit(2)
    cli(commands[sys.argv[1]], train.TrainConfig, sys.argv[2:])
