"""studies/finals.py: a finished run's final checkpoint scored on every val window, beside the run's own
eval windows, and the table of both with the paired differences to the baseline."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from configurator import UserError
from data.loader import get_examples, num_examples, val_ids
from runs import load_model, read_run
from studies import finals
from studies.stats import paired_test

from conftest import ROOT


@pytest.fixture(scope='module')
def corpus():
    """A small byte corpus of this Python's own library (its val split a few hundred windows, so scoring all
    of it takes a second), under data/text/ for the module, removed afterwards."""
    import os
    import shutil
    import sysconfig
    from data.loader import DATA_ROOT, Corpus
    from data.text.prepare import PrepareConfig, prepare
    name = f'pytest_finals_{os.getpid()}'
    src = Path(sysconfig.get_paths()['stdlib'])
    text = ''.join((src / f).read_text() for f in ('argparse.py', 'textwrap.py', 'difflib.py', 'pathlib.py'))
    folder = DATA_ROOT / 'text' / name
    folder.mkdir(parents=True)
    (folder / 'input.txt').write_text(text)
    prepare(PrepareConfig(input=str(folder / 'input.txt'), name=name, doc_chars=4000, val_frac=0.2))
    yield f'text/{name}', Corpus(folder / 'byte')
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope='module')
def sweep(tmp_path_factory, corpus):
    """Two rows (the baseline and one other lr) x two paired seeds, tiny runs of 6 steps in a sweep's layout."""
    root = tmp_path_factory.mktemp('finals')
    for label, lr in (('baseline', 3e-3), ('slow', 1e-3)):
        for seed in (0, 1):
            train.train(train.TrainConfig(out_dir=str(root / label / 'b6' / f's{seed}'), dataset=corpus[0], label=label,
                                          lr=lr, seed=seed, model='tiny', batch_size=8, budget_unit='iters', budget=6,
                                          compile_loss=False, sample_tokens=0, peak_flops=1e12, eval_batches=2,
                                          eval_interval=1000, log_interval=1))
    finals.score([str(root)], finals.FinalsConfig())
    return root


def direct_loss(model, val, ids, T):
    """Mean next-token cross-entropy from the model's logits, one window at a time: not the fused loss evaluate uses."""
    x, y = get_examples(val, ids, T)
    total = 0.0
    with torch.no_grad():
        for xi, yi in zip(torch.as_tensor(x), torch.as_tensor(y)):
            logits = model.lm_head(model.hidden(xi[None]))[..., :model.config.n_tokens or None].float()
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), yi, reduction='sum').item()
    return total / (len(ids) * T)


def test_every_val_window_is_scored_and_the_checkpoint_is_the_run_s_last_model(sweep, corpus):
    run = sweep / 'slow' / 'b6' / 's1'
    rec = json.loads((run / finals.FILE).read_text())
    val = corpus[1].splits['val']
    model = load_model(run / 'ckpt.pt', torch.device('cpu'), compile_loss=False)
    T = model.config.block_size
    assert rec['windows'] == num_examples(val, T) and rec['eval_windows'] == 2 * 8
    assert rec['logged_final'] == read_run(run)['final']
    every = val_ids(val, T, num_examples(val, T))
    assert rec['val_loss'] == pytest.approx(direct_loss(model, val, every, T), rel=1e-5)


def test_the_table_pairs_seeds_on_both_window_sets(sweep):
    rec = {(label, s): json.loads((sweep / label / 'b6' / f's{s}' / finals.FILE).read_text())
           for label in ('baseline', 'slow') for s in (0, 1)}
    text = finals.report([str(sweep)])
    row = next(line for line in text.splitlines() if line.startswith('| slow |'))
    for i, k in ((7, 'logged_final'), (8, 'val_loss')):
        d, half, _ = paired_test([rec['slow', s][k] for s in (0, 1)], [rec['baseline', s][k] for s in (0, 1)])
        assert row.split('|')[i].strip() == f'{d:+.4f} [{d - half:+.4f}, {d + half:+.4f}] (n=2)'
    gap = [rec['slow', s]['val_loss'] - rec['slow', s]['logged_final'] for s in (0, 1)]
    assert row.split('|')[6].strip().startswith(f'{sum(gap) / 2:+.4f} [')


