#!/bin/bash
# Record what the queue has finished, in one command (from /work/main, at a session's end or whenever runs land):
# score each new final on all of val (studies.finals skips runs already scored and restored runs, which have no
# checkpoint), copy every finished run into its record folder (studies.records refuses a conflicting run), then
# regenerate RESULTS.md. The findings' prose in studies/results.in.md is updated by hand afterwards.
#     bash out/records/ntng-queue-2026-12-07/record.sh
cd /work/main && . /work/venv/bin/activate || exit 1
export OMP_NUM_THREADS=1
R=out/records failed=0
rec() {  # rec STUDY_FOLDER RECORD_FOLDER: a study folder that has no finished run yet is passed over
    [ -d "$1" ] && python -c "import sys; from pathlib import Path; from studies.records import finished_runs
sys.exit(0 if finished_runs(Path(sys.argv[1]))[0] else 1)" "$1" || { echo "$1: no finished run yet"; return; }
    python -m studies.finals "$1" && python -m studies.records "$1" "$2" || { echo "record $1 failed"; failed=1; }
}
rec /work/study-1206/out/ablation_h200  $R/ntng-h200-2026-12-06
rec /work/study-next/out/ablation_h200  $R/ntng-h200-2026-12-06
rec /work/study-next/out/ablation_rho   $R/ntng-rho-2026-12-07/ablation
rec /work/study-next/out/tune/rho_s0.1  $R/ntng-rho-2026-12-07/tune/rho_s0.1
rec /work/study-next/out/lr_check       $R/ntng-lr-check-2026-12-06
rec /work/study-next/out/ablation_lr    $R/ntng-lr-check-2026-12-06/ablation_lr
rec /work/study-1206/out/ablation_960   $R/ntng-960-2026-12-07/ablation
rec /work/study-next/out/cpu_rho_check  $R/ntng-rho-2026-12-07/cpu_rho_check
rec /work/study-next/out/cpu_rho        $R/ntng-cpu-2026-11-30/ablation   # next.sh 6: seeds 3-4, after the check
[ -f /work/study-next/out/cpu_rho.log ] && mkdir -p $R/ntng-rho-2026-12-07/cpu_rho_check &&
    cp /work/study-next/out/cpu_rho.log $R/ntng-rho-2026-12-07/cpu_rho_check/  # same_run.py's comparison is in it
# tuned.json gains rho_s0.1 when its tuning ends: kept with that tuning's runs
python - <<'PY' || failed=1
import json, shutil
t = json.load(open('/work/study-next/out/tune/tuned.json'))
if 'rho_s0.1' in t.get('tuned', {}):  # its tuning finished
    shutil.copyfile('/work/study-next/out/tune/tuned.json', 'out/records/ntng-rho-2026-12-07/tune/tuned.json')
    print('tuned.json (with rho_s0.1) recorded')
PY
python -m studies.results --figures=True && python -m studies.results --check=True || failed=1  # figures: they hash the records
exit $failed
