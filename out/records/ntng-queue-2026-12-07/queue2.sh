#!/bin/bash
# 2026-12-07: after /work/queue.sh (pid 30293) ends, the 960-RST column of the baseline and stacking (issue 34's longer budget).
. /work/venv/bin/activate
export OMP_NUM_THREADS=1
while kill -0 30293 2>/dev/null; do sleep 60; done
echo "long_960 start $(date)" >> /work/queue.log
(cd /work/study-1206 && python out/driver.py long_960 >> out/driver.log 2>&1) || echo "driver long_960 failed" >> /work/queue.log
echo "long_960 done $(date)" >> /work/queue.log
