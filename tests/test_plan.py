"""The plan runner (studies/plan.py) while runs go: a progress line per running run at most and at least
once a period, read from its log.jsonl; a budget-weighted ETA from the runs finished in this invocation
that one short run cannot make jump; and on a machine with several GPUs one run per GPU
(CUDA_VISIBLE_DEVICES in its environment), torchrun for a run of several processes. The GPU cases run on
any machine: torch.cuda.device_count is replaced."""
import json
import os
import sys

import pytest

from configurator import UserError
from data.loader import FolderLock
from studies import plan


def job(tmp_path, name, code, **kw):
    return plan.Job(name, [sys.executable, '-c', code], tmp_path / f'{name}.out', out_dir=tmp_path / name, **kw)


def write_log(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


# -----------------------------------------------------------------------------
# the ETA

def test_the_eta_waits_for_a_finished_run_then_weighs_runs_by_budget():
    assert plan.eta_seconds([], [('rst', 120.0)], 2) is None
    long = [('rst', 120.0, 240.0)]                                  # 2 s per RST
    left = [('rst', 120.0), ('rst', 60.0), ('rst', 60.0)]           # dealt to 2 lanes: 240 s beside 120 + 120 s
    assert plan.eta_seconds(long, left, 2) == pytest.approx(240.0)
    # a short run that went slowly (start-up dominates: 10 s for 3 RST) barely moves it: its 3 RST weigh 3
    moved = plan.eta_seconds(long + [('rst', 3.0, 10.0)], left, 2)
    assert moved == pytest.approx(120.0 * 250 / 123, rel=1e-9) and abs(moved - 240.0) / 240.0 < 0.02
    # the last run left does not go faster for the idle slot beside it
    assert plan.eta_seconds(long, [('rst', 30.0)], 2) == pytest.approx(60.0)
    # a unit no run has finished in is timed per run; a run without a budget weighs one
    assert plan.eta_seconds(long, [('iters', 50.0)], 1) == pytest.approx(240.0)
    assert plan.eta_seconds([('run', 1.0, 30.0)], [('run', 1.0)] * 4, 2) == pytest.approx(60.0)


def test_progress_says_what_it_waits_for_and_counts_a_runs_unspent_budget_only(tmp_path):
    todo = [plan.Job('b', [], tmp_path / 'b.out', unit='rst', total=60.0)]
    running = plan.Job('a', [], tmp_path / 'a.out', out_dir=tmp_path / 'a', unit='rst', total=60.0)
    progress = plan.Progress(todo + [running], 2)
    assert progress.eta(todo, [(running, 0.0)]) == 'eta: after the first run finishes'
    progress.finished.append(('rst', 60.0, 120.0))                   # 2 s per RST
    write_log(tmp_path / 'a', [{'step': 10, 'rst': 45.0}])           # a: 15 RST left (30 s); b beside it: 120 s
    assert progress.eta(todo, [(running, 0.0)]) == 'eta 2m00s (2 s per rst over 1 finished run(s); 2 at a time)'


def test_latest_progress_reads_the_newest_log_and_skips_one_older_than_the_job(tmp_path):
    write_log(tmp_path / 'r', [{'step': 50, 'train_loss': 3.0, 'rst': 2.0},
                               {'step': 50, 'val_loss': 2.5, 'rst': 2.0}, {'step': 75, 'train_loss': 2.4, 'rst': 3.1},
                               [1, 2], {'step': 'x', 'val_loss': 'abc'}])     # a list and text are skipped
    assert plan.latest_progress(tmp_path / 'r', 'rst') == {'step': 75, 'spent': 3.1, 'val_loss': 2.5, 'val_step': 50}
    newer = os.stat(tmp_path / 'r' / 'log.jsonl').st_mtime + 10
    assert plan.latest_progress(tmp_path / 'r', 'rst', since=newer) == {}     # the replaced run's log
    write_log(tmp_path / 'w' / 'budget_6', [{'step': 3, 'iters': 3.0}])       # a WSD trunk's branch folder
    assert plan.latest_progress(tmp_path / 'w', 'iters') == {'step': 3, 'spent': 3.0}
    line = plan.job_line(plan.Job('r', [], tmp_path / 'r.out', out_dir=tmp_path / 'r', unit='rst', total=6.0), 0.0, 95.0)
    assert line == '  r: step 75, 3.1 of 6 rst (52%), val loss 2.5000 at step 50, 1m35s'
    assert plan.job_line(plan.Job('n', [], tmp_path / 'n.out'), 0.0, 1.0) == '  n: starting (no log yet), 0m01s'
    wsd = plan.Job('w', [], tmp_path / 'w.out', out_dir=tmp_path / 'w', unit='iters', total=12.0)
    assert plan.job_line(wsd, 0.0, 3700.0) == '  w: step 3, 3 of 12 iters (25%), no eval yet, 1h01m'


def test_progress_is_reported_at_most_and_at_least_once_a_period(tmp_path, monkeypatch, capsys):
    now = [0.0]
    a = plan.Job('a', [], tmp_path / 'a.out', out_dir=tmp_path / 'a')
    progress = plan.Progress([a], 1, clock=lambda: now[0])
    reports = []
    for t in range(0, 181, 5):                       # the runner polls often; three minutes pass
        now[0] = float(t)
        progress.maybe_report([], [(a, 0.0)])
        reports += [t for line in capsys.readouterr().out.splitlines() if line.startswith('progress ')]
    assert reports == [60, 120, 180]


def test_a_running_plan_prints_each_runs_progress_and_an_eta(tmp_path, monkeypatch, capsys):
    """Real jobs that write a log as train.py does: the progress lines name each run's step, budget share and
    val loss; the ETA appears after the first run has finished."""
    monkeypatch.setattr(plan, 'PROGRESS_EVERY', 0.6)

    def code(name, seconds):
        folder = tmp_path / name
        return (f"import json, os, time; os.makedirs({str(folder)!r}, exist_ok=True)\n"
                f"for i in range(1, 7):\n"
                f"    rec = {{'step': 10 * i, 'rst': i / 2, 'val_loss': 3.0 - i / 10}}\n"
                f"    open({str(folder / 'log.jsonl')!r}, 'a').write(json.dumps(rec) + '\\n')\n"
                f"    time.sleep({seconds / 6})\nprint('done: 60 steps')\n")
    jobs = [job(tmp_path, 'short', code('short', 1.2), unit='rst', total=3.0),
            job(tmp_path, 'long', code('long', 4.0), unit='rst', total=3.0)]
    assert plan.run_jobs(jobs, 2) == []
    out = capsys.readouterr().out.splitlines()
    assert out[0] == 'running 2 run(s), 2 at a time; progress every 0.6 s'
    ends = [line for line in out if line.startswith('[')]
    assert ends[0].startswith('[1/2] short: done: 60 steps | eta ') and 'over 1 finished run(s)' in ends[0]
    assert ends[1].startswith('[2/2] long: done: 60 steps | eta: done')
    long_lines = [line for line in out if line.startswith('  long: step ')]
    assert long_lines and all(' of 3 rst (' in line and 'val loss 2.' in line for line in long_lines), out
    reports = [(i, line) for i, line in enumerate(out) if line.startswith('progress ')]
    assert reports, out
    first_end = out.index(ends[0])
    assert all(('eta: after the first run finishes' in line) == (i < first_end) for i, line in reports), out


# -----------------------------------------------------------------------------
# GPUs

PRINT_GPU = ("import os, time; t0 = time.time(); time.sleep(1.5); "
             "print(os.environ.get('CUDA_VISIBLE_DEVICES', '-'), t0, time.time())")


def placements(tmp_path, monkeypatch, n_gpus, n_jobs, n_parallel, **env):
    monkeypatch.setattr(plan.torch.cuda, 'device_count', lambda: n_gpus)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)  # ids 0..n-1 unless a case gives its own
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    jobs = [job(tmp_path, f'j{i}', PRINT_GPU) for i in range(n_jobs)]
    assert plan.run_jobs(jobs, n_parallel) == []
    return [j.log.read_text().split() for j in jobs]   # [devices, start, end] per job


