"""The No Train No Gain protocol's tuning record: a row whose grid moves another lr key (Muon's muon_lr),
tuned.json sealed by a sha256 of its content (a hand edit is refused, not run), and rows added to a sweep
file since a tuning kept with it. The runs are stubbed on a known loss landscape, as in test_compare."""
import dataclasses
import json
import math

import pytest

import runs
from configurator import ConfigError, UserError
from studies import lr_check, ntng

SWEEP = '''
COMMON = dict(model='tiny', batch_size=8, compile_loss=False, budget_unit='iters', eval_interval=3,
              eval_batches=2, log_interval=1, sample_tokens=0, lr=3e-3)
BUDGETS = (6.0, 12.0)
QUICK_BUDGETS = (6.0,)
METHODS = {
    'baseline': ('train.py', dict()),
    'muon': ('train.py', dict(optimizer='muon', muon_lr=0.02)),
}
LR_KEY = {'muon': 'muon_lr'}
'''
OPTIMUM = {'baseline': 3e-3 * 2, 'muon': 0.02 / 2}


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """Tune both rows on final = log2(lr / optimum)^2 and return (tuned.json's path, the planned runs)."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    plans = []
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: plans.extend(plan))
    monkeypatch.setattr(ntng, 'tune_summary', lambda folder, seeds, lr, extra: {
        'lr': lr, 'extra': extra, 'final': math.log2(lr / OPTIMUM[folder.parent.name]) ** 2})
    monkeypatch.setattr(ntng, 'plot_tuning', lambda results, path: None)
    ntng.tune(ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'), methods=('',), seeds=(7,)))
    return tmp_path / 'tune' / 'tuned.json', plans


def test_muon_grid_moves_muon_lr_and_keeps_adamw_parts_at_common_lr(tuned, tmp_path):
    path, plans = tuned
    muon = [r.args for r in plans if r.args['label'] == 'muon (tuning)']
    assert sorted(a['muon_lr'] for a in muon) == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08])
    assert {a['lr'] for a in muon} == {3e-3}  # AdamW's part (embeddings, head, gains): COMMON's lr, stated
    record = json.loads(path.read_text())['tuned']['muon']
    assert record['muon_lr'] == pytest.approx(0.01) and record['lr_key'] == 'muon_lr' and 'lr' not in record
    plan = ntng.sweep_plan(ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), tuned=str(path), seeds=(0,)))
    runs = {r.args['label']: r.args for r in plan if r.args['budget'] == 6.0}
    assert runs['muon']['muon_lr'] == pytest.approx(0.01) and runs['muon']['lr'] == 3e-3 and 'lr_key' not in runs['muon']
    assert runs['baseline']['lr'] == pytest.approx(6e-3)
    assert '**0.01: 0.0000**' in ntng.tuning_table(path)  # the chosen muon_lr in bold


@pytest.mark.parametrize('edit', ['relabel a row', 'move an lr', 'drop the sha256'])
def test_an_edited_tuned_json_is_refused_until_sealed_by_hand(tuned, tmp_path, edit, capsys):
    path, _ = tuned
    record = json.loads(path.read_text())
    if edit == 'relabel a row':
        record['tuned'] = {'baseline': record['tuned']['muon'], 'muon': record['tuned']['baseline']}
    elif edit == 'move an lr':
        record['tuned']['baseline']['lr'] = 0.5
    else:
        del record['sha256']
    path.write_text(json.dumps(record))
    says = 'carries no sha256' if edit == 'drop the sha256' else 'was edited after tune wrote it'
    with pytest.raises(UserError, match=says):
        ntng.sweep_plan(ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), tuned=str(path), seeds=(0,)))
    with pytest.raises(UserError, match=says):  # tune refuses to extend it too
        ntng.tune(ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'), methods=('baseline',), seeds=(7,)))
    ntng.main(['seal', str(path)])
    assert 'sealed' in capsys.readouterr().out
    ntng.sweep_plan(ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), tuned=str(path), seeds=(0,)))  # the user's edit, sealed


def test_seal_refuses_what_is_not_a_tuned_json(tmp_path, capsys):
    for text in ('[1]', '{"tuned": {"baseline": {"lr": -1}}, "methods": {}}', '{"trunc'):
        (tmp_path / 't.json').write_text(text)
        with pytest.raises(SystemExit) as e:
            ntng.main(['seal', str(tmp_path / 't.json')])
        assert e.value.code == 2 and 'is not a tuned.json' in capsys.readouterr().err
        assert (tmp_path / 't.json').read_text() == text
    with pytest.raises(SystemExit) as e:
        ntng.main(['seal'])
    assert e.value.code == 2


def tune_lion(tmp_path, lion_args="lr=3e-4"):
    """Add a Lion row to the sweep file and tune it beside the tuned rows -> the sweep file's path."""
    sweep = tmp_path / 'sweep.py'
    sweep.write_text(SWEEP.replace("LR_KEY", f"METHODS['lion'] = ('train.py', dict(optimizer='lion', {lion_args}))\nLR_KEY"))
    OPTIMUM['lion'] = 3e-4
    ntng.tune(ntng.TuneConfig(config=str(sweep), out_dir=str(tmp_path / 'tune'), methods=('lion',), seeds=(7,)))
    return sweep


