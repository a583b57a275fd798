"""Issue 34, 2026-12-07: a row's 480-RST column rerun at its tuned lr x FACTOR, the factor its lr check at 480 RST
on the tuning seed found better than the 120-RST choice (the check's rule, RESULTS.md "Learning rates checked where
they are used"), on the reported seeds 0-4, into out/ablation_lr/<row>/b480/s<seed>. The lr moved is the row's
LR_KEY (Muon's muon_lr). Beside them, the check one factor further out on the tuning seed (x0.25 for x0.5, x4 for
x2), as the baseline's and stacking's reruns had, so the table shows whether the better factor is an edge. Run from the snapshot worktree /work/study-next (commit 4523809); resumable:
    OMP_NUM_THREADS=1 python out/rerun.py muon 0.5 [--dry]"""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from studies.lr_check import LrCheckConfig, lr_check_plan
from studies.ntng import AblateConfig, read_sweep, sweep_plan
from studies.plan import run_plan

row, factor = sys.argv[1], float(sys.argv[2])
lr_key = read_sweep('config/ablation.py').get('LR_KEY', {}).get(row, 'lr')
cfg = AblateConfig(out_dir='out/ablation_lr', methods=(row,), budgets=(120.0, 480.0), tuned='out/tune/tuned.json')  # 120: read as tuned
plan = [dataclasses.replace(run, args={**run.args, lr_key: run.args[lr_key] * factor})
        for run in sweep_plan(cfg) if run.args['budget'] == 480.0]
further = factor / 2 if factor < 1 else factor * 2
plan += lr_check_plan(LrCheckConfig(tuned=cfg.tuned, methods=(row,), factors=(further,)))
for run in plan:
    print(run.label, run.args['out_dir'], lr_key, run.args[lr_key], flush=True)
if '--dry' not in sys.argv:
    run_plan(plan, 2)
