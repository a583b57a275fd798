"""Finals on all of val: each finished run's final model scored on every window of the val split, beside
the fixed eval windows the run itself was scored on.

A table's final val loss is the loss on the run's eval windows (eval_batches x batch_size of them, evenly
spread: 512 of the stdlib val split's 6053 for config/ablation.py), so a document can weigh more in it than
in the split. This scores each run's final checkpoint on every window, after checking that the checkpoint
is the model the run ended with: its loss on the run's own eval windows must equal the final val loss the
run logged. The report puts the two side by side per row and budget, and where the baseline's runs have
been scored too, the paired difference to the baseline on both.

    python -m studies.finals out/ablation                    # -> final_all_val.json in each finished run
    python -m studies.finals out/ablation --report=True      # the table, from those files
"""
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from configurator import UserError, cli, key
from data.loader import atomic_write_bytes, get_examples, num_examples, val_ids
from model import evaluate
from runs import Runtime, load_model, read_run
from studies.compare import check_one_run_per_cell, run_folders, without_il_models
from studies.stats import paired_test, t_interval

FILE = 'final_all_val.json'
SAME = 1e-6  # the re-scored eval windows against the logged final: a float sum in another order, not another model


@dataclass(frozen=True)
class FinalsConfig:
    report: bool = False             # print the table from the runs' final_all_val.json instead of scoring
    batch_size: int = key(64, '>0')  # windows per forward pass (the loss does not depend on it beyond rounding)
    overwrite: bool = False          # score again a run that already has its final_all_val.json


def score_run(path, corpus_cache, cfg):
    """Score one finished GPT run's ckpt.pt on all of val -> the record written to <run>/final_all_val.json."""
    from train import load_corpus
    run = read_run(path)
    c = json.loads((path / 'config.json').read_text())['config']
    if c.get('model_type', 'gpt') != 'gpt':
        raise UserError(f'{path} is a {c["model_type"]} run: finals on all of val score GPT runs only')
    key_ = (c['dataset'], c['tokenizer'])
    if key_ not in corpus_cache:
        corpus_cache[key_] = load_corpus(SimpleNamespace(dataset=c['dataset'], tokenizer=c['tokenizer'])).splits['val']
    val, rt = corpus_cache[key_], Runtime(torch.device('cpu'), torch.float32)
    model = load_model(path / 'ckpt.pt', rt.device, compile_loss=False)
    T = model.config.block_size
    ids = val_ids(val, T, c['eval_batches'] * c['batch_size'])  # the run's own eval windows, as train.py chose them
    own = window_loss(model, val, ids, T, cfg.batch_size, rt)
    if not math.isclose(own, run['final'], rel_tol=SAME, abs_tol=SAME):
        raise UserError(f'{path}/ckpt.pt is not the model the run ended with: its loss on the run\'s eval windows is '
                        f'{own:.6f}, the run logged {run["final"]:.6f}: score a run whose checkpoint is its last')
    every = val_ids(val, T, num_examples(val, T))
    return {'eval_windows': len(ids), 'eval_val_loss': own,
            'logged_final': run['final'], 'windows': len(every), 'val_loss': window_loss(model, val, every, T, cfg.batch_size, rt),
            'block_size': T}


def window_loss(model, val, ids, T, batch_size, rt):
    x, y = get_examples(val, ids, T)
    return evaluate(model, (torch.as_tensor(x),), torch.as_tensor(y), batch_size, rt)


def score(dirs, cfg):
    """Every finished run under dirs with a checkpoint and no final_all_val.json yet (or all, --overwrite)."""
    runs, _ = without_il_models([read_run(d) for d in run_folders(dirs)])
    todo = [Path(r['path']) for r in runs if 'error' not in r and r['complete'] and (Path(r['path']) / 'ckpt.pt').is_file()
            and (cfg.overwrite or not (Path(r['path']) / FILE).is_file())]
    skipped = sum('error' not in r and r['complete'] and not (Path(r['path']) / 'ckpt.pt').is_file() for r in runs)
    print(f'{len(todo)} run(s) to score' + (f'; {skipped} finished without a checkpoint (not scored)' if skipped else ''))
    cache = {}
    for i, path in enumerate(todo, 1):
        record = score_run(path, cache, cfg)
        atomic_write_bytes(path / FILE, json.dumps(record, indent=1).encode())
        print(f'[{i}/{len(todo)}] {path}: {record["eval_windows"]} eval windows {record["eval_val_loss"]:.4f}, '
              f'all {record["windows"]} windows {record["val_loss"]:.4f}', flush=True)


