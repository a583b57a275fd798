"""A study's evidence into out/records/: each finished run's config.json, log.jsonl and console output
(<run>.out beside its folder), and its final_all_val.json where studies/finals.py scored it; never a
checkpoint or a cache. A run still going, stopped or diverged is left out, so a record folder holds only
what whole runs produced; run it again as more runs finish.

    python -m studies.records out/ablation out/records/ntng-today-2026-12-06/ablation

A run already in the record folder is refused if its config.json there differs (another run at the same
path: record it under another folder); the same run is copied again (its files are the same).
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from configurator import UserError, cli
from data.loader import atomic_write_bytes
from runs import read_run, run_finished
from studies.finals import FILE as SCORE, read_score

FILES = ('config.json', 'log.jsonl', 'final_all_val.json')  # a run's evidence; checkpoints and caches are not


@dataclass(frozen=True)
class RecordsConfig:
    """records takes no keys: a study's output folder and a record folder."""


def finished_runs(src):
    """The run folders under src whose logs show their whole budget spent and that no signal stopped."""
    return [p.parent for p in sorted(src.rglob('config.json'))
            if not (p.parent / 'stopped.json').exists() and (p.parent / 'log.jsonl').exists() and run_finished(p.parent)]


def record(src, dst):
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f'{src} is not a folder: give the study\'s output folder (e.g. out/ablation)')
    if dst.exists() and not dst.is_dir():
        raise UserError(f'{dst} is a file: give a record folder (e.g. out/records/<study>-<date>)')
    if dst.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(dst.resolve()):
        raise UserError(f'{dst} and {src} lie one inside the other: the record would copy itself as more runs (give a '
                        f'record folder outside the study, e.g. out/records/<study>-<date>)')
    runs = finished_runs(src)
    if not runs:
        raise UserError(f'{src} holds no finished run (a run folder with config.json and a log that spent its budget): '
                        f'nothing recorded')
    for run in runs:  # every conflict is found before anything is written
        there = dst / run.relative_to(src) / 'config.json'
        if there.exists() and there.read_bytes() != (run / 'config.json').read_bytes():
            raise UserError(f'{there} records another run than {run}: record this study under another folder')
    for run in runs:
        rel = run.relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (run / name).exists() and (name != SCORE or read_score(read_run(run))):  # never an earlier run's score
                atomic_write_bytes(dst / rel / name, (run / name).read_bytes())
        out = run.parent / f'{run.name}.out'
        if out.exists():
            atomic_write_bytes(dst / rel.parent / out.name, out.read_bytes())
    print(f'{len(runs)} finished run(s) recorded in {dst}')


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
