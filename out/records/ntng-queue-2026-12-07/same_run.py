"""Issue 34, 2026-12-07: is a rerun the run it repeats? Every record the recorded run logged (train lines, evals, a
RHO-LOSS run's step-0 IL record) must be logged by the rerun, in the same order, with every value equal (floats
compared exactly), but the clock's (wall times, throughput, mfu, eta); and every config key the recorded run had
must be the same (keys added to the code since are printed, not required). Exits 1 on any difference.
    python out/same_run.py RERUN_FOLDER RECORDED_FOLDER          (from /work/study-next)"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import runs

CLOCK = ('wall', 'tokens_per_s', 'mfu', 'eta_s')  # what a machine's speed changes


def records(folder):
    return [{k: v for k, v in r.items() if not any(c in k for c in CLOCK)} for r in runs.read_log(Path(folder) / 'log.jsonl')]


def config(folder):
    return json.loads((Path(folder) / 'config.json').read_text())['config']


rerun, record = sys.argv[1], sys.argv[2]
mine, theirs = config(rerun), config(record)
differs = {k: (theirs.get(k, 'missing'), mine.get(k, 'missing')) for k in sorted(mine.keys() | theirs.keys())
           if k not in ('out_dir', 'overwrite') and mine.get(k, 'missing') != theirs.get(k, 'missing')}
print(f'{rerun} against {record}: config keys that differ (recorded, rerun): {differs}')
problems = [f'config key {k} differs' for k in differs if theirs.get(k, 'missing') != 'missing']
a, b = records(rerun), records(record)
equal = sum(x == y for x, y in zip(a, b))
print(f'  log: {equal} of {len(b)} recorded records identical (the clock left out); the rerun logged {len(a)}; '
      f"last recorded: {b[-1] if b else None}")
if equal != len(b) or len(a) != len(b):
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    problems.append(f'log record {first} differs: rerun {a[first] if first < len(a) else None}, '
                    f'recorded {b[first] if first < len(b) else None}')
if problems:
    sys.exit(f'{rerun} is not the recorded run {record}: ' + '; '.join(problems))
print('  identical')