# -----------------------------------------------------------------------------
# the report

def all_val_loss(run):
    """A read_run's final on all of val from its final_all_val.json; None where it was not scored."""
    f = Path(run['path']) / FILE
    if not f.is_file():
        return None
    try:
        return float(json.loads(f.read_text())['val_loss'])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{f} is damaged: delete it and score the run again (python -m studies.finals {run['path']})") from None


def read_scored(dirs):
    """({(label, budget): {seed: (final on the eval windows, final on all of val)}}, {windows in all of val})
    from the files of the finished runs under dirs."""
    runs = [r for r in map(read_run, run_folders(dirs)) if 'error' not in r and r['complete'] and (Path(r['path']) / FILE).is_file()]
    check_one_run_per_cell(runs)  # tuning grids share a label and seed: not a table's runs
    cells, windows = {}, set()
    for run in runs:
        f = Path(run['path']) / FILE
        try:
            rec = json.loads(f.read_text())
            pair, n = (float(rec['logged_final']), float(rec['val_loss'])), int(rec['windows'])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{f} is damaged: delete it and score the run again (python -m studies.finals {run['path']})") from None
        cells.setdefault((run['label'], run['budget']), {})[run['seed']] = pair
        windows.add(n)
    return cells, windows


def report(dirs, baseline='baseline'):
    cells, windows = read_scored(dirs)
    if not cells:
        return '(no run has been scored on all of val yet)'
    lines = [f'finals on all of val ({", ".join(map(str, sorted(windows)))} windows) beside the eval windows each run was scored on; '
             'mean over seeds, the difference with its t-based 95% CI', '',
             '| method | budget | n | eval windows | all of val | all − eval windows | Δ to baseline: eval windows | Δ: all of val |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for (label, b), seeds in sorted(cells.items(), key=lambda kv: (kv[0][0] != baseline, kv[0])):
        ev, al = [seeds[s][0] for s in sorted(seeds)], [seeds[s][1] for s in sorted(seeds)]
        m, half = t_interval([a - e for e, a in zip(ev, al)])
        base = cells.get((baseline, b), {}) if label != baseline else {}
        common = sorted(base.keys() & seeds.keys())
        deltas = [paired_text([seeds[s][i] for s in common], [base[s][i] for s in common]) for i in (0, 1)]
        lines.append(f'| {label} | {b:g} | {len(seeds)} | {sum(ev) / len(ev):.4f} | {sum(al) / len(al):.4f} | '
                     f'{m:+.4f} {interval(m, half)} | {deltas[0]} | {deltas[1]} |')
    return '\n'.join(lines)


def paired_text(mine, base):
    if len(mine) < 2:
        return '—'
    d, half, _ = paired_test(mine, base)
    return f'{d:+.4f} {interval(d, half)} (n={len(mine)})'


def interval(m, half):
    return f'[{m - half:+.4f}, {m + half:+.4f}]' if math.isfinite(half) else '(one run)'


def main(argv):
    dirs = [a for a in argv if not a.startswith('-')]
    if not dirs and not {'-h', '--help'} & set(argv):
        print('usage: python -m studies.finals RUN_FOLDER ... [--report=True]  (--help: the keys)', file=sys.stderr)
        sys.exit(2)
    return cli(lambda c: print(report(dirs)) if c.report else score(dirs, c), FinalsConfig,
               [a for a in argv if a.startswith('-')], 'RUN_FOLDER ... [--key=value ...]')


if __name__ == '__main__':
    main(sys.argv[1:])
