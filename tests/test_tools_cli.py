"""The lab's tools follow every entry point's command-line rules: `--help` prints the usage (every benchmark or
check, every key with its comment) and measures nothing; an unknown name, an unknown key or a malformed value is
one line on stderr naming it and the choices, exit 2, no traceback, nothing measured."""
import pytest
import torch

from conftest import run_script
from studies.bench import BENCHMARKS
from studies.gpu_check import CHECKS, METHODS

HELP_SECONDS = 60  # a benchmark takes minutes; --help only imports torch


def run_tool(*args):
    return run_script('-m', *args, env={'OMP_NUM_THREADS': '1'}, timeout=HELP_SECONDS)


def assert_one_line_error(out, *names):
    """Exit 2, one line on stderr naming each of names, no traceback, and nothing measured on stdout."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and 'Traceback' not in out.stderr, out.stderr
    assert out.stdout == ''
    for name in names:
        assert name in out.stderr, out.stderr


@pytest.mark.parametrize('form', [('studies.bench', '--help'), ('studies.bench', 'loss', '-h')])
def test_bench_help_names_every_benchmark_and_key(form):
    out = run_tool(*form)
    assert out.returncode == 0 and out.stderr == '', out.stderr
    assert out.stdout.startswith('usage: python -m studies.bench')
    assert all(f'  {name} ' in out.stdout for name in BENCHMARKS)
    assert "chunks = (1024,)  # loss: the fused path's chunk sizes" in out.stdout
    assert 'threads' not in out.stdout  # the header a measuring run prints first


def test_bench_runs_as_a_script_too():
    out = run_script('studies/bench.py', '--help', timeout=HELP_SECONDS)
    assert out.returncode == 0 and all(f'  {name} ' in out.stdout for name in BENCHMARKS), out.stderr


def test_bench_unknown_benchmark_is_one_line():
    out = run_tool('studies.bench', 'loss', 'nosuchbench')
    assert_one_line_error(out, 'nosuchbench', *BENCHMARKS)


@pytest.mark.parametrize('arg, names', [('--nosuch=1', ['--nosuch']), ('--chunk=256', ['--chunk', 'chunks']),
                                        ('--chunks=abc', ['--chunks', 'abc']), ('--chunks=0,512', ['--chunks', '> 0'])])
def test_bench_bad_key_or_value_is_one_line(arg, names):
    assert_one_line_error(run_tool('studies.bench', 'loss', arg), *names)


def test_gpu_check_help_names_every_check_method_and_key():
    out = run_tool('studies.gpu_check', '--device=cpu', '--help')
    assert out.returncode == 0 and out.stderr == '', out.stderr
    assert out.stdout.startswith('usage: python -m studies.gpu_check')
    assert all(f'  {name} ' in out.stdout for name in CHECKS) and all(name in out.stdout for name in METHODS)
    assert all(f'  {key} = ' in out.stdout for key in ('device', 'only', 'methods'))
    assert 'gpu_check on' not in out.stdout  # the header a checking run prints first


def test_gpu_check_runs_as_a_script_too():
    out = run_script('studies/gpu_check.py', '-h', timeout=HELP_SECONDS)
    assert out.returncode == 0 and all(f'  {name} ' in out.stdout for name in CHECKS), out.stderr


@pytest.mark.parametrize('arg, names', [('--methods=bogus', ['bogus', 'all', 'fast', *METHODS]),
                                        ('--methods=t5,', ["''"]), ('--only=gpt2,gpu3', ['gpu3', *CHECKS]),
                                        ('--nosuch=1', ['--nosuch']), ('--device=tpu', ['tpu', 'cuda', 'cpu'])])
def test_gpu_check_bad_name_key_or_value_is_one_line(arg, names):
    assert_one_line_error(run_tool('studies.gpu_check', '--device=cpu', arg), *names)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a machine with CUDA runs the GPU form')
def test_gpu_check_without_cuda_says_so_in_one_line():
    assert_one_line_error(run_tool('studies.gpu_check', '--device=cuda', '--only=loss'), 'no CUDA device', '--device=cpu')


def test_bench_a_failed_benchmark_is_one_line_the_others_still_run_and_the_status_is_1(monkeypatch, capsys):
    """Nothing measured is never a pass: a benchmark that fails (a missing package, an OOM) prints one FAILED
    line, the next one still runs, and the exit status is 1 with one line on stderr naming it."""
    from studies import bench
    ran = []

    def broken(cfg):
        raise ImportError("No module named 'tiktoken'")
    monkeypatch.setattr(bench, 'BENCHMARKS', {'loss': ('', broken), 'train': ('', lambda cfg: ran.append('train'))})
    assert bench.run([], bench.BenchConfig()) == 1
    out, err = capsys.readouterr()
    assert "loss: FAILED (ImportError: No module named 'tiktoken')" in out and ran == ['train']
    assert err.strip() == 'error: loss measured nothing (1 of 2 benchmark(s) did)'
    assert bench.run(['train'], bench.BenchConfig()) == 0


def test_bench_exits_with_its_status_and_refuses_an_empty_chunk_list():
    assert_one_line_error(run_tool('studies.bench', 'loss', '--chunks=()'), '--chunks is empty')
    out = run_tool('studies.bench', '--help', 'nosuchbench')      # --help wins: usage, nothing measured, exit 0
    assert out.returncode == 0 and out.stdout.startswith('usage: python -m studies.bench')


def test_gpu_check_that_measured_nothing_exits_1_with_one_line():
    """--only=ddp on a machine without two GPUs: the one check chosen is skipped, so nothing was confirmed."""
    if torch.cuda.device_count() >= 2:
        pytest.skip('two GPUs here: ddp runs')
    out = run_tool('studies.gpu_check', '--device=cpu', '--only=ddp')
    assert out.returncode == 1 and 'ddp: skipped: needs 2 GPUs' in out.stdout
    assert out.stderr.strip() == 'error: nothing measured: every check chosen (ddp) was skipped on this machine'
