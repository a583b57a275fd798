"""Measure a Reference System Time cost table on this machine (budget.py reads it).

RST (No Train No Gain, arXiv 2307.06440) charges each step the time it takes on a reference machine,
looked up in a table that is measured once: this command builds the run's model, a batch of its
shapes and every optimizer, times each kind of step (forward+backward per number of active blocks, a
forward-only scoring pass, each optimizer's update, Sophia-G's Hessian step; the median of repeated
timings after warm-up) and writes config/rst/<shape>.json, or --rst_table=PATH. A table already there is
replaced only with --overwrite=True: every run charged under it would stop meaning what it did; --rst_add
adds entries to a table of this shape and keeps the rest. It is a file of its own because it builds models
(train.py) while budget.py, which charges from the tables, imports no loop.

    python calibrate.py --rst_table=mine.json                        # the default run's shape, this CPU
    python calibrate.py config/gpt2_124m.py --device=cuda --rst_repeats=3     # GPT-2 124M on fineweb_edu, this GPU
"""
import json

import torch

import budget
import runs
import train
from configurator import UserError, cli, require, require_writable
from data.loader import FolderLock


def calibration_inputs(cfg):
    """What budget.calibrate measures: the runtime, the model, a random batch of the run's shapes (a
    span-corrupted one for T5), every optimizer with its hooks, and the shape's table key."""
    run = runs.setup_device(cfg)
    corpus = train.load_corpus(cfg)
    model = runs.build_model(cfg, corpus.vocab_size, run.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, corpus.vocab_size, (cfg.batch_size, train.example_length(cfg, model) + 1), generator=g)
    inputs, targets = train.build_objective(cfg, corpus, model).val_batch(x[:, :-1], x[:, 1:])
    batch = tuple(t.to(run.device) for t in (*inputs, targets))
    bs = cfg.batch_size * train.targets_per_example(cfg, model)
    optimizers = {name: train.build_optimizer(cfg, model, bs, name=name) for name in train.OPTIMIZERS}
    return run, model, batch, optimizers, train.run_shape_key(cfg, model)


def check_table(cfg, key, optimizers):
    """Refuse, before any measuring, to lose a saved table: one that exists is replaced only with
    --overwrite=True, and --rst_add extends only a table of this run's shape (entries scaled from this
    shape's steps would price another shape's)."""
    path = budget.table_path(key, cfg.rst_table)
    check_path(path)
    if not cfg.rst_add:
        problem = budget.foreign_table(read_json_or_none(path), key) if path.is_file() else None
        require(problem is None, f'{path} {problem}: --overwrite=True replaces only a cost table of this shape or a '
                                 'damaged one: give --rst_table=<new path>')
        require(cfg.overwrite or not path.is_file(), f'{path} holds a cost table already (runs charged under it would '
                'change meaning): --overwrite=True to replace it, or --rst_table=<new path> to keep it')
        return
    table = budget.load_existing(path, cfg.rst_add, optimizers)  # the names, and a sound table for its own key
    problem = budget.table_problem(table, key)  # so what is left is the shape: load_table's check
    require(problem is None, f'--rst_add extends a table of this run\'s shape, and {path} {problem}: '
            f"run with that table's shape, or give --rst_table=<a table for {key}>")


def check_path(path):
    require_writable(path)  # a folder, or an unwritable one, is named as such (not 'does not exist')
    require(path.suffix == '.json', f'--rst_table={path}: a cost table is a .json file: give a path ending in .json')


def table_lock(path):
    """Held from the check to the write: two calibrations of one table would both pass the check, and the
    second would then replace the first's table (or drop its --rst_add entries) unasked; it refuses instead."""
    busy = lambda pid: UserError(f'{path} is being calibrated by another process (pid {pid}): wait for it to end, '  # noqa: E731
                                 'or give --rst_table=<another path>')
    return FolderLock(path.parent / f'.{path.name}.lock', busy)


def read_json_or_none(path):
    """A file's JSON, or None where it is not JSON (a damaged table, or a binary file the .json check let by)."""
    try:
        return json.loads(path.read_text())
    except ValueError:  # UnicodeDecodeError included
        return None


def main(cfg):
    run, model, batch, optimizers, key = calibration_inputs(cfg)
    path = budget.table_path(key, cfg.rst_table)
    check_path(path)  # before the lock makes its folder
    with table_lock(path):
        check_table(cfg, key, optimizers)
        return budget.calibrate(cfg, run, model, batch, optimizers, key)


if __name__ == '__main__':
    cli(main, train.TrainConfig)  # its keys name the run timed; its --overwrite guards the table here
