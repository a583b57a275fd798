"""budget: schedules at closed-form points; every unit stops a real run at its budget with the LR at min_lr;
RST is charged exactly from the table; calibrate writes a usable table, and replaces or extends a saved one
only when asked; the CPU peak behind MFU is measured once, cached and only raised."""
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import budget as budget_lib
import calibrate
import runs
import train
from configurator import UserError, cli
from conftest import ROOT, run_script
from train import TrainConfig

TINY_TABLE = json.loads((ROOT / 'config' / 'rst' / 'gpt_L2_H2_D64_T64_V256_B8.json').read_text())
TOKENS_PER_STEP = 8 * 64                         # tiny: batch 8 x block 64
C, T, V, L = 64, 64, 256, 2                      # tiny on the byte corpus
FLOPS_PER_TOKEN = 6 * (L * (12 * C * C + 13 * C) + V * C + 2 * C) + 12 * L * C * T  # nanoGPT's 6N (N: blocks, wte, ln_f) + attention


def lr(p, total=1000.0, **kw):
    cfg = TrainConfig(**{'lr': 1.0, 'min_lr': 0.0, 'warmup_frac': 0.0, **kw})
    return budget_lib.lr_at(p * total, total, cfg)


@pytest.mark.parametrize('schedule', ['cosine', 'linear'])
def test_cosine_and_linear(schedule):
    kw = dict(schedule=schedule, warmup_frac=0.1, min_lr=0.1)
    assert lr(0.0, **kw) == 0.0 and lr(0.05, **kw) == pytest.approx(0.5)   # linear warm-up from 0
    assert lr(0.1, **kw) == pytest.approx(1.0)                              # the peak at warm-up's end
    assert lr(0.55, **kw) == pytest.approx(0.55)                            # half-way down to min_lr
    assert lr(1.0, **kw) == 0.1 and lr(1.2, **kw) == 0.1                    # exactly min_lr at p = 1
    quarter = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi / 4)) if schedule == 'cosine' else 0.75)
    assert lr(0.1 + 0.9 / 4, **kw) == pytest.approx(quarter)


def test_onecycle():
    kw = dict(schedule='onecycle', min_lr=0.2, warmup_frac=0.3)  # its rise is always half the budget
    assert lr(0.25, **kw) == pytest.approx(0.5) and lr(0.5, **kw) == pytest.approx(1.0)
    assert lr(0.75, **kw) == pytest.approx(0.6) and lr(1.0, **kw) == pytest.approx(0.2)


