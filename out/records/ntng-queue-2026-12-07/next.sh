#!/bin/bash
# Issue 34's queue for the snapshot worktree /work/study-next (main at 4523809; 9eb60e8 from step 3 on), two single-thread runs at a time.
# Every command is resumable: rerun and finished runs are skipped. `next.sh 2 3` runs steps 2 and 3; no argument: 1-4.
set -e
cd /work/study-next && . /work/venv/bin/activate
export OMP_NUM_THREADS=1
T=out/tune/tuned.json
for step in ${@:-1 2 3 4}; do case $step in
# 1. Sophia-G's rho axis to 0.64 (config/ablation.py TUNE): only the 10 new points run, beside the CPU tuning's
1) python -m studies.ntng tune --methods="('sophiag',)" --out_dir=out/tune --jobs=2 >> out/tune_rho.log 2>&1 ;;
# 2. Muon's and schedule-free AdamW's lr check at 480 RST on the tuning seed
2) python -m studies.ntng lr_check --tuned=$T --methods="('muon','sfadamw')" --jobs=2 >> out/lr_check.log 2>&1 ;;
# 3. RHO-LOSS with its IL model charged at 0.1 and 0.25 of each budget, and the RHO-LOSS paper's selection
#    ratio 0.1 tuned like every row (its own lr grid at 120 RST) with the sweep's shared IL model. That model
#    (its best search run, 960 RST) is rebuilt first (out/rebuild_il.py, one job) beside one job of the
#    fraction rows; when it ends, the fraction rows are stopped (each saves a checkpoint) and go on two at a time.
#    The rows that share the IL model run only if its evals equal the CPU table's rebuild's (out/il_rebuild.ok).
#    (2026-12-07, before any step-3 run) the worktree moved to the commit whose LR schedule spans the budget left
#    after the costs charged before the first step (an IL-charged run), 9eb60e8; step 3 refuses an older one.
3) git merge-base --is-ancestor 9eb60e8 HEAD || { echo "next.sh 3: this worktree predates 9eb60e8 (the IL-charged LR schedule fix)"; exit 3; }
   while pgrep -f 'python out/rebuild_il.py' > /dev/null; do sleep 30; done  # one started by hand ahead of the queue
   python out/rebuild_il.py >> out/rebuild_il.log 2>&1 & P=$!
   python -m studies.ntng ablate --tuned=$T --methods="('rho_il_f0.1','rho_il_f0.25')" --out_dir=out/ablation_rho --jobs=1 >> out/ablation_rho.log 2>&1 & A=$!
   R=0; wait $P || R=$?
   kill -TERM $A || true; wait $A || true
   python -m studies.ntng ablate --tuned=$T --methods="('rho_il_f0.1','rho_il_f0.25')" --out_dir=out/ablation_rho --jobs=2 >> out/ablation_rho.log 2>&1
   # the rows below share the rebuilt IL model: only when it is the CPU table's (rebuild_il.py writes il_rebuild.ok)
   [ $R = 0 ] && [ -e out/il_rebuild.ok ] || { echo "next.sh 3: the shared IL model was not rebuilt identically (out/rebuild_il.log)"; exit 5; }
   python -m studies.ntng tune --methods="('rho_s0.1',)" --out_dir=out/tune --jobs=2 >> out/tune_rho_s.log 2>&1
   python -m studies.ntng ablate --tuned=$T --methods="('rho_s0.1',)" --out_dir=out/ablation_rho --jobs=2 >> out/ablation_rho.log 2>&1
   python -m studies.ntng lr_check --tuned=$T --methods="('rho','rho_s0.1')" --jobs=2 >> out/lr_check.log 2>&1 ;;
# 4. Selective Backprop and RHO-LOSS (IL free, the shared IL model) under the H200 table
4) python -m studies.ntng ablate --tuned=$T --methods="('sb',)" --rst_table=config/rst/h200/gpt_L4_H4_D128_T128_V256_B32.json --out_dir=out/ablation_h200 --jobs=2 >> out/ablation_sb_h200.log 2>&1
   [ -e out/il_rebuild.ok ] || { echo "next.sh 4: the shared IL model is not rebuilt identically (step 3): rho not run"; exit 4; }
   python -m studies.ntng ablate --tuned=$T --methods="('rho',)" --rst_table=config/rst/h200/gpt_L4_H4_D128_T128_V256_B32.json --out_dir=out/ablation_h200 --jobs=2 >> out/ablation_sb_h200.log 2>&1 ;;
# 5. (2026-12-07) Muon's lr check chose x0.5 of its muon_lr: its 480-RST column rerun there, seeds 0-4, with the x0.25 check
5) python out/rerun.py muon 0.5 >> out/rerun.log 2>&1 ;;
# 6. (2026-12-07) The CPU table's two RHO-LOSS rows lack seeds 3-4 at 480 RST (their IL model was lost before they
#    ran; RESULTS.md: they run only if a rebuild reproduces it). The rebuild did (out/il_rebuild.ok), so seed 0 of both
#    rows runs again first (cpu_rho.py) and must equal its record in every logged value but the clock's (same_run.py), then 3-4.
6) [ -e out/il_rebuild.ok ] || { echo "next.sh 6: the shared IL model is not rebuilt identically (step 3)"; exit 6; }
   python out/cpu_rho.py check >> out/cpu_rho.log 2>&1
   for row in rho rho_il_charged; do
       python out/same_run.py out/cpu_rho_check/$row/b480/s0 ../main/out/records/ntng-cpu-2026-11-30/ablation/$row/b480/s0 >> out/cpu_rho.log 2>&1
   done
   python out/cpu_rho.py seeds >> out/cpu_rho.log 2>&1 ;;
# 7. (2026-12-07) RHO-LOSS's lr checks (step 3) decide: a row whose tuned lr is not the best of x0.5, x1, x2 at 480 RST
#    has its 480-RST column rerun at the better factor (lr_rerun.py, then rerun.py as for Muon in step 5)
7) python out/lr_rerun.py rho rho_s0.1 >> out/rerun.log 2>&1 ;;
*) echo "next.sh: unknown step $step (1-7)"; exit 2 ;;
esac; done
