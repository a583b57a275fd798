#!/bin/bash
# Issue 34's remaining runs, one queue over both snapshot worktrees, at most two single-thread runs at once.
# Resumable: copy to /work/queue.sh and start it again (`nohup setsid bash /work/queue.sh > /work/queue.out 2>&1 &`).
# Done before this version (2026-12-07): stack_rerun, lr_lion_sophiag, Sophia-G's rho axis (next.sh 1), lr_sb_drop,
# Muon's and schedule-free AdamW's lr checks (next.sh 2). On a fresh machine run setup.sh first (it restores finished runs).
. /work/venv/bin/activate
export OMP_NUM_THREADS=1
d() { (cd /work/study-1206 && python out/driver.py "$@" >> out/driver.log 2>&1) || echo "driver $* failed" >> /work/queue.log; }
n() { bash /work/study-next/out/next.sh "$@" || echo "next $* failed" >> /work/queue.log; }
echo "restart $(date)" >> /work/queue.log
d lr_sb_drop;                   echo "lr sb drop done $(date)" >> /work/queue.log
n 2;                            echo "lr muon sfadamw done $(date)" >> /work/queue.log
n 5;                            echo "muon rerun done $(date)" >> /work/queue.log
d drop_rerun sb_rerun;          echo "drop sb reruns done $(date)" >> /work/queue.log
d gpu_drop;                     echo "gpu drop done $(date)" >> /work/queue.log
n 3;                            echo "rho fractions done $(date)" >> /work/queue.log
n 6;                            echo "cpu rho 480 seeds 3-4 done $(date)" >> /work/queue.log
n 7;                            echo "rho lr reruns done $(date)" >> /work/queue.log
d gpu_stack_480;                echo "gpu stack 480 done $(date)" >> /work/queue.log
n 4;                            echo "sb rho h200 done $(date)" >> /work/queue.log
d long_960;                     echo "all done $(date)" >> /work/queue.log
