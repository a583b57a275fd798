"""Rebuild the sweep's shared RHO-LOSS IL model (issue 34, 2026-12-07) in this snapshot worktree (4523809).

Its search's logs are in out/tune/il/search/ (b480, b960, b1920: copied from the CPU table's records); the best
run, 960 RST, has no checkpoint. Its recorded config predates keys added since (vocab_multiple, muon_*,
rst_add, temperature, top_k; none changes this run: a 256-byte vocabulary is already a multiple of 64), so
rho.train_il would not recognise the search and would train all three runs again (3360 RST). This trains
the 960-RST run alone (--stage=il, il_budget 960, no doubling) with the sweep's own keys, exactly as the
search trained it, then precomputes the IL cache; and compares its evals with the CPU table's rebuild of the
same run (ntng-cpu-2026-11-30/ablation/il_rebuild/, val loss 1.1110), the IL model every RHO-LOSS run of
that table used.
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
mine = [r['val_loss'] for r in runs.read_log(Path(cfg.il_out_dir) / 'log.jsonl') if 'val_loss' in r]
theirs = [r['val_loss'] for r in runs.read_log(Path('../main/out/records/ntng-cpu-2026-11-30/ablation/il_rebuild/log.jsonl')) if 'val_loss' in r]
print(f'IL val loss: this rebuild {mine[-1]!r}, the CPU table\'s {theirs[-1]!r}; evals identical: {mine == theirs} '
      f'({sum(a == b for a, b in zip(mine, theirs))} of {len(theirs)} equal)')