def test_a_checkpoint_that_is_not_the_last_model_is_refused_and_nothing_written(sweep, tmp_path):
    import shutil
    run = tmp_path / 'baseline' / 'b6' / 's0'
    shutil.copytree(sweep / 'baseline' / 'b6' / 's0', run)
    shutil.copytree(sweep / 'baseline' / 'b6' / 's1', tmp_path / 'baseline' / 'b6' / 's1')
    for seed in ('s0', 's1'):
        (tmp_path / 'baseline' / 'b6' / seed / finals.FILE).unlink()
    log = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    next(r for r in reversed(log) if 'val_loss' in r)['val_loss'] += 0.1  # the log of another model than the checkpoint's
    (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in log))
    with pytest.raises(UserError, match=r'1 run\(s\) not scored, the first .*s0: its checkpoint scores .* its log ends at'):
        finals.score([str(tmp_path)], finals.FinalsConfig())
    assert not (run / finals.FILE).exists() and (tmp_path / 'baseline' / 'b6' / 's1' / finals.FILE).exists()


def test_a_scored_run_is_skipped_a_stale_score_redone_and_a_damaged_file_refused(sweep, tmp_path, capsys):
    import shutil
    shutil.copytree(sweep / 'slow', tmp_path / 'slow')
    finals.score([str(tmp_path)], finals.FinalsConfig())
    assert capsys.readouterr().out.startswith('0 run(s) to score')
    stale = tmp_path / 'slow' / 'b6' / 's0' / finals.FILE  # a score of an earlier run in this folder: its final differs
    rec = json.loads(stale.read_text())
    stale.write_text(json.dumps({**rec, 'logged_final': rec['logged_final'] + 0.5, 'val_loss': 9.0}))
    assert finals.all_val_loss(read_run(stale.parent)) is None and '| 9.0' not in finals.report([str(tmp_path)])
    finals.score([str(tmp_path)], finals.FinalsConfig())
    assert capsys.readouterr().out.startswith('1 run(s) to score') and json.loads(stale.read_text()) == rec
    stale.write_text('{"val_loss": ')
    with pytest.raises(UserError, match='is damaged: delete it and score the run again'):
        finals.report([str(tmp_path)])


def test_runs_it_cannot_score_are_named_and_the_rest_scored(sweep, tmp_path, capsys):
    import shutil
    for seed in ('s0', 's1'):
        shutil.copytree(sweep / 'baseline' / 'b6' / seed, tmp_path / 'baseline' / 'b6' / seed)
        (tmp_path / 'baseline' / 'b6' / seed / finals.FILE).unlink()
    info = json.loads((tmp_path / 'baseline/b6/s0/config.json').read_text())
    info['config']['model_type'] = 't5'
    (tmp_path / 'baseline/b6/s0/config.json').write_text(json.dumps(info))
    finals.score([str(tmp_path)], finals.FinalsConfig())
    assert capsys.readouterr().out.startswith('1 run(s) to score; 1 not scored: a t5 run (GPT runs only)')
    assert (tmp_path / 'baseline/b6/s1' / finals.FILE).exists() and not (tmp_path / 'baseline/b6/s0' / finals.FILE).exists()


def test_the_command_needs_run_folders(tmp_path, capsys):
    p = subprocess.run([sys.executable, '-m', 'studies.finals'], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith('usage: python -m studies.finals RUN_FOLDER')
    with pytest.raises(SystemExit) as e:
        finals.main([str(tmp_path / 'none')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count('\n') == 0 and 'does not exist' in err


def test_a_device_this_machine_lacks_is_refused_before_anything_is_read():
    for device in ('tpu', 'cuda' if not torch.cuda.is_available() else 'mps:7'):
        with pytest.raises(UserError, match=f'--device={device} is not available on this machine'):
            finals.FinalsConfig(device=device)