def test_rows_added_to_the_sweep_file_keep_the_tuning_a_changed_row_does_not(tuned, tmp_path, monkeypatch):
    path, _ = tuned
    sweep = tune_lion(tmp_path)
    assert set(json.loads(path.read_text())['tuned']) == {'baseline', 'muon', 'lion'}
    sweep.write_text(SWEEP.replace('muon_lr=0.02)', 'muon_lr=0.02, muon_momentum=0.9)'))
    with pytest.raises(ConfigError, match=r"METHODS\['muon'\]"):
        ntng.tune(ntng.TuneConfig(config=str(sweep), out_dir=str(tmp_path / 'tune'), methods=('baseline',), seeds=(7,)))
    with pytest.raises(ConfigError, match="LR_KEY must be"):
        sweep.write_text(SWEEP.replace("LR_KEY = {'muon': 'muon_lr'}", "LR_KEY = {'muon': 'momentum'}"))
        ntng.read_sweep(str(sweep))


def test_nproc_runs_every_planned_run_under_torchrun(tmp_path):
    (tmp_path / 'sweep.py').write_text(SWEEP)
    plan = ntng.sweep_plan(ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), seeds=(0,), nproc=2))
    assert plan and all(r.nproc == 2 for r in plan)
    assert all('--nproc_per_node=2' in ' '.join(r.command()) for r in plan)
    assert all(r.nproc == 1 for r in ntng.sweep_plan(ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), seeds=(0,))))


def test_lr_check_runs_each_tuned_lr_times_each_factor_at_the_largest_budget_on_the_tuning_seed(tuned, tmp_path, monkeypatch):
    path, _ = tuned
    sweep = tune_lion(tmp_path, 'lr=3e-4, weight_decay=0.5')
    planned = []
    monkeypatch.setattr(lr_check, 'run_plan', lambda plan, jobs, **kw: planned.extend(plan))
    out = tmp_path / 'check'
    ntng.main(['lr_check', str(sweep), f'--tuned={path}', f'--out_dir={out}'])
    runs = {(r.args['label'], r.out_dir.parent.name): r.args for r in planned}
    assert sorted(runs) == [(row, f'x{f}') for row in ('baseline', 'lion', 'muon') for f in ('0.5', '1', '2')]
    assert all(a['budget'] == 12.0 and a['seed'] == 7 and a['out_dir'].endswith('/s7') for a in runs.values())  # tuning's seed
    assert [runs['baseline', x]['lr'] for x in ('x0.5', 'x1', 'x2')] == pytest.approx([3e-3, 6e-3, 1.2e-2])
    assert [runs['muon', x]['muon_lr'] for x in ('x0.5', 'x1', 'x2')] == pytest.approx([0.005, 0.01, 0.02])
    assert {runs['muon', x]['lr'] for x in ('x0.5', 'x1', 'x2')} == {3e-3}  # its AdamW part stays at COMMON's lr
    lion = [runs['lion', x] for x in ('x0.5', 'x1', 'x2')]
    assert [a['lr'] * a['weight_decay'] for a in lion] == pytest.approx([3e-4 * 0.5] * 3)  # wd follows lr, as in tuning
    assert '| row | budget | seed | lr x0.5 | lr x1 (tuned) | lr x2 |' in (out / 'lr_check.md').read_text()
    with pytest.raises(SystemExit):  # a repeated factor is refused before any run
        ntng.main(['lr_check', str(sweep), f'--tuned={path}', '--factors=(1.0,1.0)'])


