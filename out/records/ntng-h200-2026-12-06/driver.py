"""The 2026-12-06 runs: the ablation's stack and drop rows charged under the rescaled H200 table (a second
reference system) and each row's tuned lr x0.5, x1, x2 at the largest budget on the tuning seed.
Run from the snapshot worktree: OMP_NUM_THREADS=1 python out/driver.py (resumable: finished runs skipped)."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sweep
from sweep import AblateConfig

GPU = 'config/rst/h200/gpt_L4_H4_D128_T128_V256_B32.json'
TUNED = 'out/tuned.json'


def gpu_plan(rows, budgets):
    cfg = AblateConfig(out_dir='out/ablation_h200', methods=rows, budgets=(120.0, 240.0, 480.0), tuned=TUNED)
    return [(label, script, {**args, 'rst_table': GPU}) for label, script, args in sweep.sweep_plan(cfg) if args['budget'] in budgets]


def lr_plan(rows, factors=(0.5, 1.0, 2.0)):
    cfg = AblateConfig(out_dir='out/lr_check', methods=rows, budgets=(120.0,), seeds=(0,), tuned=TUNED)  # read as 120, seed 0; run at 480 on 1000 below
    plan = []
    for label, script, args in sweep.sweep_plan(cfg):
        for f in factors:
            extra = {'weight_decay': args['weight_decay'] / f} if args.get('optimizer') == 'lion' else {}
            plan.append((label, script, {**args, **extra, 'lr': args['lr'] * f,
                                         'seed': 1000, 'budget': 480.0, 'out_dir': f"out/lr_check/{label}/x{f:g}/s1000"}))
    return plan


def rerun_plan(row, factor, budget):
    """Added 2026-12-06 after the lr check: the row's column at `budget` rerun at its tuned lr x factor, the
    reported seeds 0-4, into out/ablation_lr/ (the x2 lr beat the tuned one at 480 RST on the tuning seed)."""
    cfg = AblateConfig(out_dir='out/ablation_lr', methods=(row,), budgets=(120.0, 240.0, 480.0), tuned=TUNED)
    return [(label, script, {**args, 'lr': args['lr'] * factor}) for label, script, args in sweep.sweep_plan(cfg)
            if args['budget'] == budget]



def long_plan(rows, factor, budget=960.0):
    """Added 2026-12-07, before any of its runs (issue 34's longer budget): the baseline's and stacking's column
    at 960 RST, seeds 0-4, each at its tuned lr x factor: the lr their 480-RST check found better than the
    120-RST one (x2 for both), as their 480-RST reruns ran; not checked at 960 itself."""
    cfg = AblateConfig(out_dir='out/ablation_960', methods=rows, budgets=(120.0, budget), tuned=TUNED)  # 120: read as tuned
    return [(label, script, {**args, 'lr': args['lr'] * factor}) for label, script, args in sweep.sweep_plan(cfg)
            if args['budget'] == budget]

# stack's reruns added 2026-12-06 when its check ended like the baseline's (x2 best of three at 480 RST).
# 2026-12-07: the plan split into named parts, so a queue can interleave them with another worktree's runs
# (`python out/driver.py stack_rerun lr_lion_sophiag`); with no part named, every part runs in this order.
PARTS = {
    'gpu_stack_small': lambda: gpu_plan(('stack',), (120.0, 240.0)),
    'lr_baseline_stack': lambda: lr_plan(('baseline', 'stack')) + lr_plan(('baseline',), (4.0,)),
    'baseline_rerun': lambda: rerun_plan('baseline', 2.0, 480.0),
    'stack_rerun': lambda: rerun_plan('stack', 2.0, 480.0) + lr_plan(('stack',), (4.0,)),
    'lr_lion_sophiag': lambda: lr_plan(('lion', 'sophiag')),
    'lr_sb_drop': lambda: lr_plan(('sb', 'drop')),
    'drop_rerun': lambda: rerun_plan('drop', 2.0, 480.0) + lr_plan(('drop',), (4.0,)),  # 2026-12-07: drop's check chose x2
    'sb_rerun': lambda: rerun_plan('sb', 2.0, 480.0) + lr_plan(('sb',), (4.0,)),  # 2026-12-07: sb's check chose x2
    'gpu_stack_480': lambda: gpu_plan(('stack',), (480.0,)),
    'gpu_drop': lambda: gpu_plan(('drop',), (120.0, 240.0, 480.0)),
    'long_960': lambda: long_plan(('baseline', 'stack'), 2.0),
}
names = [a for a in sys.argv[1:] if not a.startswith('--')] or list(PARTS)
unknown = [n for n in names if n not in PARTS]
if unknown:
    sys.exit(f"driver.py: unknown part(s) {unknown}; choose from {list(PARTS)}")
plan = [run for n in names for run in PARTS[n]()]
for label, script, args in plan:
    print(label, args['out_dir'], args['lr'], args.get('rst_table', ''), flush=True)
if '--dry' not in sys.argv:
    sweep.run_plan(plan, jobs=2)