@pytest.mark.parametrize('shape, at_quarter', [('1-sqrt', 0.5), ('linear', 0.75)])
def test_wsd(shape, at_quarter):
    kw = dict(schedule='wsd', warmup_frac=0.1, cooldown_frac=0.2, cooldown_shape=shape)
    assert [lr(p, **kw) for p in (0.1, 0.3, 0.6, 0.8)] == pytest.approx([1.0] * 4)   # the plateau
    assert lr(0.85, **kw) == pytest.approx(at_quarter)           # x = 0.25 into the cooldown
    assert lr(1.0, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr(0.85, min_lr=0.2, **kw) == pytest.approx(0.2 + 0.8 * at_quarter)


def test_rex():
    assert lr(0.5, schedule='rex') == pytest.approx(2 / 3)
    assert lr(0.0, schedule='rex') == 1.0 and lr(1.0, schedule='rex') == pytest.approx(0.0, abs=1e-12)
    assert lr(0.5, schedule='rex', min_lr=0.4) == pytest.approx(0.4 + 0.6 * 2 / 3)


@pytest.mark.parametrize('schedule', list(budget_lib.SCHEDULES))
def test_no_schedule_leaves_min_lr_and_peak_after_warm_up(schedule):
    cfg = TrainConfig(schedule=schedule, lr=1.0, min_lr=0.2, warmup_frac=0.05)
    warm = 0.5 if schedule == 'onecycle' else 0.05
    ps = np.linspace(0, 1, 2001)
    lrs = np.array([budget_lib.lr_at(p * 1000, 1000.0, cfg) for p in ps])
    after = lrs[ps >= warm]
    assert after.min() >= 0.2 - 1e-12 and after.max() <= 1.0 + 1e-12
    assert (np.diff(after) <= 1e-12).all()                        # never rises after the warm-up
    assert (np.diff(lrs[ps < warm]) >= 0).all() and lrs[-1] == pytest.approx(0.2, abs=1e-12)


def test_warmup_units_are_the_same_for_every_budget():
    for total in (100.0, 1000.0):
        cfg = TrainConfig(lr=1.0, warmup_units=10.0, budget=total)
        assert budget_lib.lr_at(5.0, total, cfg) == pytest.approx(0.5)
        assert budget_lib.lr_at(10.0, total, cfg) == pytest.approx(1.0)


def test_budget_charges_from_the_table():
    b = budget_lib.Budget('rst', 1.0, TINY_TABLE, lambda n: 1000 * n, 64, 8)
    b.charge_train(16, 2)           # two micro-batches' worth at 2 layers
    b.charge_forward(4, 1)          # half a micro-batch of scoring at 1 layer
    b.charge_optimizer('lion')
    b.charge_hessian('sophiag', 8, 2)  # one micro-batch's estimate: sampling pass + fwd+bwd
    want = 2 * TINY_TABLE['fwd_bwd']['2'] + 0.5 * TINY_TABLE['fwd']['1'] + TINY_TABLE['optimizer']['lion'] \
        + TINY_TABLE['hessian']['sophiag']
    assert b.spent['rst'] == pytest.approx(want, rel=1e-12)
    assert b.spent['tokens'] == 16 * 64 and b.spent['iters'] == 1 and b.spent['scored_examples'] == 4
    assert b.spent['flops'] == pytest.approx(16 * 64 * 2000 + 4 * 64 * 1000 / 3 + 4 / 3 * 8 * 64 * 2000)
    assert b.progress == pytest.approx(want) and not b.done
    c = budget_lib.Budget('rst', 1.0, TINY_TABLE, lambda n: 1000 * n, 64, 8)
    c.load_state_dict(b.state_dict())
    assert c.spent == b.spent
    with pytest.raises(UserError):
        budget_lib.Budget('steps', 1.0, None, None, 64, 8)


# -----------------------------------------------------------------------------
# real runs, one per unit

def train_records(out_dir):
    lines = [json.loads(l) for l in (out_dir / 'log.jsonl').read_text().splitlines()]
    return [r for r in lines if 'train_loss' in r], [r for r in lines if 'val_loss' in r]


RST_STEP = TINY_TABLE['fwd_bwd']['2'] * (8 / 8) + TINY_TABLE['optimizer']['adamw']
UNITS = {  # unit: (budget, cost of one step or None when measured)
    'iters': (12, 1.0),
    'tokens': (10_000, float(TOKENS_PER_STEP)),
    'flops': (15.5 * TOKENS_PER_STEP * FLOPS_PER_TOKEN, float(TOKENS_PER_STEP * FLOPS_PER_TOKEN)),
    'rst': (0.1, RST_STEP),
    'wall': (0.4, None),
}


@pytest.mark.parametrize('unit', list(UNITS))
def test_run_stops_at_the_budget_with_lr_at_min_lr(tiny_cfg, unit):
    total, step_cost = UNITS[unit]
    cfg = tiny_cfg(budget_unit=unit, budget=total, lr=2e-3, min_lr=1e-4, warmup_frac=0.1)
    result = train.train(cfg)
    records, evals = train_records(Path(cfg.out_dir))
    assert len(records) == result['steps'] >= 2 and [r['step'] for r in records] == list(range(1, len(records) + 1))
    before, last = records[-2][unit], records[-1][unit]
    assert before < total <= last, (before, total, last)         # stopped at the first step past the budget
    if step_cost is not None:
        assert last - before == pytest.approx(step_cost, rel=1e-9)
        assert result['steps'] == math.ceil(total / step_cost - 1e-9)
    # the last step ran at the LR of its middle (wall: the previous step's time stands in for its own)
    if unit != 'wall':
        assert records[-1]['lr'] == budget_lib.lr_at((before + last) / 2, total, cfg)
    assert budget_lib.lr_at(total, total, cfg) == pytest.approx(cfg.min_lr, abs=1e-12)
    assert cfg.min_lr <= records[-1]['lr'] <= budget_lib.lr_at(total - (last - before), total, cfg)
    assert evals[-1]['step'] == result['steps'] and evals[-1][unit] == last
    for other in ('iters', 'tokens', 'flops'):                    # every unit is counted on every run
        per_step = {'iters': 1, 'tokens': TOKENS_PER_STEP, 'flops': TOKENS_PER_STEP * FLOPS_PER_TOKEN}[other]
        assert records[-1][other] == pytest.approx(result['steps'] * per_step, rel=1e-12)


def test_rst_is_the_sum_of_the_table_charges_and_deterministic(tiny_cfg, tmp_path):
    spent = []
    for run in ('a', 'b'):
        cfg = tiny_cfg(budget_unit='rst', budget=0.1, out_dir=str(tmp_path / run))
        train.train(cfg)
        records, _ = train_records(tmp_path / run)
        want, acc = [], 0.0
        for _ in records:
            acc += TINY_TABLE['fwd_bwd']['2'] * 1.0
            acc += TINY_TABLE['optimizer']['adamw']
            want.append(acc)
        assert [r['rst'] for r in records] == pytest.approx(want, rel=1e-12)
        spent.append([r['rst'] for r in records])
    assert spent[0] == spent[1]


def test_rst_charges_sophia_hessian_steps_and_grad_accum(tiny_cfg):
    cfg = tiny_cfg(budget_unit='rst', budget=0.2, optimizer='sophiag', hess_interval=3, grad_accum=2, lr=1e-3)
    train.train(cfg)
    records, _ = train_records(Path(cfg.out_dir))
    acc, want = 0.0, []
    for step in range(1, len(records) + 1):
        acc += 2 * TINY_TABLE['fwd_bwd']['2'] + TINY_TABLE['optimizer']['sophiag']
        acc += 2 * TINY_TABLE['hessian']['sophiag'] if step % 3 == 0 else 0.0  # over both micro-batches
        want.append(acc)
    assert [r['rst'] for r in records] == pytest.approx(want, rel=1e-12)
    assert records[-1]['hessian_steps'] == len(records) // 3
    assert records[-1]['tokens'] == len(records) * 2 * TOKENS_PER_STEP
    n = len(records)  # the final eval record: the RST of each cost entry (compare's sensitivity), adding up
    final = runs.read_run(cfg.out_dir)['rst_by_entry']
    assert final == pytest.approx({'fwd_bwd:2': 2 * n * TINY_TABLE['fwd_bwd']['2'], 'optimizer:sophiag': n * TINY_TABLE['optimizer']['sophiag'],
                                   'hessian:sophiag': 2 * (n // 3) * TINY_TABLE['hessian']['sophiag']}, rel=1e-12)


def test_rst_run_without_a_table_names_the_calibrate_command(tiny_cfg):
    with pytest.raises(UserError, match='python calibrate.py') as e:
        train.train(tiny_cfg(budget_unit='rst', budget=1.0, batch_size=3))
    assert '--batch_size=3' in str(e.value) and '--model_type=gpt' in str(e.value)  # a T5 shape's names t5
    assert '--batch_size=3` (vocab 256; add --device=cuda on a GPU), or use --budget_unit=' in str(e.value)  # pastes whole


def test_a_table_without_the_runs_optimizer_names_the_command_that_adds_it(tiny_cfg, tmp_path):
    table = json.loads((budget_lib.TABLE_DIR / 'gpt_L2_H2_D64_T64_V256_B8.json').read_text())
    path = tmp_path / 't.json'
    path.write_text(json.dumps({**table, 'optimizer': {'adamw': table['optimizer']['adamw']}}))
    with pytest.raises(UserError) as e:
        train.train(tiny_cfg(budget_unit='rst', budget=1.0, optimizer='lion', rst_table=str(path)))
    assert str(e.value).endswith(f'--rst_table={path} --rst_add="(\'lion\',)"` (vocab 256; add --device=cuda on a GPU)')


def test_calibrate_writes_a_table_a_run_can_use(tiny_cfg, tmp_path):
    path = tmp_path / 'table.json'
    out = run_script('calibrate.py', '--model=tiny', '--batch_size=4', f'--rst_table={path}')
    assert out.returncode == 0, out.stderr
    table = json.loads(path.read_text())
    assert table['key'] == 'gpt_L2_H2_D64_T64_V256_B4'
    assert sorted(table['fwd_bwd']) == sorted(table['fwd']) == ['1', '2']
    assert sorted(table['optimizer']) == sorted(train.OPTIMIZERS) and list(table['hessian']) == ['sophiag']
    values = [*table['fwd_bwd'].values(), *table['fwd'].values(), *table['optimizer'].values(), *table['hessian'].values()]
    assert all(isinstance(v, float) and 0 < v < 10 for v in values)
    assert {'machine', 'torch', 'date', 'device'} <= set(table)
    step = table['fwd_bwd']['2'] + table['optimizer']['adamw']
    cfg = tiny_cfg(budget_unit='rst', budget=5.5 * step, batch_size=4, rst_table=str(path))
    assert train.train(cfg)['steps'] == 6


def test_calibrate_repeats_store_the_median_and_each_entry_coefficient_of_variation(tmp_path, monkeypatch):
    """--rst_repeats=3 with measured fwd_bwd['1'] of 1.0, 1.1, 1.6 s: the table keeps the median (1.1) and
    the CV sd / mean (0.3215 / 1.2333, not sd / median); an entry that never varied has CV 0."""
    times = iter([1.0, 1.6, 1.1])
    monkeypatch.setattr(budget_lib, 'measure_table', lambda *args: {'fwd_bwd': {'1': next(times), '2': 2.0}})
    cfg = types.SimpleNamespace(rst_table=str(tmp_path / 't.json'), compile=False, rst_repeats=3, rst_add=())
    run = types.SimpleNamespace(autocast=lambda: None, device='cpu', dtype=torch.float32)
    table = json.loads(budget_lib.calibrate(cfg, run, None, None, None, 'gpt_L2_H2_D64_T64_V256_B4').read_text())
    assert table['fwd_bwd'] == {'1': 1.1, '2': 2.0} and table['repeats'] == 3
    sd = math.sqrt(((1.0 - 3.7 / 3) ** 2 + (1.1 - 3.7 / 3) ** 2 + (1.6 - 3.7 / 3) ** 2) / 2)
    assert table['cv']['fwd_bwd']['1'] == pytest.approx(sd / (3.7 / 3)) and table['cv']['fwd_bwd']['2'] == 0


def _table(key='gpt_L2_H2_D64_T64_V256_B4'):
    return {'key': key, 'fwd_bwd': {'1': 0.12, '2': 0.2}, 'fwd': {'1': 0.04, '2': 0.07},
            'optimizer': {'adamw': 0.01, 'lion': 0.008}, 'hessian': {}, 'machine': 'the reference CPU'}


def test_rst_add_prices_a_new_optimizer_by_a_baseline_step_and_keeps_every_other_entry(tmp_path, monkeypatch):
    """Hand case: the table's baseline step (fwd_bwd at 2 blocks + AdamW) is 0.2 + 0.01 = 0.21 s; here it is
    0.1 + 0.005 = 0.105 s, so scale 2; Muon's update here, 0.02 s, is priced 0.04 s. Nothing else changes."""
    path = tmp_path / 't.json'
    path.write_text(json.dumps(_table()))
    here = {'fwd_bwd': {'1': 0.07, '2': 0.1}, 'fwd': {'1': 0.02, '2': 0.03}, 'optimizer': {'adamw': 0.005, 'muon': 0.02}, 'hessian': {}}
    seen = []
    monkeypatch.setattr(budget_lib, 'measure_table', lambda model, optimizers, *a: seen.append(sorted(optimizers)) or here)
    cfg = types.SimpleNamespace(rst_table=str(path), compile=False, rst_repeats=1, rst_add=('muon',))
    run = types.SimpleNamespace(autocast=lambda: None, device='cpu', dtype=torch.float32)
    model = types.SimpleNamespace(n_layer=2)
    optimizers = {name: None for name in train.OPTIMIZERS}
    budget_lib.calibrate(cfg, run, model, None, optimizers, 'gpt_L2_H2_D64_T64_V256_B4')
    table = json.loads(path.read_text())
    assert seen == [['adamw', 'muon']]  # only the new update beside the anchor
    assert table['optimizer']['muon'] == pytest.approx(0.04)
    assert table['added']['optimizer:muon']['scale'] == pytest.approx(2.0)
    assert table['added']['optimizer:muon']['seconds_here'] == 0.02
    assert {k: v for k, v in table.items() if k != 'added'} == {**_table(), 'optimizer': {'adamw': 0.01, 'lion': 0.008, 'muon': pytest.approx(0.04)}}
    before = path.read_bytes()
    for add, error in ((('muon',), 'prices optimizer:muon already'), (('adamw',), "names 'adamw'"), (('bogus',), "names 'bogus'")):
        with pytest.raises(UserError, match=error):
            budget_lib.calibrate(types.SimpleNamespace(**{**vars(cfg), 'rst_add': add}), run, model, None, optimizers, 'k')
    assert path.read_bytes() == before  # a refusal changes nothing
    with pytest.raises(UserError, match='does not exist: calibrate it whole first'):
        budget_lib.calibrate(types.SimpleNamespace(**{**vars(cfg), 'rst_table': str(tmp_path / 'none.json')}), run, model, None, optimizers, 'k')
    path.write_text(json.dumps({**_table(), 'fwd_bwd': {'1': -1.0, '2': 0.2}}))
    with pytest.raises(UserError, match='not a positive number of seconds: calibrate it whole again'):
        budget_lib.calibrate(types.SimpleNamespace(**{**vars(cfg), 'rst_add': ('sfadamw',)}), run, model, None, optimizers, 'k')


TINY_CALIBRATE = ['--model=tiny', '--compile_loss=False']
B8, B4 = 'gpt_L2_H2_D64_T64_V256_B8', 'gpt_L2_H2_D64_T64_V256_B4'


def calibrate_cli(argv, capsys):
    """(exit code, stderr lines) of `python calibrate.py ARGV`, run in this process through its cli."""
    capsys.readouterr()
    try:
        cli(calibrate.main, TrainConfig, [*TINY_CALIBRATE, *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def fake_measure(seconds):
    """budget.measure_table's stand-in: every entry of the optimizers it is given costs `seconds`."""
    return lambda model, optimizers, *a: {'fwd_bwd': {'1': seconds, '2': seconds}, 'fwd': {'1': seconds, '2': seconds},
                                          'optimizer': {n: seconds for n in optimizers}, 'hessian': {}}


def no_measuring(*args):
    pytest.fail('calibrate measured before refusing')


def test_calibrate_replaces_a_saved_table_only_with_overwrite(tmp_path, monkeypatch, capsys, stdlib_corpus):
    """The committed table (config/rst/<shape>.json, here a copy) and one named by --rst_table: refused in one
    line naming the file and both ways out, before any measuring, the file byte for byte as it was;
    --overwrite=True replaces it."""
    monkeypatch.setattr(budget_lib, 'TABLE_DIR', tmp_path / 'rst')
    (tmp_path / 'rst').mkdir()
    committed = ROOT / 'config' / 'rst' / f'{B8}.json'
    default, named = tmp_path / 'rst' / f'{B8}.json', tmp_path / 'mine.json'
    default.write_bytes(committed.read_bytes())
    named.write_bytes(committed.read_bytes())
    monkeypatch.setattr(budget_lib, 'measure_table', no_measuring)
    for argv, path in ((['--batch_size=8'], default), (['--batch_size=8', f'--rst_table={named}'], named)):
        code, err = calibrate_cli(argv, capsys)
        assert code == 2 and len(err) == 1 and str(path) in err[0], err
        assert '--overwrite=True' in err[0] and '--rst_table=<new path>' in err[0], err
        assert path.read_bytes() == committed.read_bytes()
    monkeypatch.setattr(budget_lib, 'measure_table', fake_measure(0.5))
    code, err = calibrate_cli(['--batch_size=8', f'--rst_table={named}', '--overwrite=True'], capsys)
    assert code == 0, err
    assert json.loads(named.read_text())['fwd_bwd'] == {'1': 0.5, '2': 0.5}
    assert default.read_bytes() == committed.read_bytes()


def test_a_table_another_calibration_is_writing_is_refused(tmp_path, monkeypatch, capsys, stdlib_corpus):
    """Two calibrations of one table: the second refuses in one line while the first holds the table's lock
    (a child process here), measures nothing, and leaves no table; once the first ends it runs."""
    named = tmp_path / 'mine.json'
    monkeypatch.setattr(budget_lib, 'measure_table', no_measuring)
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from data.loader import FolderLock; '
                               'FolderLock(sys.argv[1], None).acquire(); print("held", flush=True); time.sleep(60)',
                               str(tmp_path / '.mine.json.lock')], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        code, err = calibrate_cli(['--batch_size=8', f'--rst_table={named}'], capsys)
        assert (code, err) == (2, [f'error: {named} is being calibrated by another process (pid {holder.pid}): wait for '
                                   'it to end, or give --rst_table=<another path>']) and not named.exists()
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setattr(budget_lib, 'measure_table', fake_measure(0.5))
    assert calibrate_cli(['--batch_size=8', f'--rst_table={named}'], capsys)[0] == 0 and named.is_file()
    assert not (tmp_path / '.mine.json.lock').exists()


def test_overwrite_replaces_only_a_table_of_this_shape_and_no_message_offers_another_shapes(
        tmp_path, monkeypatch, capsys, stdlib_corpus, tiny_cfg):
    """A run given another shape's table is told to use or measure a table of its own shape, never to
    --overwrite that one (following it replaced the committed H200 table); calibrate's --overwrite=True replaces
    a table of this shape or a damaged one, and refuses, byte for byte, another shape's table, a run's
    config.json and a checkpoint (a non-.json path)."""
    other = tmp_path / 'other.json'
    other.write_bytes((ROOT / 'config' / 'rst' / 'h200' / 'gpt_L4_H4_D128_T128_V256_B32.json').read_bytes())
    with pytest.raises(UserError) as e:
        train.train(tiny_cfg(budget_unit='rst', budget=1.0, rst_table=str(other)))
    assert 'is the cost table of shape gpt_L4_H4_D128_T128_V256_B32, this run is' in str(e.value) and '--overwrite' not in str(e.value)
    assert 'give a table of this shape, or leave out --rst_table to use' in str(e.value)  # the committed tiny table
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({'config': {'lr': 0.001}}))
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes(b'PK\x03\x04 weights')
    monkeypatch.setattr(budget_lib, 'measure_table', no_measuring)
    for path, says in ((other, f'is the cost table of shape gpt_L4_H4_D128_T128_V256_B32, this run is {B8}'),
                       (config, 'is not a cost table (no key, no fwd_bwd entries)'), (ckpt, 'a cost table is a .json file')):
        before = path.read_bytes()
        for overwrite in (['--overwrite=True'], []):  # without it too: never told to --overwrite what it refuses
            code, err = calibrate_cli(['--batch_size=8', f'--rst_table={path}', *overwrite], capsys)
            assert code == 2 and len(err) == 1 and says in err[0] and '--overwrite=True to replace' not in err[0], err
        assert path.read_bytes() == before and not (tmp_path / f'.{path.name}.lock').exists()
    code, err = calibrate_cli(['--batch_size=8', f"--rst_table={tmp_path / 'new' / 'x.pt'}"], capsys)
    assert code == 2 and 'a cost table is a .json file' in err[0] and not (tmp_path / 'new').exists()  # no folder made
    monkeypatch.setattr(budget_lib, 'measure_table', fake_measure(0.5))
    for text in ('{"key": "gpt_L2_H2_D64', '[1, 2]', json.dumps({'key': B8}), json.dumps({'fwd_bwd': {'1': 0.1}})):
        damaged = tmp_path / 'damaged.json'  # cut short, a list, this shape's without entries, one that lost its key:
        damaged.write_text(text)  # a run is told to calibrate it again with --overwrite=True, and calibrate does
        with pytest.raises(UserError, match=r'calibrate it again with .*--overwrite=True'):
            train.train(tiny_cfg(budget_unit='rst', budget=1.0, rst_table=str(damaged)))
        assert calibrate_cli(['--batch_size=8', f'--rst_table={damaged}', '--overwrite=True'], capsys)[0] == 0
        assert json.loads(damaged.read_text())['key'] == B8


def test_rst_add_extends_a_table_of_this_shape_only(tmp_path, monkeypatch, capsys, stdlib_corpus):
    """A batch-8 table: --rst_add from a batch-4 run is refused in one line naming both shapes, before any
    measuring, the table unchanged; from a batch-8 run it adds Muon without --overwrite, keeping every entry."""
    path = tmp_path / 't8.json'
    path.write_bytes((ROOT / 'config' / 'rst' / f'{B8}.json').read_bytes())
    saved = path.read_bytes()
    before = json.loads(saved)
    monkeypatch.setattr(budget_lib, 'measure_table', no_measuring)
    code, err = calibrate_cli(["--rst_add=('muon',)", f'--rst_table={path}', '--batch_size=4'], capsys)
    assert code == 2 and len(err) == 1 and str(path) in err[0], err
    assert f'is for shape {B8}, this run is {B4}' in err[0] and f'--rst_table=<a table for {B4}>' in err[0], err
    assert path.read_bytes() == saved and 'muon' not in before['optimizer']
    monkeypatch.setattr(budget_lib, 'measure_table', fake_measure(0.5))
    code, err = calibrate_cli(["--rst_add=('muon',)", f'--rst_table={path}', '--batch_size=8'], capsys)
    assert code == 0, err
    after = json.loads(path.read_text())
    step = before['fwd_bwd']['2'] + before['optimizer']['adamw']  # a baseline step in the table; here 0.5 + 0.5 s
    muon = pytest.approx(0.5 * step / 1.0)  # Muon's 0.5 s here, scaled by table / here
    assert {k: v for k, v in after.items() if k != 'added'} == {**before, 'optimizer': {**before['optimizer'], 'muon': muon}}


def test_the_cpu_peak_is_measured_once_cached_and_only_raised(tmp_path, monkeypatch):
    cache = tmp_path / 'cache' / 'peak.json'
    monkeypatch.setenv('NANO_EFFICIENT_PEAK_CACHE', str(cache))
    measured = iter([40e9, 30e9, 55e9, 20e9])
    monkeypatch.setattr(budget_lib, 'measure_cpu_peak', lambda: next(measured))
    assert budget_lib.device_peak_flops('cpu') == 40e9                       # measured, cached
    assert budget_lib.device_peak_flops('cpu') == 40e9                       # read back, not measured
    assert json.loads(cache.read_text()) == {budget_lib.cpu_key(): 40e9}
    assert budget_lib.device_peak_flops('cpu', remeasure=True) == 40e9       # 30e9 under load: the old one stays
    assert budget_lib.device_peak_flops('cpu', remeasure=True) == 55e9       # a better measurement raises it
    cache.write_text(json.dumps({'other cpu': 1e9, budget_lib.cpu_key(): 55e9}, indent=1)[:30])
    assert budget_lib.device_peak_flops('cpu') == 20e9                       # cut short: measured again
    assert json.loads(cache.read_text()) == {budget_lib.cpu_key(): 20e9}
    assert not list(cache.parent.glob('*.tmp*'))


def test_a_file_at_the_peak_cache_path_that_is_no_cache_is_kept(tmp_path, monkeypatch, capsys):
    """NANO_EFFICIENT_PEAK_CACHE naming another file (a JSON list, a run's config.json, a checkpoint, a log): the peak
    is measured and used, the file left byte for byte, and one warning line says so (it was written over)."""
    monkeypatch.setattr(budget_lib, 'measure_cpu_peak', lambda: 40e9)
    for name, data in (('list.json', b'[1, 2]'), ('empty.json', b'[]'), ('config.json', b'{"config": {"lr": 0.001}}'),
                       ('ckpt.pt', b'PK\x03\x04\xff\xfe'), ('notes.py', b'print("a script")\n'),
                       ('log.jsonl', b'{"step": 0, "loss": 5.5}\n{"step": 1, "loss": 5.1}\n')):
        path = tmp_path / name
        path.write_bytes(data)
        monkeypatch.setenv('NANO_EFFICIENT_PEAK_CACHE', str(path))
        assert budget_lib.device_peak_flops('cpu') == 40e9 and path.read_bytes() == data
        err = capsys.readouterr().err.splitlines()
        assert err == [f'warning: {path} is not a readable CPU-peak cache: left as it is, the peak not kept (set '
                       'NANO_EFFICIENT_PEAK_CACHE to another file, or give --peak_flops)'], err


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    assert budget_lib.measure_cpu_peak(sizes=(32, 64), repeats=2) > 0
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('name, peak', [('NVIDIA H200', 989e12), ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                                        ('NVIDIA H200 NVL', 835e12), ('NVIDIA L40S', 362e12), ('NVIDIA L4', 121e12),
                                        ('NVIDIA A100-SXM4-80GB', 312e12)])
def test_a_gpu_gets_its_own_dense_bf16_peak(monkeypatch, name, peak):
    """Whole-word names, the specific first: an L40S is not an L4, an H100 PCIe not an SXM H100."""
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: name)
    assert budget_lib.device_peak_flops('cuda:0') == peak


def test_the_second_reference_system_charges_a_baseline_step_what_the_cpu_table_does():
    """config/rst/h200/ is an H200 table rescaled so that a baseline step (4 blocks + AdamW) costs what it
    costs on the CPU table: the baseline's runs count the same steps under both at every ablation budget,
    while a 1-block step (stacking's first phase) costs a larger share of a 4-block step."""
    key = 'gpt_L4_H4_D128_T128_V256_B32'
    cpu = budget_lib.load_table(key)
    gpu = budget_lib.load_table(key, str(budget_lib.TABLE_DIR / 'h200' / f'{key}.json'))

    def steps(table, total, layers=4):
        b, n = budget_lib.Budget('rst', total, table, lambda L: 1.0, 128, 32), 0
        while not b.done:
            b.charge_train(32, layers)
            b.charge_optimizer('adamw')
            n += 1
        return n
    for total in (120.0, 240.0, 480.0, 960.0):
        assert steps(cpu, total) == steps(gpu, total)
    assert steps(gpu, 120.0, layers=1) < steps(cpu, 120.0, layers=1)


def test_a_run_under_another_table_is_a_row_of_its_own(tmp_path):
    """compare reads a run charged under --rst_table=config/rst/h200/... as 'stack [h200]', next to 'stack'."""
    for name, table in (('cpu', ''), ('gpu', 'config/rst/h200/gpt_L4_H4_D128_T128_V256_B32.json')):
        run = tmp_path / name
        run.mkdir()
        (run / 'config.json').write_text(json.dumps({'config': {'budget': 1.0, 'budget_unit': 'rst', 'seed': 0,
                                                                'arch': 'stack', 'rst_table': table}}))
        (run / 'log.jsonl').write_text(json.dumps({'step': 1, 'tokens': 1.0, 'rst': 1.0, 'val_loss': 2.0}) + '\n')
    assert runs.read_run(tmp_path / 'cpu')['label'] == 'stack'
    assert runs.read_run(tmp_path / 'gpu')['label'] == 'stack [h200]'


@pytest.mark.parametrize('cost', [-5.0, math.inf, math.nan, '3', True])
def test_a_cost_before_the_start_that_is_not_a_non_negative_number_is_refused(cost):
    """An IL cache's sidecar edited to a negative cost made the budget unreachable (trained forever at lr 0)."""
    b = budget_lib.Budget('rst', 10.0, None, 1.0, 8, 2)
    with pytest.raises(UserError, match="not a non-negative number: the record it was read from .* is damaged"):
        b.charge_before_start({'rst': cost, 'tokens': 0.0})
    b.charge_before_start({'tokens': 5.0, 'rst': None})  # an uncounted unit stays None


def test_the_schedule_span_survives_a_checkpoint():
    """A resumed IL-charged run keeps the schedule its fresh run began (the span after the costs paid before
    the start); a checkpoint from before the span was saved reads it from the RST charged before the start."""
    b = budget_lib.Budget('rst', 10.0, None, 1.0, 8, 2)
    b.spent['rst'] = 0.0
    b.charge_before_start({'rst': 4.0, 'tokens': 3.0})
    assert b.schedule_span() == (4.0, 6.0) and b.spent['rst'] == 4.0
    for state in (b.state_dict(), {k: v for k, v in b.state_dict().items() if k != 'before_start'}):
        again = budget_lib.Budget('rst', 10.0, None, 1.0, 8, 2)
        again.load_state_dict(state)
        assert again.schedule_span() == (4.0, 6.0) and 'before_start' not in again.spent
    assert budget_lib.Budget('iters', 5.0, None, 1.0, 8, 2).schedule_span() == (0.0, 5.0)