def test_a_target_declared_in_the_sweep_file_is_the_sweep_s_time_to_target(tmp_path):
    sweep = tmp_path / 'sweep.py'
    sweep.write_text(SWEEP)
    assert ntng.sweep_target(ntng.AblateConfig(config=str(sweep))) == 'auto'  # none declared: compare's default
    sweep.write_text(SWEEP + 'TARGET = 2.5\n')
    assert ntng.sweep_target(ntng.AblateConfig(config=str(sweep))) == '2.5'
    assert ntng.sweep_target(ntng.AblateConfig(config=str(sweep), target='3.0')) == '3.0'  # the command line wins
    for bad in ('-1.0', "'low'", 'float("inf")'):
        sweep.write_text(SWEEP + f'TARGET = {bad}\n')
        with pytest.raises(ConfigError, match='TARGET must be a positive number'):
            ntng.sweep_target(ntng.AblateConfig(config=str(sweep)))


def test_a_sweep_charged_under_a_second_reference_system_is_one_command(tuned, tmp_path):
    path, _ = tuned
    table = tmp_path / 'h200' / 'table.json'
    table.parent.mkdir()
    table.write_text('{}')  # read by the runs (budget.load_table checks it); the plan only names it
    plan = ntng.sweep_plan(ntng.AblateConfig(config=str(tmp_path / 'sweep.py'), tuned=str(path), seeds=(0,),
                                             rst_table=str(table), baseline_schedule='wsd_branches'))
    assert plan and all(r.args['rst_table'] == str(table) for r in plan)
    with pytest.raises(ConfigError, match='--rst_table=.* not found'):
        ntng.AblateConfig(rst_table=str(tmp_path / 'none.json'))


def test_the_lr_check_table_reads_each_factor_and_all_of_val_where_scored(tmp_path):
    from test_compare import finished, write_run
    finals = {('baseline', 0.5): 1.30, ('baseline', 1.0): 1.20, ('baseline', 2.0): 1.10, ('baseline', 4.0): 1.15,
              ('stack', 0.5): 1.25, ('stack', 1.0): 1.18, ('stack', 2.0): 1.19}
    for (row, f), final in finals.items():
        run = finished(tmp_path, f'{row}/x{f:g}/s1000', row, 480.0, 1000, final)
        if row == 'baseline':  # scored on all of val, where x1 is best
            all_val = final - 0.02 + (0.2 if f == 2.0 else 0.0)
            logged = runs.read_run(run)['final']
            (run / 'final_all_val.json').write_text(json.dumps({'val_loss': all_val, 'logged_final': logged, 'windows': 9}))
    finished(tmp_path, 'sb/x0.5/s1000', 'sb', 480.0, 1000, 1.4)
    finished(tmp_path, 'stack/x1/s1000_il', 'rho_il', 480.0, 1000, 1.0)  # an IL model's folder: not a row
    diverged = write_run(tmp_path, 'lion/x2/s1000', 'lion', 480.0, 1000, [(100.0, 1e5, 3.0)])
    with open(diverged / 'log.jsonl', 'a') as f:
        f.write(json.dumps({'step': 101, 'nonfinite': True, 'rst': 101.0}) + '\n')
    for f, final in ((0.5, 1.3), (1.0, 1.25)):
        finished(tmp_path, f'lion/x{f:g}/s1000', 'lion', 480.0, 1000, final)
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[4:9]]
            for line in lr_check.lr_check_table(tmp_path).splitlines() if line.startswith('| ') and '---' not in line}
    assert rows['baseline'] == ['1.3000 (1.2800)', '1.2000 (1.1800)', '1.1000 (1.2800)', 'no: x2 (all of val: yes)', 'x4: 1.1500 (1.1300)']
    assert rows['stack'] == ['1.2500', '1.1800', '1.1900', 'yes', '—']
    assert rows['sb'] == ['1.4000', 'pending', 'pending', 'pending', '—']
    assert rows['lion'] == ['1.3000', '1.2500', 'diverged', 'yes', '—'] and 'rho_il' not in rows


