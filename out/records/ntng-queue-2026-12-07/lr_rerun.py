"""Issue 34, 2026-12-07: the RHO-LOSS rows' lr checks decide their reruns. For each row given, its lr check's verdict
(studies.lr_check's table over out/lr_check: is x1 the best of x0.5, x1, x2 at 480 RST on the tuning seed?); where
it is not, rerun.py reruns the row's 480-RST column at the better factor on seeds 0-4, with the check one factor
further out, as the other rows' reruns were. From the snapshot worktree /work/study-next; resumable:
    OMP_NUM_THREADS=1 python out/lr_rerun.py rho rho_s0.1"""
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from studies.lr_check import lr_check_table

lines = [[c.strip() for c in line.strip('|').split('|')] for line in lr_check_table('out/lr_check').splitlines()
         if line.startswith('| ')]
column = lines[0].index('tuned lr best of three')  # the header's
for row in sys.argv[1:]:
    best = next((cells[column] for cells in lines[1:] if cells[0] == row), 'not run')
    print(f'{row}: tuned lr best of three at 480 RST: {best}', flush=True)
    if best.startswith('no: x'):
        subprocess.run([sys.executable, 'out/rerun.py', row, re.match(r'no: x([0-9.]+)', best).group(1)], check=True)
    elif not best.startswith('yes'):
        sys.exit(f'{row}: its lr check has not finished ({best}): run next.sh 3 first')
