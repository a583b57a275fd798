"""Issue 34, 2026-12-07: is a rerun the run it repeats? Every train loss and eval the recorded run logged must be
logged by the rerun at the same step with the same value (floats compared exactly), and both must end at the same
step; the config keys that differ (other than where the run was written) are printed. Exits 1 on any difference.
    python out/same_run.py RERUN_FOLDER RECORDED_FOLDER          (from /work/study-next)"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import runs


def logged(folder, key):
    return {r['step']: r[key] for r in runs.read_log(Path(folder) / 'log.jsonl') if key in r}


def config(folder):
    return json.loads((Path(folder) / 'config.json').read_text())['config']


rerun, record = sys.argv[1], sys.argv[2]
a, b = config(rerun), config(record)
differs = {k: (b.get(k, 'missing'), a.get(k, 'missing')) for k in sorted(a.keys() | b.keys())
           if k not in ('out_dir', 'overwrite') and a.get(k, 'missing') != b.get(k, 'missing')}
print(f'{rerun} against {record}: config keys that differ (recorded, rerun): {differs}')
same = True
for key in ('train_loss', 'val_loss'):
    mine, theirs = logged(rerun, key), logged(record, key)
    equal = sum(mine.get(step) == value for step, value in theirs.items())
    same &= equal == len(theirs) and max(mine, default=None) == max(theirs, default=None)
    last = max(theirs, default=None)
    print(f'  {key}: {equal} of {len(theirs)} recorded values identical; last step {last}: rerun {mine.get(last)!r}, '
          f'recorded {theirs.get(last)!r}; last rerun step {max(mine, default=None)}')
if not same:
    sys.exit(f'{rerun} is not the recorded run {record}')
print('  identical')