def test_a_sweep_under_another_cost_table_never_replaces_a_folder_s_runs(tmp_path):
    from test_compare import finished
    run = finished(tmp_path / 'ablation', 'stack/b6/s0', 'stack', 6.0, 0, 2.0)
    info = json.loads((run / 'config.json').read_text())
    (run / 'config.json').write_text(json.dumps({**info, 'config': {**info['config'], 'rst_table': ''}}))
    ntng.check_one_system(tmp_path / 'ablation', '')  # the same system: resumed, not replaced
    with pytest.raises(UserError, match='holds runs charged under the default cost table .*give another --out_dir'):
        ntng.check_one_system(tmp_path / 'ablation', 'config/rst/h200/t.json')


def test_two_tunes_into_one_folder_keep_both_tunings(tmp_path, monkeypatch):
    """Tune A (the baseline) runs; meanwhile tune B (Muon) runs and writes tuned.json; A writes last. A re-reads
    the file under its lock when it writes, so B's row stays (not A's view of the file from before its runs)."""
    (tmp_path / 'sweep.py').write_text(SWEEP)
    monkeypatch.setattr(ntng, 'tune_summary', lambda folder, seeds, lr, extra: {
        'lr': lr, 'extra': extra, 'final': math.log2(lr / OPTIMUM[folder.parent.name]) ** 2})
    monkeypatch.setattr(ntng, 'plot_tuning', lambda results, path: None)
    cfg = ntng.TuneConfig(config=str(tmp_path / 'sweep.py'), out_dir=str(tmp_path / 'tune'), seeds=(7,))
    interleaved = []

    def runs_of_a_while_b_tunes(plan, jobs, **kw):
        if not interleaved:
            interleaved.append(True)
            ntng.tune(dataclasses.replace(cfg, methods=('muon',)))  # B, from start to end, inside A's runs
    monkeypatch.setattr(ntng, 'run_plan', runs_of_a_while_b_tunes)
    ntng.tune(dataclasses.replace(cfg, methods=('baseline',)))
    record = json.loads((tmp_path / 'tune' / 'tuned.json').read_text())
    assert set(record['tuned']) == {'baseline', 'muon'} and record == ntng.sealed(record)
    assert record['tuned']['muon']['muon_lr'] == pytest.approx(0.01) and record['tuned']['baseline']['lr'] == pytest.approx(6e-3)
    assert not (tmp_path / 'tune' / '.tuned.json.lock').exists()


def test_a_tuned_json_write_waits_for_the_lock_another_tune_holds(tmp_path, capsys):
    """write_tuned takes tuned.json's lock (waiting while another tune holds it), not the file as it was."""
    import threading
    from data.loader import FolderLock
    (tmp_path / 'sweep.py').write_text(SWEEP)
    spec, path = ntng.read_sweep(str(tmp_path / 'sweep.py')), tmp_path / 'tuned.json'
    record = {'config': str(tmp_path / 'sweep.py'), 'common': repr(spec['COMMON']), 'budget': 6.0, 'seeds': [7],
              'methods': {k: repr(v) for k, v in spec['METHODS'].items()}, 'tuned': {}}
    other = FolderLock(tmp_path / '.tuned.json.lock', lambda pid: UserError(f'held by {pid}')).acquire()  # another tune's
    writer = threading.Thread(target=ntng.write_tuned, args=(path, record, {'baseline': {'lr': 1e-3}}, None))
    writer.start()
    writer.join(timeout=1.0)
    assert writer.is_alive() and not path.exists()  # waiting for the lock
    path.write_text(json.dumps(ntng.sealed({**record, 'tuned': {'muon': {'muon_lr': 0.01, 'lr_key': 'muon_lr'}}})))
    other.release()
    writer.join(timeout=10.0)
    assert set(json.loads(path.read_text())['tuned']) == {'baseline', 'muon'}
    assert 'waiting for it' in capsys.readouterr().err


