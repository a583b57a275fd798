"""Finals on all of val: each finished run's final model scored on every window of the val split, beside
the fixed eval windows the run itself was scored on.

A table's final val loss is the loss on the run's eval windows (eval_batches x batch_size of them, evenly
spread over the split: a fraction of it for config/ablation.py), so a document can weigh more in it than in
the split. This scores each run's final checkpoint on every window, after checking that the checkpoint
is the model the run ended with: its loss on the run's own eval windows must equal the final val loss the
run logged. A score names the final it was checked against, so a run started afresh in the same folder is
scored again, never read with its predecessor's score. The report puts the two side by side per row and
budget, and where the baseline's runs are scored too, the paired difference to the baseline on both.

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

from configurator import UserError, cli, key, require
from data.loader import atomic_write_bytes, get_examples, num_examples, val_ids
from model import evaluate
from runs import Runtime, load_model, read_run
from studies.compare import check_one_run_per_cell, run_folders, without_il_models
from studies.stats import paired_test, t_interval

FILE = 'final_all_val.json'
SAME = 1e-6  # the re-scored eval windows against the logged final: a float sum in another order, not another model
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclass(frozen=True)
class FinalsConfig:
    report: bool = False             # print the table from the runs' final_all_val.json instead of scoring
    device: str = 'cpu'              # where to score: the kind of machine that ran the runs (a CPU run on 'cpu')
    dtype: str = key('float32', tuple(DTYPES))  # the runs' eval precision (a GPU run's autocast: 'bfloat16')
    batch_size: int = key(64, '>0')  # windows per forward pass (the loss does not depend on it beyond rounding)
    overwrite: bool = False          # score again a run that already has a valid score

    def __post_init__(self):
        here = {'cpu': True, 'mps': torch.backends.mps.is_available()}.get(self.device.split(':')[0], torch.cuda.is_available())
        require(self.device.split(':')[0] in ('cpu', 'cuda', 'mps') and here,
                f"--device={self.device} is not available on this machine: score on 'cpu', or on the kind of machine "
                'that ran the runs')


def score_run(path, run, val, cfg):
    """One finished GPT run's ckpt.pt on all of val -> the record for <run>/final_all_val.json."""
    rt = Runtime(torch.device(cfg.device), DTYPES[cfg.dtype])
    model = load_model(path / 'ckpt.pt', rt.device, compile_loss=False)
    T, n = run['eval_windows']
    ids = val_ids(val, T, n)  # the run's own eval windows, as train.py chose them
    own = window_loss(model, val, ids, T, cfg.batch_size, rt)
    if not math.isclose(own, run['final'], rel_tol=SAME, abs_tol=SAME):
        raise UserError(f'its checkpoint scores {own:.6f} on its eval windows, its log ends at {run["final"]:.6f}: '
                        f'the checkpoint is not its last model, its method scores val its own way, or --device/--dtype '
                        f'are not what the run used')
    every = val_ids(val, T, num_examples(val, T))
    return {'logged_final': run['final'], 'eval_windows': len(ids), 'eval_val_loss': own, 'windows': len(every),
            'val_loss': window_loss(model, val, every, T, cfg.batch_size, rt), 'block_size': T}


def window_loss(model, val, ids, T, batch_size, rt):
    x, y = get_examples(val, ids, T)
    return evaluate(model, (torch.as_tensor(x),), torch.as_tensor(y), batch_size, rt)


def unscorable(path, run):
    """Why a finished run cannot be scored here, or None."""
    if run['eval_windows'] is None:  # runs.eval_windows: T5-lite scores span-corrupted examples, not windows
        return f"a {run['shape'][0]} run (GPT runs only)"
    if not (path / 'ckpt.pt').is_file():
        return 'no checkpoint'
    return None