def test_several_gpus_give_each_run_its_own(tmp_path, monkeypatch, capsys):
    """3 GPUs, 4 runs allowed at once: 3 run, each on its own GPU; the fourth waits for a free one."""
    runs = placements(tmp_path, monkeypatch, 3, 4, 4)
    assert 'running 4 run(s), 4 at a time on 3 GPUs, one run per GPU;' in capsys.readouterr().out
    for i, (dev, t0, t1) in enumerate(runs):
        overlapping = [d for j, (d, s, e) in enumerate(runs) if j != i and float(s) < float(t1) and float(t0) < float(e)]
        assert dev in ('0', '1', '2') and dev not in overlapping and len(overlapping) <= 2


def test_gpu_ids_are_the_ones_the_runner_was_given(tmp_path, monkeypatch, capsys):
    runs = placements(tmp_path, monkeypatch, 2, 2, 2, CUDA_VISIBLE_DEVICES='5,7')
    assert sorted(r[0] for r in runs) == ['5', '7']
    capsys.readouterr()
    placements(tmp_path, monkeypatch, 2, 2, 1)                          # --jobs=1: one GPU idles, and it says so
    assert capsys.readouterr().out.startswith('running 2 run(s), 1 at a time on 2 GPUs, one run per GPU (--jobs=2 would')


