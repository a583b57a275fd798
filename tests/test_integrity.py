"""Run integrity (issue 17) for the loop, the configurator and budget.py: a resume that would change what the
saved run is, two runs on one folder, files that parse but have the wrong shape, values out of range or not
finite, operating-system errors, a configuration too large for the machine, and Ctrl-C during setup. Every
bad call: one line on stderr, its exit code, and the saved run byte for byte as it was.

The entry points run in this process through configurator.cli (the path `python train.py ...` takes), so
~80 cases cost seconds; the lock is also tested with two real processes. The data layer's classes (corpus
writes, meta.json, paths) are in test_hostile_data.py."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import budget as budget_lib
import calibrate
import rho
import train
from configurator import cli
from data.loader import get_tokenizer, write_corpus
from runs import read_run
from studies import ntng
from conftest import ROOT, StopAfter

TINY = ['--model=tiny', '--batch_size=8', '--budget_unit=iters', '--compile_loss=False', '--sample_tokens=0',
        '--eval_batches=2', '--peak_flops=1e12', '--log_interval=1']


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def call(main, cls, argv, capsys):
    """(exit code, stderr lines) of an entry point as `python SCRIPT ARGV` runs it."""
    capsys.readouterr()
    try:
        cli(main, cls, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope='module')
def saved(tmp_path_factory, stdlib_corpus):
    """A finished baseline run, a Selective Backprop run, and damaged checkpoints and tables."""
    root = tmp_path_factory.mktemp('integrity')
    base = dict(model='tiny', batch_size=8, budget_unit='iters', budget=4, compile_loss=False, sample_tokens=0,
                eval_batches=2, peak_flops=1e12, eval_interval=2)
    train.train(train.TrainConfig(out_dir=str(root / 'good'), **base))
    train.train(rho.RhoConfig(out_dir=str(root / 'sb'), method='sb', **base), rho.SelectiveBackprop(
        rho.RhoConfig(out_dir=str(root / 'sb'), method='sb', **base)))
    good = torch.load(root / 'good' / 'ckpt.pt', weights_only=True)
    bad = {'list': [1, 2], 'no_model_args': {'model': {}}, 'empty_model': {'model': {}, 'model_args': {}},
           'no_block_size': {**good, 'model_args': {k: v for k, v in good['model_args'].items() if k != 'block_size'}},
           'wrong_width': {**good, 'model_args': {**good['model_args'], 'n_embd': 32}},
           'string_vocab': {**good, 'model_args': {**good['model_args'], 'vocab_size': '256'}},
           'no_resume_state': {k: v for k, v in good.items() if k not in ('optimizer', 'budget')}}
    for name, ckpt in bad.items():
        (root / name).mkdir()
        torch.save(ckpt, root / name / 'ckpt.pt')
    weights = dict(good['model'])
    weights.pop(next(iter(weights)))
    damaged = {'no_weight': {**good, 'model': weights}, 'empty_rng': {**good, 'rng': {}},
               'config_list': {**good, 'config': list(good['config'].items())}, 'empty_budget': {**good, 'budget': {}},
               # fields that load but are no place in a run: an endless data loop, a budget never (or at once) spent
               'pos_past_end': {**good, 'data': {**good['data'], 'pos': 10 ** 12}},
               'nan_spent': {**good, 'budget': {**good['budget'], 'iters': math.nan}},
               'negative_spent': {**good, 'budget': {**good['budget'], 'iters': -3.0}},
               'text_step': {**good, 'iter_num': 'x'}, 'negative_step': {**good, 'iter_num': -1},
               # fields torch's load_state_dict takes as they are: a run would fail at its first step, or at its end
               'opt_state_shape': {**good, 'optimizer': {**good['optimizer'], 'state': {
                   **good['optimizer']['state'], 0: {**good['optimizer']['state'][0], 'exp_avg': torch.zeros(3)}}}},
               'opt_betas_text': {**good, 'optimizer': {**good['optimizer'], 'param_groups': [
                   {**g, 'betas': 'ab'} for g in good['optimizer']['param_groups']]}},
               'best_text': {**good, 'best_val_loss': 'x'},
               'tokenizer_number': {**good, 'config': {**good['config'], 'tokenizer': 5}}}
    for name, ckpt in damaged.items():  # run folders to resume whose checkpoint is damaged
        shutil.copytree(root / 'good', root / name)
        torch.save(ckpt, root / name / 'ckpt.pt')
    for name in ('ckpt.pt', 'log.jsonl', 'config.json', 'lock'):  # a folder where the run keeps a file
        (root / f'dir_{name}' / name).mkdir(parents=True)
    table = json.loads(next(Path(ROOT / 'config' / 'rst').glob('gpt_L2_H2_D64_T64_V256_B8.json')).read_text())
    tables = {'list.json': [table], 'no_fwd_bwd.json': {k: v for k, v in table.items() if k != 'fwd_bwd'},
              'negative.json': {**table, 'fwd': {**table['fwd'], '1': -1.0}},
              'tiny.json': {**table, 'fwd_bwd': {**table['fwd_bwd'], '2': 1e-300}},  # a budget never spent
              'true.json': {**table, 'optimizer': {**table['optimizer'], 'adamw': True}},  # was charged as 1.0 s
              'no_layer_2.json': {**table, 'fwd_bwd': {'1': table['fwd_bwd']['1']}},
              'no_lion.json': {**table, 'optimizer': {'adamw': table['optimizer']['adamw']}}}
    for name, t in tables.items():
        (root / name).write_text(json.dumps(t))
    (root / 'syntax.py').write_text('lr = 1e-3\nbudget = (\n')
    (root / 'raises.py').write_text('lr = 1e-3\nbudget = 1 / 0\n')
    (root / 'inf.py').write_text("budget = float('inf')\n")
    (root / 'table.md').mkdir()
    (root / 'a_file').write_text('x')
    return {'root': root, 'good': root / 'good', 'sb': root / 'sb', 'files': {p: snapshot(root / p) for p in PROTECTED}}


PROTECTED = ('good', 'sb', 'no_weight', 'empty_rng', 'config_list', 'empty_budget', 'pos_past_end', 'nan_spent',
             'negative_spent', 'text_step', 'negative_step', 'opt_state_shape', 'opt_betas_text', 'best_text',
             'tokenizer_number')  # no failed call may change them


def train_cases(w):
    G, r = w['good'], w['root']
    resume = [*TINY, f'--out_dir={G}', '--init_from=resume', '--budget=4', '--eval_interval=2']
    return [
        # class 2: a resume that would change what the run is
        ('resume-smaller-budget', [*resume, '--budget=2'], ['--budget=2.0 differs from the saved run (budget=4']),
        ('resume-larger-budget', [*resume, '--budget=40'], ['--budget=40.0 differs']),
        ('resume-other-dataset', [*resume, f'--dataset={r}/nope'], [f"--dataset='{r}/nope' differs"]),
        ('resume-n-embd', [*resume, '--n_embd=128'], ['--n_embd=128 differs']),
        ('resume-n-layer', [*resume, '--n_layer=3'], ['--n_layer=3 differs']),
        ('resume-block-size', [*resume, '--block_size=32'], ['--block_size=32 differs']),
        ('resume-arch', [*resume, '--arch=stack'], ["--arch='stack' differs"]),
        ('resume-optimizer', [*resume, '--optimizer=lion'], ["--optimizer='lion' differs"]),
        ('resume-schedule', [*resume, '--schedule=wsd'], ["--schedule='wsd' differs"]),
        ('resume-lr', [*resume, '--lr=0.01'], ['--lr=0.01 differs']),
        ('resume-seed', [*resume, '--seed=7'], ['--seed=7 differs']),
        ('resume-label', [*resume, '--label=other'], ["--label='other' differs"]),
        ('resume-eval-batches', [*resume, '--eval_batches=3'], ['--eval_batches=3 differs']),
        ('resume-sb-with-train', [*TINY, f"--out_dir={w['sb']}", '--init_from=resume', '--budget=4'],
         ['is a rho.SelectiveBackprop run', 'this command would continue it as train.CausalLM']),
        ('resume-not-resumable', [*TINY, f'--out_dir={r}/no_resume_state', '--init_from=resume', '--budget=4'],
         ['cannot be resumed (it lacks optimizer, budget)']),
        ('resume-a-weight-missing', [*resume, f'--out_dir={r}/no_weight'],  # the resumed model is built from it
         ['no_weight/ckpt.pt does not match its own model_args (RuntimeError', 'Missing key', 'it is damaged']),
        ('resume-empty-rng', [*resume, f'--out_dir={r}/empty_rng'], ["cannot be resumed (KeyError: 'cpu')", 'it is damaged']),
        ('resume-config-a-list', [*resume, f'--out_dir={r}/config_list'], ["'config' is a list"]),
        ('resume-empty-budget', [*resume, f'--out_dir={r}/empty_budget'], ["budget state holds no 'iters' spent"]),
        ('resume-pos-past-end', [*resume, f'--out_dir={r}/pos_past_end'], ['cannot be resumed (ValueError: data position',
                                                                         'is not a place in this data', 'it is damaged']),
        ('resume-nan-spent', [*resume, f'--out_dir={r}/nan_spent'], ['budget spent iters=nan is not a non-negative number']),
        ('resume-negative-spent', [*resume, f'--out_dir={r}/negative_spent'], ['budget spent iters=-3.0 is not a non-negative']),
        ('resume-text-step', [*resume, f'--out_dir={r}/text_step'], ["iter_num='x' is not a step count"]),
        ('resume-negative-step', [*resume, f'--out_dir={r}/negative_step'], ['iter_num=-1 is not a step count']),
        ('resume-opt-state-shape', [*resume, f'--out_dir={r}/opt_state_shape'],
         ['cannot be resumed (ValueError: optimizer state exp_avg has shape (3,), its parameter (', 'it is damaged']),
        ('resume-opt-betas-text', [*resume, f'--out_dir={r}/opt_betas_text'],
         ["cannot be resumed (ValueError: optimizer setting betas='ab' is not like (0.9, 0.95))"]),
        ('resume-best-text', [*resume, f'--out_dir={r}/best_text'], ["cannot be resumed (ValueError: best_val_loss='x' is not a number)"]),
        ('sample-only-tokenizer-number', ['--sample_only=True', f'--init_from={r}/tokenizer_number/ckpt.pt'],
         ["its config's tokenizer is 5, not a name"]),
        ('init-from-config-a-list', [*TINY, '--budget=2', f'--out_dir={r}/fresh_l', f'--init_from={r}/config_list/ckpt.pt'],
         ["'config' is a list"]),
        ('sample-only-config-a-list', ['--sample_only=True', f'--init_from={r}/config_list/ckpt.pt'], ["'config' is a list"]),
        # class 4: checkpoints and files that parse but have the wrong shape
        *[(f'init-from-{name}', [*TINY, '--budget=2', f'--out_dir={r}/fresh_{name}', f'--init_from={r}/{name}/ckpt.pt'], [want])
          for name, want in (('list', 'is not a model checkpoint'), ('no_model_args', 'is not a model checkpoint'),
                             ('empty_model', 'is not a model checkpoint'), ('no_block_size', 'is not a model checkpoint'),
                             ('string_vocab', 'is not a model checkpoint'), ('wrong_width', 'does not match its own model_args'))],
        ('init-from-a-folder', [*TINY, '--budget=2', f'--out_dir={r}/fresh_f', f'--init_from={r}/table.md/x.pt'], ['no checkpoint at']),
        ('iters-not-whole', [*TINY, '--budget=2.5', f'--out_dir={r}/fresh_i'],
         ['--budget=2.5 iters is not a whole number of steps: give 2 or 3']),
        # a prepared corpus given as a folder under another tokenizer's name: its config.json would record that name
        ('tokenizer-not-the-corpus', [*TINY, '--budget=2', f'--out_dir={r}/fresh_k', f'--dataset={ROOT}/data/stdlib/byte',
                                      '--tokenizer=cl100k_base'],
         ["--tokenizer=cl100k_base but", "was prepared with the 'byte' tokenizer: give --tokenizer=byte"]),
        *[(f'rst-table-{name}', [*TINY, '--budget=2', '--budget_unit=rst', f'--out_dir={r}/fresh_t', f'--rst_table={r}/{name}.json',
                                 *(['--optimizer=lion'] if name == 'no_lion' else [])], [want])
          for name, want in (('list', 'is a list, not a table'), ('no_fwd_bwd', 'has no fwd_bwd entries'),
                             ('negative', 'not a positive number of seconds'),
                             ('tiny', 'has a fwd_bwd entry 2 of 1e-300 s, faster than any step (1e-06 s)'),
                             ('true', 'optimizer entry adamw that is not a positive number of seconds'), ('no_layer_2', 'lacks fwd_bwd/fwd'),
                             ('no_lion', 'has no optimizer entry for lion: price it with `python calibrate.py'))],
        ('rst-table-folder', [*TINY, '--budget=2', '--budget_unit=rst', f'--out_dir={r}/fresh_t', f'--rst_table={r}/table.md'],
         ['is a folder']),
        ('config-syntax-error', [f'{r}/syntax.py', *TINY, f'--out_dir={r}/fresh_c'], [f'{r}/syntax.py:2: syntax error']),
        ('config-raises', [f'{r}/raises.py', *TINY, f'--out_dir={r}/fresh_c'], [f'{r}/raises.py:2: the config file raised ZeroDivisionError']),
        # class 5: every key's range, for every source of values
        ('budget-inf', [*TINY, f'--out_dir={r}/fresh_r', '--budget=1e999'], ['--budget must be a finite number']),
        ('budget-inf-in-a-file', [f'{r}/inf.py', *TINY, f'--out_dir={r}/fresh_r'], ['--budget must be a finite number']),
        ('branch-budgets-inf', [*TINY, '--budget=2', f'--out_dir={r}/fresh_r', '--schedule=wsd', '--branch_budgets=(1,1e999)'],
         ['--branch_budgets must be a finite number']),
        ('branch-budgets-zero', [*TINY, '--budget=2', f'--out_dir={r}/fresh_r', '--schedule=wsd', '--branch_budgets=(1,0)'],
         ['--branch_budgets must be > 0']),
        ('beta1-high', [*TINY, f'--out_dir={r}/fresh_r', '--beta1=1.5'], ['--beta1 must be in [0, 1)']),
        ('beta2-negative', [*TINY, f'--out_dir={r}/fresh_r', '--beta2=-0.1'], ['--beta2 must be in [0, 1)']),
        ('n-layer-negative', [*TINY, f'--out_dir={r}/fresh_r', '--n_layer=-1'], ['--n_layer must be >= 0']),
        ('n-embd-negative', [*TINY, f'--out_dir={r}/fresh_r', '--n_embd=-8'], ['--n_embd must be >= 0']),
        ('block-size-negative', [*TINY, f'--out_dir={r}/fresh_r', '--block_size=-1'], ['--block_size must be >= 0']),
        ('rho-negative', [*TINY, f'--out_dir={r}/fresh_r', '--rho=-1'], ['--rho must be > 0']),
        ('stack-init-layers', [*TINY, f'--out_dir={r}/fresh_r', '--arch=stack', '--stack_init_layers=99'],
         ['--stack_init_layers must be <= n_layer']),
        ('sample-tokens-negative', [*TINY, f'--out_dir={r}/fresh_r', '--sample_tokens=-5'], ['--sample_tokens must be >= 0']),
        ('out-dir-empty', [*TINY, '--out_dir='], ['--out_dir must be a non-empty path']),
        ('dataset-empty', [*TINY, f'--out_dir={r}/fresh_r', '--dataset= '], ['--dataset must be a non-empty path']),
        ('seed-negative', [*TINY, f'--out_dir={r}/fresh_r', '--seed=-1'], ['--seed must be in [0, 18446688733642]']),
        ('num-samples-zero', [*TINY, f'--out_dir={r}/fresh_r', '--num_samples=0'], ['--num_samples must be > 0']),
        # class 6: a folder where a file belongs, an unwritable place
        ('out-dir-under-a-file', [*TINY, f'--out_dir={r}/a_file/run'], ['a_file is a file, not a folder']),
        *[(f'{name}-is-a-folder', [*TINY, f'--out_dir={r}/dir_{name}'], [f'dir_{name}/{name} is a folder where the run keeps'])
          for name in ('ckpt.pt', 'log.jsonl', 'config.json', 'lock')],
        # keys that are each in range but make no sense together
        ('start-empty', [*TINY, '--budget=2', f'--out_dir={r}/fresh_r', '--start='], ['--start must be a non-empty prompt']),
        ('sample-only-start-empty', ['--sample_only=True', f'--init_from={G}/ckpt.pt', '--start='],
         ['--start must be a non-empty prompt']),
        ('branch-budgets-twice', [*TINY, '--budget=2', f'--out_dir={r}/fresh_r', '--schedule=wsd', '--branch_budgets=(1,1)'],
         ['--branch_budgets has 1 more than once']),
        ('stack-fracs-equal', [*TINY, f'--out_dir={r}/fresh_r', '--arch=stack', '--stack_fracs=(0.3,0.3)'],
         ['--stack_fracs must increase strictly']),
        ('wsd-warmup-and-cooldown-exceed-the-run', [*TINY, f'--out_dir={r}/fresh_r', '--schedule=wsd', '--warmup_frac=0.9',
                                                    '--cooldown_frac=1.0'], ['must be <= 1']),
        ('wsd-branch-warmup-and-cooldown', [*TINY, '--budget=10', f'--out_dir={r}/fresh_r', '--schedule=wsd', '--warmup_frac=0.3',
                                            '--branch_budgets=(0.25,1)'], ['the warm-up (1.2 of the budget)']),
        # class 8: too large for the machine, refused before allocating
        ('batch-huge', [*TINY, f'--out_dir={r}/fresh_m', '--batch_size=10000000'], ['needs at least', '--batch_size']),
        ('block-huge', [*TINY, f'--out_dir={r}/fresh_m', '--block_size=100000000'], ['needs at least']),
        ('width-huge', [*TINY, f'--out_dir={r}/fresh_m', '--n_embd=1048576', '--n_head=1'], ['needs at least']),
    ]


CASE_IDS = [c[0] for c in train_cases({'good': Path('/g'), 'sb': Path('/s'), 'root': Path('/r')})]


@pytest.mark.parametrize('case_id', CASE_IDS)
def test_train_refuses_in_one_line_and_touches_nothing(saved, capsys, case_id):
    argv, expect = next((a, e) for c, a, e in train_cases(saved) if c == case_id)
    code, err = call(train.main, train.TrainConfig, argv, capsys)
    what = f'`python train.py {" ".join(map(str, argv))}` -> exit {code}, stderr {err}'
    assert code == 2 and len(err) == 1, what
    for phrase in expect:
        assert phrase in err[0], f'want {phrase!r}: {what}'
    assert {p: snapshot(saved['root'] / p) for p in PROTECTED} == saved['files'], f'a saved run changed: {what}'
    fresh = [p for p in saved['root'].glob('fresh_*') if any(p.iterdir())]
    assert not fresh, f'{what} left files in {fresh}'


def test_keys_that_may_change_on_resume_pass_the_check(saved):
    ckpt = torch.load(saved['good'] / 'ckpt.pt', weights_only=True)
    cfg = train.TrainConfig(**ckpt['config'])
    for change in (dict(eval_interval=7), dict(log_interval=3), dict(device='cpu'), dict(compile=True),
                   dict(out_dir='/elsewhere'), dict(sample_tokens=5), dict(peak_flops=3e12)):
        train.check_resume_config(train.dataclasses.replace(cfg, init_from='resume', **change), ckpt, Path('x'))


def test_a_method_script_refuses_to_continue_another_method(saved, capsys):
    code, err = call(rho.main, rho.RhoConfig, [*TINY, f"--out_dir={saved['good']}", '--init_from=resume', '--budget=4',
                                                '--eval_interval=2', '--method=sb'], capsys)
    assert code == 2 and len(err) == 1 and 'is a train.CausalLM run' in err[0] and 'rho.SelectiveBackprop' in err[0], err
    assert snapshot(saved['good']) == saved['files']['good']


def test_budget_commands_refuse_in_one_line(saved, capsys, tmp_path):
    r = saved['root']
    cases = [(['schedules', '--lr=1e999'], '--lr must be a finite number'),
             (['compare', str(saved['good']), f'--out={r}/table'], 'is a folder'),
             (['compare', str(saved['good']), str(saved['good']), f'--out={tmp_path}/x'], 'is given twice'),
             (['calibrate', *TINY, f'--rst_table={r}/a_file/t.json'], 'a_file is a file, not a folder'),
             (['ablate', '--jobs=0'], '--jobs must be > 0'),
             (['tune', '--points=4'], '--points must be >= 5')]
    for argv, phrase in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            command = {'schedules': budget_lib.main, 'calibrate': lambda a: cli(calibrate.main, train.TrainConfig, a[1:])}
            command.get(argv[0], ntng.main)(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and phrase in err[0], (argv, err)


def test_a_partial_last_log_line_is_dropped_on_resume(tiny_cfg, tmp_path):
    cfg = tiny_cfg(out_dir=str(tmp_path / 'a'), budget=6, eval_interval=3)
    train.train(cfg, StopAfter(8, 3))
    with open(tmp_path / 'a' / 'log.jsonl', 'a') as f:
        f.write('{"step": 4, "train_loss": 2.')             # killed mid-write
    result = train.train(train.dataclasses.replace(cfg, init_from='resume'))
    records = [json.loads(line) for line in (tmp_path / 'a' / 'log.jsonl').read_text().splitlines()]
    assert result['steps'] == 6 and [r['step'] for r in records if 'train_loss' in r] == [1, 2, 3, 4, 5, 6]
    assert read_run(tmp_path / 'a')['complete']


def test_ctrl_c_during_setup_is_one_line_exit_130(saved, capsys, monkeypatch, tmp_path):
    def interrupt(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'load_corpus', interrupt)
    code, err = call(train.main, train.TrainConfig, [*TINY, '--budget=2', f'--out_dir={tmp_path}/new'], capsys)
    assert (code, err) == (130, ['interrupted before step 1: nothing saved'])
    assert not (tmp_path / 'new').exists()
    code, err = call(train.main, train.TrainConfig, [*TINY, f"--out_dir={saved['good']}", '--init_from=resume',
                                                     '--budget=4', '--eval_interval=2'], capsys)
    assert (code, err) == (130, ['interrupted while resuming: the saved run is unchanged'])
    assert snapshot(saved['good']) == saved['files']['good']


def test_a_run_that_fails_in_setup_leaves_no_folder(saved, capsys, tmp_path):
    """Checks that need the run folder (taken, locked) first: a failure leaves none of the folders it made."""
    for bad in (['--init_from=resume'], ['--tokenizer=nope'], ['--budget_unit=rst', f'--rst_table={tmp_path}/none.json']):
        code, err = call(train.main, train.TrainConfig, [*TINY, '--budget=2', f'--out_dir={tmp_path}/new/run', *bad], capsys)
        assert code == 2 and len(err) == 1, (bad, err)
        assert list(tmp_path.iterdir()) == [], (bad, list(tmp_path.iterdir()))


def test_overwrite_that_fails_before_its_first_checkpoint_leaves_only_the_new_run(saved, capsys, tmp_path):
    """--overwrite=True over a finished run, then nan at step 2: the old checkpoint goes with the old log and
    config (the folder never mixes two runs), and the message does not promise a checkpoint."""
    folder = tmp_path / 'run'
    shutil.copytree(saved['good'], folder)
    code, err = call(train.main, train.TrainConfig, [*TINY, '--budget=4', f'--out_dir={folder}', '--overwrite=True',
                                                     '--lr=1e12', '--warmup_frac=0', '--grad_clip=0'], capsys)
    assert code == 2 and len(err) == 1 and 'at step 2: no checkpoint saved yet' in err[0], err
    assert not (folder / 'ckpt.pt').exists()
    assert json.loads((folder / 'config.json').read_text())['config']['lr'] == 1e12
    records = [json.loads(line) for line in (folder / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [1, 2] and records[-1]['nonfinite'] is True


# -----------------------------------------------------------------------------
# class 3: one run per folder

def test_a_live_lock_refuses_and_a_dead_ones_is_taken_over(tiny_cfg, tmp_path, capsys):
    folder = tmp_path / 'run'
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import sys; sys.path.insert(0, sys.argv[1]); import time; '
                               'from data.loader import FolderLock; FolderLock(sys.argv[2], None).acquire(); '
                               'print("locked", flush=True); time.sleep(60)', str(ROOT), str(folder / 'lock')],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        code, err = call(train.main, train.TrainConfig, [*TINY, '--budget=2', f'--out_dir={folder}'], capsys)
        assert code == 2 and len(err) == 1 and f'is in use by another run (pid {holder.pid})' in err[0], err
        assert sorted(p.name for p in folder.iterdir()) == ['lock']
    finally:
        holder.kill()                                     # kill -9: its lock file stays, its flock goes
        holder.wait()
    assert (folder / 'lock').exists()
    code, err = call(train.main, train.TrainConfig, [*TINY, '--budget=2', f'--out_dir={folder}'], capsys)
    assert code == 0, err
    assert not (folder / 'lock').exists() and (folder / 'ckpt.pt').exists()


def test_two_runs_started_on_one_folder(tmp_path, stdlib_corpus):
    """Two real `python train.py` started at once on one out_dir: one runs, the other refuses in one line
    (the lock, or the first's log if it is already there); the log is the one run's, no step twice."""
    args = [sys.executable, 'train.py', *TINY, '--budget=300', f'--out_dir={tmp_path}/run', '--eval_interval=100']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    runs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = sorted((p.communicate(timeout=300)[1], p.returncode)[::-1] for p in runs)  # (exit code, stderr)
    assert results[0][0] == 0, results[0][1][-2000:]
    code, err = results[1]
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert 'is in use by another run' in err or 'already holds a run' in err, err
    steps = [json.loads(l)['step'] for l in (tmp_path / 'run' / 'log.jsonl').read_text().splitlines() if 'train_loss' in l]
    assert steps == list(range(1, 301)) and not (tmp_path / 'run' / 'lock').exists()


def test_a_damaged_il_cache_is_one_line(tmp_path, capsys, stdlib_corpus):
    """RHO-LOSS's cache: a sidecar that is not an object, lacks a key, or a loss file that is cut or gone."""
    source = (ROOT / 'train.py').read_text()
    write_corpus(tmp_path / 'corpus', [(f'doc{i}', source[2000 * i:2000 * (i + 1)]) for i in range(20)],
                 get_tokenizer('byte'), 'test: train.py', val_frac=0.3)  # small: the precompute scores every example
    il = [*TINY, '--budget=2', f'--il_out_dir={tmp_path}/il', f'--il_cache={tmp_path}/cache', '--block_size=32',
          f'--dataset={tmp_path}/corpus']
    code, err = call(rho.main, rho.RhoConfig, [*il, '--stage=il', f'--out_dir={tmp_path}/t'], capsys)
    assert code == 0, err
    sidecar, losses = tmp_path / 'cache' / 'il_loss.json', tmp_path / 'cache' / 'il_loss.f16'
    good_sidecar, good_losses = sidecar.read_bytes(), losses.read_bytes()
    damage = {'sidecar-a-list': lambda: sidecar.write_text('[1, 2]'),
              'sidecar-not-json': lambda: sidecar.write_text('{"num_ex'),
              'sidecar-no-hash': lambda: sidecar.write_text(json.dumps({k: v for k, v in json.loads(good_sidecar).items()
                                                                         if k != 'sha256'})),
              'losses-edited': lambda: losses.write_bytes(good_losses[:-2] + bytes([good_losses[-2] ^ 1, good_losses[-1]])),
              'losses-half': lambda: losses.write_bytes(good_losses[:len(good_losses) // 2]),
              'losses-odd-byte': lambda: losses.write_bytes(good_losses[:-1]),
              'losses-gone': losses.unlink}
    for name, break_it in damage.items():
        break_it()
        code, err = call(rho.main, rho.RhoConfig, [*il, '--stage=train', f'--out_dir={tmp_path}/{name}'], capsys)
        assert code == 2 and len(err) == 1 and 'rebuild it with' in err[0], (name, err)
        sidecar.write_bytes(good_sidecar)
        losses.write_bytes(good_losses)


# -----------------------------------------------------------------------------
# writes that cannot be torn, links that are not followed, budgets that fit a step

def test_a_lock_that_is_a_link_truncates_nothing_and_is_one_line(tmp_path, capsys, stdlib_corpus):
    """A run folder's `lock` that is a symbolic link to a file: taking the lock must not follow it (the file
    it points to stays as it was); the run refuses in one line."""
    precious = tmp_path / 'precious.txt'
    precious.write_text('not yours\n')
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'lock').symlink_to(precious)
    code, err = call(train.main, train.TrainConfig, [*TINY, '--budget=2', f'--out_dir={run}'], capsys)
    assert code == 2 and len(err) == 1 and 'symbolic link' in err[0], err
    assert precious.read_text() == 'not yours\n' and not (run / 'log.jsonl').exists()


def test_a_killed_writers_temporary_is_removed_by_the_next_run(tmp_path, capsys, stdlib_corpus):
    """kill -9 during a checkpoint write leaves ckpt.pt.tmp<pid>; the next run that owns the folder removes it."""
    run = tmp_path / 'run'
    code, err = call(train.main, train.TrainConfig, [*TINY, '--budget=2', f'--out_dir={run}'], capsys)
    assert code == 0, err
    (run / 'ckpt.pt.tmp424242').write_bytes(b'half a checkpoint')
    code, err = call(train.main, train.TrainConfig, [*TINY, '--budget=3', f'--out_dir={run}', '--overwrite=True'], capsys)
    assert code == 0, err
    assert not list(run.glob('*.tmp[0-9]*'))


@pytest.mark.parametrize('unit, budget, says', [('iters', '0.5', '>= 1'), ('tokens', '100', '>= 512'),
                                                ('rst', '0.0001', 'smaller than one training step')])
def test_a_budget_smaller_than_one_step_is_refused_with_the_smallest_that_trains(tmp_path, capsys, stdlib_corpus, unit,
                                                                                 budget, says):
    argv = [a for a in TINY if not a.startswith('--budget_unit')] + [f'--budget_unit={unit}', f'--budget={budget}',
                                                                        f'--out_dir={tmp_path}/run']
    code, err = call(train.main, train.TrainConfig, argv, capsys)
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / 'run').exists()


def test_a_resume_under_a_recalibrated_table_is_refused_before_anything_is_written(tmp_path, capsys, stdlib_corpus):
    """The same keys are not the same run: a cost table recalibrated under the same path would charge the rest
    of the run differently; the resume is one line, and the saved run is as it was."""
    from conftest import StopAfter
    table = json.loads((ROOT / 'config' / 'rst' / 'gpt_L2_H2_D64_T64_V256_B8.json').read_text())
    path = tmp_path / 'table.json'
    path.write_text(json.dumps(table))
    cfg = train.TrainConfig(model='tiny', batch_size=8, budget_unit='iters', budget=4, compile_loss=False, sample_tokens=0,
                            eval_batches=2, peak_flops=1e12, log_interval=1, eval_interval=100, rst_table=str(path),
                            out_dir=str(tmp_path / 'run'))
    assert train.Trainer(cfg, StopAfter(8, 2)).run()['interrupted']
    before = {p.name: p.read_bytes() for p in (tmp_path / 'run').iterdir() if p.is_file()}
    table['fwd_bwd']['2'] *= 1.5
    path.write_text(json.dumps(table))
    argv = ['--model=tiny', '--batch_size=8', '--budget_unit=iters', '--budget=4', '--compile_loss=False',
            '--sample_tokens=0', '--eval_batches=2', '--peak_flops=1e12', '--log_interval=1', '--eval_interval=100',
            f'--rst_table={path}', f"--out_dir={tmp_path / 'run'}", '--init_from=resume']
    code, err = call(train.main, train.TrainConfig, argv, capsys)
    assert code == 2 and len(err) == 1 and 'another RST cost table' in err[0], err
    after = {p.name: p.read_bytes() for p in (tmp_path / 'run').iterdir() if p.is_file() and p.name != 'lock'}
    assert after == {k: v for k, v in before.items() if k != 'lock'}


def test_a_resume_on_a_corpus_edited_anywhere_is_refused(tmp_path, capsys, stdlib_corpus):
    """The corpus's fingerprint names every token: one token changed far past the first 2**20 of the train
    split, the counts the same (an edit, or a re-prepare of an input changed in place), and the resume is one
    line with the saved run as it was (the fingerprint read only the first 2**20 tokens of each split)."""
    corpus = tmp_path / 'corpus'
    shutil.copytree(ROOT / 'data' / 'stdlib' / 'byte', corpus, ignore=shutil.ignore_patterns('*.lock', 'checked.json'))
    argv = ['--model=tiny', '--batch_size=8', '--budget_unit=iters', '--budget=4', '--compile_loss=False',
            '--sample_tokens=0', '--eval_batches=2', '--peak_flops=1e12', '--log_interval=1', '--eval_interval=100',
            f'--dataset={corpus}', f"--out_dir={tmp_path / 'run'}"]
    assert cli(lambda cfg: train.Trainer(cfg, StopAfter(8, 2)).run(), train.TrainConfig, argv)['interrupted']
    before = {p.name: p.read_bytes() for p in (tmp_path / 'run').iterdir() if p.is_file() and p.name != 'lock'}
    tokens = np.memmap(corpus / 'train.bin', dtype=np.uint16, mode='r+')
    at = len(tokens) - 1000
    assert at > 4 << 20
    tokens[at] = (int(tokens[at]) + 1) % 256
    tokens.flush()
    del tokens
    code, err = call(train.main, train.TrainConfig, [*argv, '--init_from=resume'], capsys)
    assert code == 2 and len(err) == 1 and 'was saved with another corpus content' in err[0], err
    assert {p.name: p.read_bytes() for p in (tmp_path / 'run').iterdir() if p.is_file() and p.name != 'lock'} == before


def test_a_second_ctrl_c_after_the_last_step_names_the_resume(tiny_cfg, capsys, monkeypatch):
    """Ctrl-C during the closing sample (after the final checkpoint): exit 130 and one line naming
    --init_from=resume (the generic 'run the same command again' would be refused: the folder holds a run)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'sample_text', interrupted)
    cfg = tiny_cfg(budget=2, sample_tokens=5)
    argv = ['--model=tiny', '--batch_size=8', '--budget_unit=iters', '--budget=2', '--compile_loss=False',
            '--sample_tokens=5', '--peak_flops=1e12', f'--out_dir={cfg.out_dir}']
    code, err = call(train.main, train.TrainConfig, argv, capsys)
    assert (code, err) == (130, ['stopped by SIGINT before the run finished: --init_from=resume continues from the '
                                 'last checkpoint it saved'])
    monkeypatch.undo()
    assert call(train.main, train.TrainConfig, [*argv, '--init_from=resume'], capsys)[0] == 0


def test_a_ctrl_c_before_any_checkpoint_names_the_overwrite(tiny_cfg, capsys, monkeypatch):
    """Ctrl-C while the folder is being started (no checkpoint yet): the line names --overwrite=True, not a
    resume that has nothing to continue, and following it works."""
    start = train.Trainer.start_folder
    def interrupted(self, *args, **kwargs):
        start(self, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(train.Trainer, 'start_folder', interrupted)
    cfg = tiny_cfg(budget=2)
    argv = ['--model=tiny', '--batch_size=8', '--budget_unit=iters', '--budget=2', '--compile_loss=False',
            '--sample_tokens=0', '--peak_flops=1e12', f'--out_dir={cfg.out_dir}']
    code, err = call(train.main, train.TrainConfig, argv, capsys)
    assert (code, err) == (130, ['stopped by SIGINT before the run finished: it saved no checkpoint, so run the same '
                                 'command with --overwrite=True to start it again'])
    monkeypatch.undo()
    assert call(train.main, train.TrainConfig, [*argv, '--overwrite=True'], capsys)[0] == 0


def test_a_checkpoint_that_named_its_corpus_by_the_first_tokens_still_resumes(tiny_cfg, stdlib_corpus):
    """Checkpoints saved before whole-stream fingerprints hold the hash of each split's first 2**20 tokens:
    their resume compares that, so an upgrade does not strand a run in progress."""
    assert train.Trainer(tiny_cfg(budget=4), StopAfter(8, 2)).run()['interrupted']
    path = Path(tiny_cfg().out_dir) / 'ckpt.pt'
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['identity']['corpus'] == stdlib_corpus.fingerprint() != stdlib_corpus.fingerprint(whole=False)
    ckpt['identity']['corpus'] = stdlib_corpus.fingerprint(whole=False)
    torch.save(ckpt, path)
    assert train.train(tiny_cfg(budget=4, init_from='resume'))['steps'] == 4


# -----------------------------------------------------------------------------
# a checkpoint's write: a full disk is one line, a signal waits for the write

@pytest.mark.parametrize('failure', [RuntimeError('[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed'),
                                     RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs 1040'),
                                     OSError(28, 'No space left on device')])
def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, failure):
    import runs
    from configurator import UserError
    path = tmp_path / 'ckpt.pt'
    runs.save_checkpoint(path, {'step': 1})
    before = path.read_bytes()

    def full(obj, f):
        f.write(b'half a checkpoint')
        raise failure
    monkeypatch.setattr(runs.torch, 'save', full)
    with pytest.raises(UserError, match=r'cannot write the checkpoint .*ckpt.pt \((No space left on device|.*file write failed|'
                                        r'.*unexpected pos .*)\): '
                                        r'free space on that disk .* the previous checkpoint is kept'):
        runs.save_checkpoint(path, {'step': 2})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']
    monkeypatch.setattr(runs.torch, 'save', lambda obj, f: (_ for _ in ()).throw(RuntimeError('a bug, not the disk')))
    with pytest.raises(RuntimeError, match='a bug'):  # only the disk's failures become one line
        runs.save_checkpoint(path, {'step': 3})


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_checkpoint_write_is_delivered_after_it(tmp_path, monkeypatch, signum):
    """A second Ctrl-C (or a SIGTERM) inside torch.save: the write completes, then the signal reaches the
    handler that was in place (the loop's, which stops the run), once."""
    import runs
    path, seen = tmp_path / 'ckpt.pt', []
    real_save = torch.save

    def save_interrupted(obj, f):
        os.kill(os.getpid(), signum)  # lands mid-write
        real_save(obj, f)
    monkeypatch.setattr(runs.torch, 'save', save_interrupted)
    previous = signal.signal(signum, lambda s, frame: seen.append((s, path.exists())))
    try:
        runs.save_checkpoint(path, {'step': 5, 'w': torch.arange(3)})
    finally:
        signal.signal(signum, previous)
    assert seen == [(signum, True)]  # after the checkpoint was in place
    assert torch.load(path, weights_only=True)['step'] == 5


def test_ddp_ranks_agree_on_a_stop_that_reached_one_rank(tmp_path):
    """SIGTERM to rank 1 only, inside step 3: both ranks stop at the same step boundary, save one checkpoint
    together and leave identical weights; no rank waits in an all-reduce the other left ([rank1] tracebacks)."""
    out_dir = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'tests/ddp_ranks.py',
           '--model=tiny', '--batch_size=8', '--budget_unit=iters', '--budget=8', '--compile_loss=False',
           '--sample_tokens=0', '--log_interval=1', '--eval_batches=2', '--eval_interval=100', '--peak_flops=1e12',
           f'--out_dir={out_dir}']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'SIGTERM_RANK_STEP': '1:3', 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]  # ddp_ranks.py returns; train.py's cli exits 143
    assert 'Traceback' not in out.stderr and 'interrupted at step 4' in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert torch.load(out_dir / 'ckpt.pt', weights_only=True)['iter_num'] == 4  # step 3 (0-based) finished on both
    assert json.loads((out_dir / 'stopped.json').read_text())['signal'] == 'SIGTERM'
    ranks = [torch.load(out_dir / f'rank{r}.pt', weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


def test_a_stop_held_by_any_rank_stops_every_rank():
    import types
    from configurator import STOPPED
    import torch.distributed as dist
    for mine, other, want in (([], 0, False), ([], 15, True), ([2], 0, True), ([2], 15, True)):
        STOPPED.clear()
        rt = types.SimpleNamespace(reduce=lambda v, op: max(v, other) if op == dist.ReduceOp.MAX else None)
        stop = list(mine)
        assert train.agreed_stop(rt, stop) is want
        assert stop == (mine or ([other] if other else []))
        assert STOPPED == ([other] if other and not mine else [])  # a stop another rank received is this rank's too
    STOPPED.clear()