def score(dirs, cfg):
    """Every finished run under dirs without a valid score (or all, --overwrite); a run that fails is named at the
    end, after the others are scored."""
    from train import load_corpus
    runs, _ = without_il_models([read_run(d) for d in run_folders(dirs)])
    finished = [r for r in runs if 'error' not in r and r['complete']]
    todo = [r for r in finished if cfg.overwrite or read_score(r) is None]
    skipped = {r['path']: why for r in todo if (why := unscorable(Path(r['path']), r))}
    todo = [r for r in todo if r['path'] not in skipped]
    first_skip = f'; {len(skipped)} not scored: {next(iter(skipped.values()))} ...' if skipped else ''
    print(f'{len(todo)} run(s) to score{first_skip}')
    corpora, failed = {}, {}
    for i, run in enumerate(todo, 1):
        path, c = Path(run['path']), (run['dataset'], run['tokenizer'])
        if c not in corpora:
            corpora[c] = load_corpus(SimpleNamespace(dataset=c[0], tokenizer=c[1])).splits['val']
        try:
            rec = score_run(path, run, corpora[c], cfg)
        except UserError as e:
            failed[str(path)] = str(e)
            continue
        atomic_write_bytes(path / FILE, json.dumps(rec, indent=1).encode())
        print(f"[{i}/{len(todo)}] {path}: {rec['eval_windows']} eval windows {rec['eval_val_loss']:.4f}, "
              f"all {rec['windows']} windows {rec['val_loss']:.4f}", flush=True)
    if failed:
        path, why = next(iter(failed.items()))
        raise UserError(f'{len(failed)} run(s) not scored, the first {path}: {why}')


# -----------------------------------------------------------------------------
# the report

def read_score(run):
    """A read_run's final_all_val.json if it scored this run (the final it was checked against is the run's
    final now), else None; a damaged file is refused, naming the fix."""
    f = Path(run['path']) / FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
        rec = {k: float(rec[k]) for k in ('logged_final', 'val_loss', 'windows')}
        if not all(math.isfinite(v) for v in rec.values()):
            raise ValueError('not finite')
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{f} is damaged: delete it and score the run again "
                        f"(python -m studies.finals {run['path']})") from None
    return rec if rec['logged_final'] == run['final'] else None  # a score of an earlier run in this folder


def all_val_loss(run):
    """A read_run's final on all of val, None where it was not scored."""
    rec = read_score(run)
    return rec and rec['val_loss']


def read_scored(dirs):
    """({(label, unit, budget): {seed: (final on the eval windows, on all of val)}}, {windows in all of val})
    from the finished runs under dirs that are scored."""
    runs = [r for r in map(read_run, run_folders(dirs)) if 'error' not in r and r['complete']]
    scored = [(r, rec) for r in runs if (rec := read_score(r))]
    check_one_run_per_cell([r for r, _ in scored])  # tuning grids share a label and seed: not a table's runs
    cells = {}
    for run, rec in scored:
        cell = cells.setdefault((run['label'], run['unit'], run['budget']), {})
        cell[run['seed']] = (rec['logged_final'], rec['val_loss'])
    return cells, {int(rec['windows']) for _, rec in scored}


def report(dirs, baseline='baseline'):
    cells, windows = read_scored(dirs)
    if not cells:
        return '(no run has been scored on all of val yet)'
    lines = [f'finals on all of val ({", ".join(map(str, sorted(windows)))} windows) beside the eval windows each run '
             'was scored on; mean over seeds, the difference with its t-based 95% CI', '',
             '| method | budget | n | eval windows | all of val | all − eval windows '
             '| Δ to baseline: eval windows | Δ: all of val |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    gaps = []
    for (label, unit, b), seeds in sorted(cells.items(), key=lambda kv: (kv[0][0] != baseline, kv[0])):
        ev, al = [seeds[s][0] for s in sorted(seeds)], [seeds[s][1] for s in sorted(seeds)]
        m, half = t_interval([a - e for e, a in zip(ev, al)])
        gaps.append(m)
        base = cells.get((baseline, unit, b), {}) if label != baseline else {}
        common = sorted(base.keys() & seeds.keys())
        deltas = [paired_text([seeds[s][i] for s in common], [base[s][i] for s in common]) for i in (0, 1)]
        lines.append(f'| {label} | {b:g} | {len(seeds)} | {sum(ev) / len(ev):.4f} | {sum(al) / len(al):.4f} | '
                     f'{m:+.4f} {interval(m, half)} | {deltas[0]} | {deltas[1]} |')
    lines += ['', f'spread of the gap column (largest minus smallest mean): {max(gaps) - min(gaps):.4f}, '
                  f'from {min(gaps):+.4f} to {max(gaps):+.4f}']
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
