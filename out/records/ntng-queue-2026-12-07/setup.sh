#!/bin/bash
# Issue 34's study environment on a fresh machine, then the queue. A session's machine may keep nothing of the
# last one (2026-12-07, third session: the worktrees, the venv and every unfinished run were gone; the fourth found
# all kept), so this rebuilds what queue.sh expects from main's commits and records alone: the venv, the two
# snapshot worktrees, their scripts and tuned.json files, the IL search's logs, and every recorded run copied back
# into the folder its study writes, where the study sees it finished and skips it. Idempotent; a run folder
# already there is left as it is.
#     bash /work/main/out/records/ntng-queue-2026-12-07/setup.sh && nohup setsid bash /work/queue.sh > /work/queue.out 2>&1 &
set -e
MAIN=/work/main R=/work/main/out/records Q=/work/main/out/records/ntng-queue-2026-12-07
[ -x /work/venv/bin/python ] || { python3 -m venv /work/venv && /work/venv/bin/pip install -q torch==2.13.0 -r $MAIN/requirements.txt; }
[ -d /work/study-1206 ] || git -C $MAIN worktree add --detach /work/study-1206 9468c83
[ -d /work/study-next ] || git -C $MAIN worktree add --detach /work/study-next 9eb60e8  # 4523809 until next.sh 3
mkdir -p /work/study-1206/out /work/study-next/out/tune/il
cp $R/ntng-h200-2026-12-06/driver.py /work/study-1206/out/
cp $R/ntng-cpu-2026-11-30/tune/tuned.json /work/study-1206/out/tuned.json
for f in next.sh rebuild_il.py rerun.py cpu_rho.py same_run.py lr_rerun.py; do  # a new file, never rewritten in place:
    cp $Q/$f /work/study-next/out/.$f.new && mv /work/study-next/out/.$f.new /work/study-next/out/$f  # bash reads a running script as it goes
done
[ -f /work/study-next/out/tune/tuned.json ] || cp $R/ntng-sophia-rho-2026-12-07/tuned.json /work/study-next/out/tune/  # tune adds rows to it
cp -rn $R/ntng-cpu-2026-11-30/tune/il/search /work/study-next/out/tune/il/
# the committed queue replaces an older copy (a machine kept from an earlier session still held one, 2026-12-07),
# but never a running queue's: bash reads its script as it goes
# (and a kept study-next worktree older than next.sh 3's commit moves to it, never under a running queue)
if pgrep -f 'bash /work/queue.sh' > /dev/null; then echo "a queue is running: /work/queue.sh left as it is"; else
    cp $Q/queue.sh /work/queue.sh
    git -C /work/study-next merge-base --is-ancestor 9eb60e8 HEAD || git -C /work/study-next checkout -q --detach 9eb60e8
fi

restore() {  # restore RECORD_FOLDER WORKTREE_FOLDER [ROW...]: the recorded runs (config.json, log.jsonl), rows given or all
    local src=$1 dst=$2; shift 2
    [ -d "$src" ] || return 0
    local rows=("$@"); [ ${#rows[@]} -gt 0 ] || rows=($(cd "$src" && ls -d */ 2>/dev/null | tr -d /))
    for row in "${rows[@]}"; do
        [ -d "$src/$row" ] || continue
        (cd "$src" && find "$row" -name config.json -printf '%h\n') | while read -r run; do
            [ -e "$dst/$run" ] && continue
            mkdir -p "$dst/$run" && cp "$src/$run/config.json" "$src/$run/log.jsonl" "$dst/$run/"
        done
    done
}
L=$R/ntng-lr-check-2026-12-06
restore $L /work/study-1206/out/lr_check baseline stack lion sophiag sb drop
restore $L /work/study-next/out/lr_check muon sfadamw rho rho_s0.1
restore $L/ablation_lr /work/study-1206/out/ablation_lr baseline stack drop sb
restore $L/ablation_lr /work/study-next/out/ablation_lr muon sfadamw rho rho_s0.1
restore $R/ntng-h200-2026-12-06 /work/study-1206/out/ablation_h200 stack drop
restore $R/ntng-h200-2026-12-06 /work/study-next/out/ablation_h200 sb rho
restore $R/ntng-960-2026-12-07/ablation /work/study-1206/out/ablation_960
restore $R/ntng-rho-2026-12-07/ablation /work/study-next/out/ablation_rho
restore $R/ntng-rho-2026-12-07/tune /work/study-next/out/tune rho_s0.1
restore $R/ntng-rho-2026-12-07/cpu_rho_check /work/study-next/out/cpu_rho_check
for run in {rho,rho_il_charged}/b480/s{3,4}; do  # next.sh 6's seeds, recorded into the CPU table's own folder
    src=$R/ntng-cpu-2026-11-30/ablation/$run dst=/work/study-next/out/cpu_rho/$run
    [ -d $src ] && [ ! -e $dst ] && mkdir -p $dst && cp $src/config.json $src/log.jsonl $dst/
done
echo "setup done: $(find /work/study-1206/out /work/study-next/out -name log.jsonl | wc -l) recorded run(s) in the worktrees"
