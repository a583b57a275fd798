"""A study's evidence into out/records/: each finished run's config.json, log.jsonl and console output
(<run>.out beside its folder), and its final_all_val.json where studies/finals.py scored it; never a
checkpoint or a cache. A run still going, stopped or diverged is left out, so a record folder holds only
what whole runs produced; run it again as more runs finish.

    python -m studies.records out/ablation out/records/ntng-today-2026-12-06/ablation

A run already in the record folder is refused if its config.json there differs (another run at the same
path: record it under another folder); the same run is copied again (its files are the same). Every run is
checked before anything is written, as studies/results.py checks a record: a damaged one
(a log line that is not JSON, a field of the wrong type, a damaged score) is refused in one line, so the
record folder is never written half, nor with evidence the results would refuse (read_whole_run).
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from configurator import UserError, cli
from data.loader import atomic_write_bytes
from runs import read_run, run_finished
from studies.compare import field_problem
from studies.finals import FILE as SCORE, read_score

FILES = ('config.json', 'log.jsonl', 'final_all_val.json')  # a run's evidence; checkpoints and caches are not


@dataclass(frozen=True)
class RecordsConfig:
    """records takes no keys: a study's output folder and a record folder."""


def finished_runs(src):
    """(the run folders under src whose logs show their whole budget spent and that no signal stopped, the others)"""
    folders = [p.parent for p in sorted(src.rglob('config.json'))]
    done = [f for f in folders if not (f / 'stopped.json').exists() and (f / 'log.jsonl').exists() and run_finished(f)]
    return done, sorted(set(folders) - set(done))


def left_out(src, others, shown=3):
    """The runs not recorded, named (a few) so that a run whose log was cut short is not missed unnoticed."""
    if not others:
        return ''
    names = ', '.join(str(f.relative_to(src)) for f in others[:shown]) + (', ...' if len(others) > shown else '')
    return f'; {len(others)} left out, no finished training run (going, stopped, a log cut short, or no log): {names}'


def json_problem(path, last_only=False):
    """Why a record file is not JSON throughout, or None: a .json file one JSON object (or list), a .jsonl file one
    per line (last_only: its last line, where a stricter reader has read the others). The readers drop a killed
    run's partial last line, so a log cut short would pass for a shorter run."""
    path = Path(path)
    text = path.read_text(errors='replace')
    lines = list(enumerate(text.splitlines() if path.suffix == '.jsonl' else [text], 1))
    for i, line in lines[-1:] if last_only else lines:
        try:
            ok = isinstance(json.loads(line), (dict, list))
        except ValueError:
            ok = False
        if not ok:
            return f'line {i} is not a JSON record' if path.suffix == '.jsonl' else 'is not a JSON record'
    return None


def read_whole_run(run):
    """(runs.read_run of a run folder, None) if it is whole evidence, else (None, why) in one line naming the file and
    the field: config.json and every line of log.jsonl JSON (json_problem; field_problem reads all lines but the
    last), every field the lab reads of its type (studies.compare.field_problem), the budget spent, and a score
    where there is one readable (studies.finals.read_score). What records refuses to copy and results to read."""
    for name in ('config.json', 'log.jsonl'):
        problem = json_problem(run / name, last_only=name == 'log.jsonl') if (run / name).is_file() else 'is missing'
        if problem:
            return None, f'{name} {problem}'
    problem = field_problem(run)
    if problem:
        return None, problem
    read = read_run(run)
    if 'error' in read:  # all that field_problem leaves: an eval record without its step or tokens
        return None, f"log.jsonl has an eval record without a numeric step, tokens and val_loss ({read['error']})"
    if not read['complete']:
        return None, 'log.jsonl does not spend the budget (a partial run, or its final record is damaged)'
    try:
        read_score(read)
    except UserError:  # its message's fix (score the run again) needs the checkpoint, which a record has not
        return None, f'{SCORE} is not a score (a record of finite logged_final, val_loss and windows)'
    return read, None


def record(src, dst):
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f'{src} is not a folder: give the study\'s output folder (e.g. out/ablation)')
    if dst.exists() and not dst.is_dir():
        raise UserError(f'{dst} is a file: give a record folder (e.g. out/records/<study>-<date>)')
    if dst.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(dst.resolve()):
        raise UserError(f'{dst} and {src} lie one inside the other: the record would copy itself as more runs (give a '
                        f'record folder outside the study, e.g. out/records/<study>-<date>)')
    runs, others = finished_runs(src)
    if not runs:
        raise UserError(f'{src} holds no finished run (a run folder with config.json and a log that spent its budget): '
                        f'nothing recorded')
    scored = {}
    for run in runs:  # every run is checked, and every conflict found, before anything is written
        read, problem = read_whole_run(run)
        if problem:
            raise UserError(f'{run}/{problem}: a damaged run is not recorded, and nothing was written to {dst}: train it '
                            f'again (a score: python -m studies.finals {run} --overwrite=True), or move it out of {src}')
        scored[run] = read_score(read) is not None  # an earlier run's score in this folder is left
        there = dst / run.relative_to(src) / 'config.json'
        if there.exists() and there.read_bytes() != (run / 'config.json').read_bytes():
            raise UserError(f'{there} records another run than {run}: record this study under another folder')
    for run in runs:
        rel = run.relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (run / name).exists() and (name != SCORE or scored[run]):  # never an earlier run's score
                atomic_write_bytes(dst / rel / name, (run / name).read_bytes())
        out = run.parent / f'{run.name}.out'
        if out.exists():
            atomic_write_bytes(dst / rel.parent / out.name, out.read_bytes())
    print(f'{len(runs)} finished run(s) recorded in {dst}{left_out(src, others)}')


def main(argv):
    paths = [a for a in argv if not a.startswith('-')]
    if {'-h', '--help'} & set(argv):
        print(__doc__)
        sys.exit(0)
    if len(paths) != 2:
        print('usage: python -m studies.records STUDY_OUT_DIR RECORD_FOLDER', file=sys.stderr)
        sys.exit(2)
    return cli(lambda c: record(*paths), RecordsConfig, [a for a in argv if a.startswith('-')],
               'STUDY_OUT_DIR RECORD_FOLDER')


if __name__ == '__main__':
    main(sys.argv[1:])