@pytest.mark.parametrize('n_gpus', [0, 1])
def test_one_gpu_is_shared_and_a_cpu_run_is_unchanged(tmp_path, monkeypatch, n_gpus):
    assert [r[0] for r in placements(tmp_path, monkeypatch, n_gpus, 2, 2)] == ['-', '-']
    assert plan.job_env({'A': '1'}, []) == {'A': '1'} and plan.job_env({}, ['3', '4']) == {'CUDA_VISIBLE_DEVICES': '3,4'}
    # threads: the caller's OMP_NUM_THREADS when set (one job beside another study keeps its one thread)
    assert plan.job_threads({'OMP_NUM_THREADS': '1'}, 1, 2) == '1' and plan.job_threads({}, 1, 2) == '2'
    assert plan.job_threads({}, 2, 2) == plan.job_threads({}, 4, 2) == '1' and plan.job_threads({}, 1, None) == '1'


def test_a_run_of_several_processes_starts_under_torchrun_and_takes_that_many_gpus(tmp_path, monkeypatch):
    args = {'out_dir': str(tmp_path / 'ddp'), 'budget': 6.0, 'budget_unit': 'rst'}
    argv = plan.Run('ddp', 'train.py', args, nproc=2).command()
    assert os.path.basename(argv[0]) == 'torchrun' and argv[1:3] == ['--standalone', '--nproc_per_node=2']
    assert argv[3].endswith('train.py') and "--out_dir='" + str(tmp_path / 'ddp') + "'" in argv
    assert plan.Run('one', 'train.py', args).command()[0] == sys.executable
    monkeypatch.setattr(plan.torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(UserError, match=r'asks for 4 processes, one GPU each; this machine has 2 GPU\(s\): plan it with nproc <= 2'):
        plan.run_jobs([plan.Job('big', ['true'], tmp_path / 'big.out', nproc=4)], 1)
    monkeypatch.setattr(plan.torch.cuda, 'device_count', lambda: 3)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    two = job(tmp_path, 'two', PRINT_GPU, nproc=2)
    assert plan.run_jobs([two], 1) == [] and two.log.read_text().split()[0] == '0,1'


def test_a_runs_cost_is_its_budget_or_one_run():
    assert plan.Run('a', 'train.py', {'out_dir': 'x', 'budget': 6.0, 'budget_unit': 'rst'}).cost() == ('rst', 6.0)
    assert plan.Run('w', 'train.py', {'out_dir': 'x', 'budget': 6.0, 'budget_unit': 'rst',
                                      'branch_budgets': (1.0, 2.0, 4.0)}).cost() == ('rst', 24.0)
    assert plan.Run('m', 'madpo.py', {'out_dir': 'x', 'stage': 'sft'}).cost() == ('run', 1.0)


def test_a_run_another_study_is_running_is_refused_before_its_console_log_is_touched(tmp_path, monkeypatch):
    """Two studies on one out_dir: the second must not truncate the live run's <run>.out (its only console
    log, and what a record copies) before the run's lock refuses it; its failure names the lock, not the
    other run's last line. A branch folder's lock (a WSD run) counts too; a free lock file does not."""
    monkeypatch.setattr(plan, 'PROGRESS_EVERY', 3600.0)
    live = job(tmp_path, 'live', 'print("new")')
    (tmp_path / 'live').mkdir()
    live.log.write_text('step 500 | the live run so far\n')
    for lock in (tmp_path / 'live' / 'lock', tmp_path / 'live' / 'budget_10' / 'lock'):
        lock.parent.mkdir(exist_ok=True)
        with FolderLock(lock, plan.in_use(lock.parent)):  # held, as by another study's running run
            failed = plan.run_jobs([live], 1)
        assert [why for _, why in failed] == [f'{lock.parent} is in use by another run (pid {os.getpid()}): wait for '
                                              'it to end, or use another --out_dir']
        assert live.log.read_text() == 'step 500 | the live run so far\n'
    (tmp_path / 'live' / 'lock').write_text('12345\n')  # left by a killed run: free
    assert plan.run_jobs([live], 1) == [] and live.log.read_text() == 'new\n'


def test_a_second_study_on_one_out_dir_is_refused_up_front_and_touches_nothing(tmp_path, monkeypatch, capsys):
    """Two ablations (or lr checks) on one --out_dir at once would each start the other's runs (refused: in use)
    and both end in failures, the second having truncated a live run's console log: the second refuses in one
    line, exit 2, before any run or .out is touched. Once the first ends, the folder is free again."""
    from studies import lr_check, ntng
    from test_compare import SWEEP
    (tmp_path / 'sweep.py').write_text(SWEEP)
    out = tmp_path / 'abl'
    live = out / 'baseline' / 'b6' / 's0.out'
    live.parent.mkdir(parents=True)
    live.write_text('step 5 | the first study\'s live run\n')
    monkeypatch.setattr(ntng, 'run_plan', lambda *a, **kw: pytest.fail('ran beside another study'))
    monkeypatch.setattr(lr_check, 'run_plan', lambda *a, **kw: pytest.fail('ran beside another study'))
    monkeypatch.setattr(lr_check, 'lr_check_plan', lambda cfg: [])
    first = FolderLock(out / '.study.lock', lambda pid: UserError(pid)).acquire()  # held, as by the first study
    for argv in (['ablate', str(tmp_path / 'sweep.py'), f'--out_dir={out}', '--quick=True'],
                 ['lr_check', str(tmp_path / 'sweep.py'), f'--out_dir={out}']):
        with pytest.raises(SystemExit) as e:
            ntng.main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
            f'error: --out_dir={out} is being used by another study (pid {os.getpid()}): wait for it, or give another --out_dir']
    assert live.read_text() == 'step 5 | the first study\'s live run\n' and not (out / 'ablation.md').exists()
    first.release()
    ran = []
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: ran.extend(plan))
    monkeypatch.setattr(ntng, 'compare', lambda *a, **kw: 'table')
    ntng.main(['ablate', str(tmp_path / 'sweep.py'), f'--out_dir={out}', '--quick=True'])
    assert len(ran) == 3 and not (out / '.study.lock').exists()


def test_a_study_that_refuses_leaves_no_folder_it_made(tmp_path):
    with pytest.raises(UserError):
        with plan.study_lock(tmp_path / 'new' / 'sweep'):
            raise UserError('refused before any run')
    assert not (tmp_path / 'new').exists()
