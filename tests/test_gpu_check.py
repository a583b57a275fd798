"""The GPU check's CPU form, so the script that a lent GPU runs never rots: every check runs (or says why
it is skipped) through the same code at tiny sizes, and a bad flag is one line with exit status 2."""
import os
import subprocess
import sys

from conftest import ROOT


def run_check(*args):
    return subprocess.run([sys.executable, '-m', 'studies.gpu_check', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_the_cpu_form_runs_every_check():
    out = run_check('--device=cpu')
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = {line.split(':')[0]: line for line in out.stdout.splitlines()}
    assert 'tokens/s, MFU' in lines['gpt2'] and 'fused chunk 128: time' in lines['loss']
    assert all(f'{name} ok' in lines['methods'] for name in ('sophiag', 't5', 'sb'))
    assert lines['ddp'].startswith('ddp: skipped: needs 2 GPUs')
    assert 'FAILED' not in out.stdout


def test_a_bad_check_name_is_one_line_and_exit_2():
    out = run_check('--device=cpu', '--only=loss,gpu3')
    assert out.returncode == 2 and out.stderr.strip() == 'error: unknown check gpu3; choose from gpt2, loss, methods, ddp'
    assert out.stdout == ''  # nothing ran
