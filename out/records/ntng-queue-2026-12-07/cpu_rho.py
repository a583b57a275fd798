"""Issue 34, 2026-12-07: the CPU table's two RHO-LOSS rows at 480 RST, whose seeds 3-4 never ran (the IL model was lost
with a machine first). Planned exactly as that sweep planned them (studies.ntng's sweep_plan, 120 and 480 RST, the
120 column only read for the tuning's budget), from the snapshot worktree /work/study-next, two runs at a time:
    OMP_NUM_THREADS=1 python out/cpu_rho.py check [--dry]   seed 0 again, into out/cpu_rho_check (same_run.py compares)
    OMP_NUM_THREADS=1 python out/cpu_rho.py seeds [--dry]   seeds 3 and 4, into out/cpu_rho"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from studies.ntng import AblateConfig, sweep_plan
from studies.plan import run_plan

what = sys.argv[1]
out_dir, seeds = {'check': ('out/cpu_rho_check', (0,)), 'seeds': ('out/cpu_rho', (3, 4))}[what]
cfg = AblateConfig(out_dir=out_dir, methods=('rho', 'rho_il_charged'), budgets=(120.0, 480.0), seeds=seeds,
                   tuned='out/tune/tuned.json')
plan = [run for run in sweep_plan(cfg) if run.args['budget'] == 480.0]
for run in plan:
    print(run.label, run.args['out_dir'], flush=True)
if '--dry' not in sys.argv:
    run_plan(plan, 2)