@pytest.mark.parametrize('edit, says', [
    (lambda r: r['tuned']['baseline'].update(lr=math.inf), 'tuned.baseline.lr=inf is not a positive number'),
    (lambda r: r['tuned']['baseline'].update(lr=True), 'tuned.baseline.lr=True is not a positive number'),
    (lambda r: r['tuned']['baseline'].update(weight_decay='x'), "tuned.baseline.weight_decay='x' is not a number >= 0"),
    (lambda r: r['tuned']['baseline'].update(lrr=1e-3), 'tuned.baseline.lrr is not a key tune writes for baseline'),
    (lambda r: r['tuned']['muon'].update(lr=1e-3), 'tuned.muon.lr is not a key tune writes for muon'),
    (lambda r: r['tuned']['muon'].pop('muon_lr'), 'tuned.muon.muon_lr is missing'),
    (lambda r: r.update(budget='6'), "budget='6' is not a positive number"),
    (lambda r: r.update(il={'il_out_dir': 'x', 'il_cache': 'y'}), 'il.il_budget is missing'),
    (lambda r: r.update(il={'il_out_dir': 'x', 'il_cache': 'y', 'il_budget': 12.0}) or r['tuned']['baseline'].update(lr=-1),
     'tuned.baseline.lr=-1 is not a positive number'),
])
def test_a_tuned_json_s_fields_are_checked_when_it_is_read_before_any_run(tuned, tmp_path, monkeypatch, capsys, edit, says):
    """A value a run would refuse only in its own process, after its folder exists, is named (field and fix) when
    --tuned is read: one line, exit 2, no run folder made. (Sealed after the edit: the seal is checked separately.)"""
    path, _ = tuned
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(ntng.sealed(record)))
    monkeypatch.setattr(ntng, 'run_plan', lambda plan, jobs, **kw: pytest.fail('ran before refusing'))
    with pytest.raises(SystemExit) as e:
        ntng.main(['ablate', str(tmp_path / 'sweep.py'), f'--tuned={path}', f'--out_dir={tmp_path}/abl', '--seeds=(0,)'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and says in err[0] and 'seal it (python -m studies.ntng seal' in err[0], err
    assert not (tmp_path / 'abl').exists()


@pytest.mark.parametrize('make, says', [(None, 'not found: give the tuned.json that `python -m studies.ntng tune` wrote'),
                                        ('{"trunc', 'is not a JSON file (JSONDecodeError)')])
def test_a_tuned_json_missing_or_not_json_is_one_line_with_the_fix(tmp_path, capsys, make, says):
    (tmp_path / 'sweep.py').write_text(SWEEP)
    if make:
        (tmp_path / 'tuned.json').write_text(make)
    with pytest.raises(SystemExit) as e:
        ntng.main(['ablate', str(tmp_path / 'sweep.py'), f'--tuned={tmp_path}/tuned.json', f'--out_dir={tmp_path}/abl'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f'error: --tuned={tmp_path}/tuned.json {says}'), err
    assert not (tmp_path / 'abl').exists()


def test_an_lr_check_row_is_one_seed_and_budget_and_a_cell_one_run(tmp_path):
    """A check on seed 5, then x1 on seed 6 into the same folder: each seed is a row of its own (seed 6's x0.5 and
    x2 pending), never seed 6's x1 in seed 5's row; two runs of one cell (x1 beside x1.0) or a row whose runs
    differ in a key other than the lr are refused, naming them."""
    from test_compare import edit_config, finished
    for f, final in ((0.5, 1.3), (1.0, 1.2), (2.0, 1.25)):
        edit_config(finished(tmp_path, f'baseline/x{f:g}/s5', 'baseline', 480.0, 5, final), lr=3e-3 * f, batch_size=8)
    edit_config(finished(tmp_path, 'baseline/x1/s6', 'baseline', 480.0, 6, 1.1), lr=3e-3, batch_size=8)
    lines = [[c.strip() for c in line.split('|')[1:9]] for line in lr_check.lr_check_table(tmp_path).splitlines()
             if line.startswith('| baseline')]
    assert lines == [['baseline', '480', '5', '1.3000', '1.2000', '1.2500', 'yes', '—'],
                     ['baseline', '480', '6', 'pending', '1.1000', 'pending', 'pending', '—']]
    edit_config(tmp_path / 'baseline' / 'x2' / 's5', batch_size=16)
    with pytest.raises(UserError, match=r'are both baseline at budget 480 but were run with other --batch_size \(8, 16\)'):
        lr_check.lr_check_table(tmp_path)
    edit_config(tmp_path / 'baseline' / 'x2' / 's5', batch_size=8)
    finished(tmp_path, 'baseline/x1.0/s5', 'baseline', 480.0, 5, 1.0)
    with pytest.raises(UserError, match=f'{tmp_path}/baseline/x1/s5 and {tmp_path}/baseline/x1.0/s5 are both baseline lr x1 '
                                        'at budget 480 seed 5: a cell takes one run'):
        lr_check.lr_check_table(tmp_path)
