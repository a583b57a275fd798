"""Rebuild the sweep's shared RHO-LOSS IL model (issue 34, 2026-12-07) in this snapshot worktree (4523809, then 9eb60e8:
no change to this run's code).

Its search's logs are in out/tune/il/search/ (b480, b960, b1920: copied from the CPU table's records); the best
run, 960 RST, has no checkpoint. Its recorded config predates keys added since (vocab_multiple, muon_*,
rst_add, temperature, top_k; none changes this run: a 256-byte vocabulary is already a multiple of 64), so
rho.train_il would not recognise the search and would train all three runs again (3360 RST). This trains
the 960-RST run alone (--stage=il, il_budget 960, no doubling) with the sweep's own keys, exactly as the
search trained it, then precomputes the IL cache; and compares its evals with the CPU table's rebuild of the
same run (ntng-cpu-2026-11-30/ablation/il_rebuild/, val loss 1.1110), the IL model every RHO-LOSS run of
that table used. Its logged train losses and evals must equal that rebuild's at every step, or it exits non-zero and the rows that
share the model (rho_s0.1, the rho lr checks, rho under the H200 table) are not run (next.sh checks
out/il_rebuild.ok, written only then).
    OMP_NUM_THREADS=1 python out/rebuild_il.py      (from /work/study-next; resumable)
"""
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rho
import runs
from studies.ntng import read_sweep

spec = read_sweep('config/ablation.py')
args = {**spec['COMMON'], **spec['METHODS']['rho'][1], 'lr': 0.002, 'seed': 1000, 'budget': 120.0,
        'out_dir': 'out/tune/il_stage', 'il_out_dir': 'out/tune/il', 'il_cache': 'out/tune/il_cache',
        'il_budget': 960.0, 'il_doublings': 0, 'stage': 'il', 'label': 'rho (tuning)'}
cfg = rho.RhoConfig(**args)
search = Path('out/tune/il/search/b960')
diff = runs.config_difference(search, dataclasses.asdict(rho.il_config(cfg, 960.0)))
saved = json.loads((search / 'config.json').read_text())['config']
planned = json.loads(json.dumps(dataclasses.asdict(rho.il_config(cfg, 960.0))))
differs = {k: (saved.get(k, 'missing'), v) for k, v in planned.items() if k not in ('init_from', 'overwrite') and saved.get(k, 'missing') != v}
print('keys that differ from the recorded 960 run (saved, planned):', differs)
if any(saved.get(k, 'missing') != 'missing' for k in differs):
    sys.exit('a key the recorded run had differs: not the same run, stopping')
if not (Path(cfg.il_out_dir) / 'ckpt.pt').exists() or not rho.il_cache_is_valid(cfg):
    rho.main(cfg)


def logged(log, key):
    return {r['step']: r[key] for r in runs.read_log(Path(log)) if key in r}


# compared step by step (a resumed run's log is trimmed to its checkpoint, then goes on), and required equal at
# every logged train loss and eval: the rows that use this model (rho_s0.1, the rho lr checks, rho under the
# H200 table) are read against the CPU table's rho row, which used the CPU table's rebuild; any difference
# would confound them
mine, theirs = Path(cfg.il_out_dir) / 'search' / 'b960' / 'log.jsonl', '../main/out/records/ntng-cpu-2026-11-30/ablation/il_rebuild/log.jsonl'
same = {}
for key in ('train_loss', 'val_loss'):
    a, b = logged(mine, key), logged(theirs, key)
    same[key] = (sum(a.get(step) == value for step, value in b.items()), len(b))
    print(f'{key}: {same[key][0]} of {same[key][1]} logged values identical; last: this rebuild {a.get(max(b))!r}, '
          f"the CPU table's {b[max(b)]!r}")
Path('out/il_rebuild.ok').unlink(missing_ok=True)
if any(n != of for n, of in same.values()):
    sys.exit('the rebuilt IL model differs from the one the CPU table used: the rows that share it are not run')
Path('out/il_rebuild.ok').write_text(f"identical to the CPU table's IL rebuild: {same}\n")
