"""The ablation comparison (issues 9 and 12): the method x budget table (mean, sample std, delta to the
baseline, a significance mark at 2 standard errors, steps), missing and partial runs named, time to target
(interpolated first crossing, decayed endpoint between budgets, speedups), the compare and schedules
commands, and a resumable `budget.py ablate` sweep."""
import json
import math
import statistics

import pytest

import budget as budget_lib
from configurator import ConfigError
from conftest import run_script


def write_run(root, name, label, budget, seed, evals, steps=100, unit='rst', log=True):
    """A run folder as train.py leaves it: config.json, and log.jsonl with train and eval records.
    evals: [(rst, tokens, val_loss)]; the last eval is where the run stopped."""
    path = root / name
    path.mkdir(parents=True)
    config = {'label': label, 'budget': budget, 'budget_unit': unit, 'seed': seed, 'arch': 'full'}
    (path / 'config.json').write_text(json.dumps({'config': config, 'argv': []}))
    if log:
        records = []
        for i, (rst, tokens, loss) in enumerate(evals, 1):
            step = round(steps * i / len(evals))
            records.append({'step': step, 'train_loss': loss + 0.1, 'lr': 1e-3, 'rst': rst, 'tokens': tokens, 'iters': step})
            records.append({'step': step, 'val_loss': loss, 'rst': rst, 'tokens': tokens, 'iters': step})
        (path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def finished(root, name, label, budget, seed, final, steps=100):
    """A complete run at `budget` RST whose val loss falls linearly from final + 1 to final."""
    evals = [(budget * k / 4, 1000 * budget * k / 4, final + 1 - k / 4) for k in (1, 2, 3, 4)]
    return write_run(root, name, label, budget, seed, evals, steps)


def row(report, label, table=0):
    """The cells of `label`'s row in the report's table number `table` (0 = val loss, 1 = steps, 2 = target)."""
    rows = [l for l in report.splitlines() if l.startswith(f'| {label} |')]
    return [c.strip() for c in rows[table].strip('|').split('|')][1:]


# -----------------------------------------------------------------------------
# the method x budget table

@pytest.fixture
def table_runs(tmp_path):
    """Budget 10: baseline 3.00/3.02/3.04; 'better' 0.21 lower and tight (marked); 'noisy' 0.02 lower with
    std 0.1 (unmarked); 'edge_in' / 'edge_out' 2.90 and 2.65 standard errors away, either side of Welch's 95%
    quantile at df 4 (t = 2.776; the old "> 2 SE" rule marked both, p = 0.05-0.11). Budget 20: a baseline
    only. Plus an unreadable run, and a partial one whose loss must not enter the mean."""
    root = tmp_path / 'runs'
    finals = {'baseline': [3.00, 3.02, 3.04], 'better': [2.80, 2.81, 2.82], 'noisy': [2.90, 3.00, 3.10],
              'edge_in': [2.9526, 2.9726, 2.9926], 'edge_out': [3.0433, 3.0633, 3.0833]}
    dirs = [finished(root, f'{label}_s{seed}', label, 10.0, seed, final, steps=100 + 10 * seed)
            for label, values in finals.items() for seed, final in enumerate(values)]
    dirs.append(finished(root, 'baseline_b20', 'baseline', 20.0, 0, 2.5, steps=200))
    dirs.append(write_run(root, 'better_s9', 'better', 10.0, 9, [(2.0, 2000, 1.0), (5.0, 5000, 0.5)]))  # stopped at 5 of 10
    dirs.append(write_run(root, 'lost_s0', 'lost', 10.0, 0, [], log=False))                         # no log.jsonl
    return dirs, finals


def test_the_table(table_runs, tmp_path, monkeypatch):
    dirs, finals = table_runs
    monkeypatch.setattr(budget_lib, 'plot_runs', lambda groups, path: None)  # the plot has its own test
    report = budget_lib.compare(dirs, out=str(tmp_path / 'x'), target='none')
    assert (tmp_path / 'x.md').read_text() == report + '\n'
    assert report.splitlines()[0] == '| method | budget 10 | budget 20 |'
    base_mean, base_sd = 3.02, 0.02                               # sample std (n - 1): 0.02, not 0.0163
    assert row(report, 'baseline') == ['3.0200 ± 0.0200 (n=3)', '2.5000 ± 0.0000 (n=1)']
    for label, values in finals.items():
        if label == 'baseline':
            continue
        mean, sd = statistics.mean(values), statistics.stdev(values)
        se = math.sqrt(sd ** 2 / 3 + base_sd ** 2 / 3)
        marked = abs(mean - base_mean) > 2.776 * se  # equal variances, n = 3 each: Welch's df = 4
        assert marked == (label in ('better', 'edge_in')), (label, (mean - base_mean) / se)  # the fixture's intent
        want = f'{mean:.4f} ± {sd:.4f} (n=3) {mean - base_mean:+.4f}' + ('*' if marked else '')
        assert row(report, label) == [want, '—'], label
    assert row(report, 'better')[0] == '2.8100 ± 0.0100 (n=3) -0.2100*'   # the partial run (0.5) is left out
    assert row(report, 'noisy')[0] == '3.0000 ± 0.1000 (n=3) -0.0200'
    assert row(report, 'baseline', 1) == ['110', '200'] and row(report, 'better', 1) == ['110', '—']  # steps
    missing = report.split('missing or partial runs (left out of the means):\n')[1].splitlines()
    assert sorted(missing) == sorted([f'- {tmp_path}/runs/better_s9: budget not spent',
                                      f'- {tmp_path}/runs/lost_s0: unreadable (FileNotFoundError)'])


def test_no_significance_mark_with_a_single_seed(tmp_path):
    dirs = [finished(tmp_path, 'b', 'baseline', 10.0, 0, 3.0), finished(tmp_path, 'm', 'm', 10.0, 0, 2.0)]
    groups = budget_lib.group_runs([budget_lib.read_run(d) for d in dirs])
    assert row(budget_lib.ablation_table(groups), 'm') == ['2.0000 ± 0.0000 (n=1) -1.0000']   # no SE from one seed


# -----------------------------------------------------------------------------
# time to target

def test_crossing():
    pts = [(10, 4.0), (20, 3.0), (30, 2.0)]
    assert budget_lib.crossing(pts, 3.5) == pytest.approx(15.0)      # interpolated between the bracketing evals
    assert budget_lib.crossing(pts, 3.0) == 20                        # at an eval
    assert budget_lib.crossing(pts, 2.2) == pytest.approx(28.0)
    assert budget_lib.crossing(pts, 5.0) == 10                        # already below at the first eval
    assert budget_lib.crossing(pts, 1.9) is None                      # never
    assert budget_lib.crossing([(10, 4.0), (20, 2.0), (30, 3.5)], 3.0) == pytest.approx(15.0)  # the first time


@pytest.fixture
def target_runs(tmp_path):
    """Budgets 10 and 20 RST. Baseline (2 seeds at 20): finals 2.9 and 3.1, so target 'auto' = 3.0; only
    seed 0 reaches it, at 10 + 0.5/0.6 x 10 = 18.33 RST. 'fast' crosses 3.0 between its evals at 10 (3.1)
    and 15 (2.9): 12.5 RST, 1250 tokens. 'slow' never does. Decayed endpoints: baseline 3.4 at 10 and 3.0
    at 20 -> 20; fast 3.1 at 10 and 2.8 at 20 -> 13.33."""
    def run(name, label, budget, seed, evals):
        return write_run(tmp_path, name, label, budget, seed, [(r, 100 * r, loss) for r, loss in evals])
    return [run('b10', 'baseline', 10.0, 0, [(5, 3.8), (10, 3.4)]),
            run('b20s0', 'baseline', 20.0, 0, [(10, 3.5), (20, 2.9)]),
            run('b20s1', 'baseline', 20.0, 1, [(10, 3.5), (20, 3.1)]),
            run('f10', 'fast', 10.0, 0, [(5, 3.5), (10, 3.1)]),
            run('f20', 'fast', 20.0, 0, [(5, 3.6), (10, 3.1), (15, 2.9), (20, 2.8)]),
            run('s10', 'slow', 10.0, 0, [(10, 3.5)]),
            run('s20', 'slow', 20.0, 0, [(10, 3.4), (20, 3.2)])]


def test_time_to_target(target_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(budget_lib, 'plot_runs', lambda groups, path: None)
    report = budget_lib.compare(target_runs, out=str(tmp_path / 'x'))   # target='auto'
    assert 'target val loss 3.0000' in report
    base_first, fast_first = 10 + 0.5 / 0.6 * 10, 12.5
    base_end, fast_end = 20.0, 10 + 0.1 / 0.3 * 10
    assert row(report, 'baseline', 2) == [f'{base_first:.1f} ({base_first * 100:,.0f} tokens), 1/2', '1.00x',
                                          f'{base_end:.1f}', '1.00x']
    assert row(report, 'fast', 2) == [f'{fast_first:.1f} (1,250 tokens), 1/1', f'{base_first / fast_first:.2f}x',
                                      f'{fast_end:.1f}', f'{base_end / fast_end:.2f}x']
    assert row(report, 'fast', 2)[1] == '1.47x' and row(report, 'fast', 2)[3] == '1.50x'
    assert row(report, 'slow', 2) == ['not reached, 0/1', '—', 'not reached', '—']
    explicit = budget_lib.compare(target_runs, out=str(tmp_path / 'y'), target='3.45')
    assert 'target val loss 3.4500' in explicit
    # baseline seeds cross 3.45 at 10 + 0.05/0.6 x 10 and 10 + 0.05/0.4 x 10; its 10-RST run ends at 3.4 <= 3.45
    first = statistics.mean([10 + 0.05 / 0.6 * 10, 10 + 0.05 / 0.4 * 10])
    assert row(explicit, 'baseline', 2)[0] == f'{first:.1f} ({first * 100:,.0f} tokens), 2/2'
    assert row(explicit, 'baseline', 2)[2] == '10.0'
    # slow: its first eval (3.4 at 10 RST) is already below; endpoints 3.5 at 10 and 3.2 at 20 -> 11.67
    assert row(explicit, 'slow', 2) == ['10.0 (1,000 tokens), 1/1', f'{first / 10:.2f}x', '11.7', f'{10 / (10 + 0.05 / 0.3 * 10):.2f}x']


# -----------------------------------------------------------------------------
# the commands

def test_compare_command(target_runs, tmp_path):
    out = run_script('budget.py', 'compare', *target_runs, f'--out={tmp_path}/x')
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / 'x.md').read_text()
    assert md.startswith('| method | budget 10 | budget 20 |') and md.strip() in out.stdout
    assert (tmp_path / 'x.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'   # matplotlib is installed here and in CI


def test_compare_without_run_folders_exits_2_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        budget_lib.main(['compare', f'--out={tmp_path}/x'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'compare needs run folders' in err
    assert not (tmp_path / 'x.md').exists()


def test_schedules_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                         # it writes schedules.png here
    budget_lib.main(['schedules', '--warmup_frac=0.0'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['p', *budget_lib.SCHEDULES] and set(budget_lib.SCHEDULES) >= {'cosine', 'wsd', 'rex'}
    table = {float(l.split()[0]): [float(v) for v in l.split()[1:]] for l in lines[1:12]}
    col = {name: i for i, name in enumerate(budget_lib.SCHEDULES)}
    assert table[0.5][col['onecycle']] == 1.0 and table[0.5][col['rex']] == pytest.approx(2 / 3, abs=5e-4)
    assert table[0.9][col['wsd']] == pytest.approx(1 - math.sqrt(0.5), abs=5e-4)
    assert all(v == 0 for v in table[1.0])
    assert (tmp_path / 'schedules.png').exists()


# -----------------------------------------------------------------------------
# the sweep

SWEEP = '''
COMMON = dict(model='tiny', batch_size=8, compile_loss=False, budget_unit='iters', eval_interval=3,
              eval_batches=2, log_interval=1, sample_tokens=0, peak_flops=1e12, lr=3e-3)
BUDGETS = (6.0, 12.0)
QUICK_BUDGETS = (6.0,)
METHODS = {
    'baseline': ('train.py', dict()),
    'stack': ('train.py', dict(arch='stack', n_layer=2, stack_fracs=(0.5,))),
    'lion': ('train.py', dict(optimizer='lion', lr=3e-4)),
}
'''


def test_sweep_plan_and_commands(tmp_path):
    (tmp_path / 'sweep.py').write_text(SWEEP)
    cfg = budget_lib.AblateConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'abl'),
                                  methods=('baseline', 'stack'), seeds=(0, 1))
    plan = budget_lib.sweep_plan(cfg)
    assert [(label, a['budget'], a['seed']) for label, _, a in plan] == [
        ('baseline', 6.0, 0), ('stack', 6.0, 0), ('baseline', 12.0, 0), ('stack', 12.0, 0),
        ('baseline', 6.0, 1), ('stack', 6.0, 1), ('baseline', 12.0, 1), ('stack', 12.0, 1)]
    label, script, args = plan[1]
    assert script == 'train.py' and args['arch'] == 'stack' and args['model'] == 'tiny' and args['label'] == 'stack'
    assert args['out_dir'] == f'{tmp_path}/abl/stack/b6/s0'
    quick = budget_lib.sweep_plan(budget_lib.AblateConfig(config=cfg.config, out_dir=cfg.out_dir, quick=True))
    assert [(label, a['budget'], a['seed']) for label, _, a in quick] == [('baseline', 6.0, 0), ('stack', 6.0, 0), ('lion', 6.0, 0)]
    wsd = budget_lib.sweep_plan(budget_lib.AblateConfig(config=cfg.config, out_dir=cfg.out_dir, methods=('baseline',),
                                                        seeds=(0,), baseline_schedule='wsd_branches'))
    assert wsd[-1][2]['branch_budgets'] == (1.0, 2.0) and wsd[-1][2]['budget'] == 6.0
    with pytest.raises(ConfigError, match='unknown method'):
        budget_lib.sweep_plan(budget_lib.AblateConfig(config=cfg.config, methods=('stak',)))

    cmd = budget_lib.run_command(script, args)                          # a fresh run replaces a stale folder
    assert cmd[1] == 'train.py' and "--arch='stack'" in cmd and '--stack_fracs=(0.5,)' in cmd and '--overwrite=True' in cmd
    (tmp_path / 'abl' / 'stack' / 'b6' / 's0').mkdir(parents=True)
    (tmp_path / 'abl' / 'stack' / 'b6' / 's0' / 'ckpt.pt').write_bytes(b'')
    resume = budget_lib.run_command(script, args)                       # a started run resumes
    assert "--init_from='resume'" in resume and not any(a.startswith('--overwrite') for a in resume)


def test_ablate_runs_the_sweep_once(tmp_path, monkeypatch, capsys):
    """`budget.py ablate` (its main, in this process; every run is a `python train.py` of its own) on a
    2-run tiny sweep; a second call finds both runs finished and only re-reads them."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    monkeypatch.setattr(budget_lib, 'plot_runs', lambda groups, path: None)   # test_compare_command plots
    budget_lib.main(['ablate', f'--config={tmp_path}/sweep.py', f'--out_dir={tmp_path}/abl', '--quick=True',
                     "--methods=('baseline','stack')"])
    out = capsys.readouterr().out
    progress = [l for l in out.splitlines() if l.startswith('[')]
    assert len(progress) == 2 and progress[0].startswith('[1/2] baseline budget 6 seed 0: done: 6 steps'), out
    assert progress[1].startswith('[2/2] stack budget 6 seed 0: done: 6 steps'), out
    first = (tmp_path / 'abl' / 'ablation.md').read_text()
    assert first.strip() in out and '(n=1)' in row(first, 'baseline')[0] and '(n=1)' in row(first, 'stack')[0]
    layers = [json.loads(l).get('active_layers') for l in (tmp_path / 'abl/stack/b6/s0/log.jsonl').read_text().splitlines()]
    assert [d for d in layers if d is not None] == [1, 1, 1, 2, 2, 2]    # the method's own overrides reached it
    assert row(first, 'baseline', 1) == ['6'] and row(first, 'stack', 1) == ['6']
    assert 'missing' not in first

    def no_rerun(*args, **kwargs):
        raise AssertionError(f'ablate reran a finished run: {args[0]}')
    monkeypatch.setattr(budget_lib.subprocess, 'run', no_rerun)
    again = budget_lib.ablate(budget_lib.AblateConfig(config=f'{tmp_path}/sweep.py', out_dir=f'{tmp_path}/abl',
                                                      quick=True, methods=('baseline', 'stack')))
    assert again + '\n' == first == (tmp_path / 'abl' / 'ablation.md').read_text()
