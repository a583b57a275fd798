"""train: learning happens, exact resume, Ctrl-C, atomic checkpoints, out_dir safety, init_from, the script,
and a two-process DDP run."""
import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import runs
import train
from configurator import UserError
from conftest import ROOT, StopAfter, load, read_log, run_script, without_timing
from model import GPT






def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_goes_down(tiny_cfg):
    result = train.train(tiny_cfg(budget=40, eval_interval=20, lr=3e-3))
    evals = [r for r in read_log(tiny_cfg().out_dir) if 'val_loss' in r]
    assert [r['step'] for r in evals] == [20, 40]
    first, last = evals[0]['val_loss'], evals[-1]['val_loss']
    assert last < first < math.log(256), (first, last)
    assert result['val_loss'] == last and result['steps'] == 40 and not result['interrupted']


def test_ctrl_c_saves_and_resume_is_bit_identical(tiny_cfg, tmp_path):
    N = 12
    kw = dict(budget=N, eval_interval=N // 2, dropout=0.1)  # dropout: the RNG state must resume too
    full = train.train(tiny_cfg(out_dir=str(tmp_path / 'a'), **kw))
    assert full['steps'] == N

    cut = train.train(tiny_cfg(out_dir=str(tmp_path / 'b'), **kw), StopAfter(8, N // 2))
    assert cut['interrupted'] and cut['steps'] == N // 2                 # Ctrl-C returns ...
    assert load(tmp_path / 'b')['iter_num'] == N // 2                    # ... after saving a checkpoint
    last = read_log(tmp_path / 'b')[-1]
    assert last['step'] == N // 2 and 'val_loss' in last

    resumed = train.train(tiny_cfg(out_dir=str(tmp_path / 'b'), init_from='resume', **kw))
    assert resumed['steps'] == N and resumed['val_loss'] == full['val_loss']
    log_a, log_b = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    evals_b = [r['step'] for r in log_b if 'val_loss' in r]
    assert len(evals_b) == len(set(evals_b)), (
        f'val records at steps {evals_b}: a Ctrl-C just after an eval evaluates and logs that step again '
        f'(train.py: skip the interrupt eval when this step was just evaluated and saved)')
    assert without_timing(log_b) == without_timing(log_a)               # every loss, lr and count, bit for bit
    a, b = load(tmp_path / 'a'), load(tmp_path / 'b')
    assert_same_tensors(a['model'], b['model'])
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert_same_tensors(sa, sb)


def test_a_run_begun_from_a_checkpoint_of_another_shape_resumes_as_that_shape(tiny_cfg, tmp_path):
    """--init_from=PATH takes the checkpoint's shape over --n_embd and the rest: resumed, the run is rebuilt
    from its own checkpoint (it was refused as 'damaged', the weights not fitting the keys' shape)."""
    train.train(tiny_cfg(out_dir=str(tmp_path / 'narrow'), n_embd=32, budget=2))
    kw = dict(budget=8, eval_interval=2, init_from=str(tmp_path / 'narrow' / 'ckpt.pt'))  # the keys say n_embd 64, the weights 32
    full = train.train(tiny_cfg(out_dir=str(tmp_path / 'a'), **kw))
    cut = train.train(tiny_cfg(out_dir=str(tmp_path / 'b'), **kw), StopAfter(8, 2))
    assert cut['interrupted'] and load(tmp_path / 'b')['model_args']['n_embd'] == 32
    again = tiny_cfg(out_dir=str(tmp_path / 'b'), **{**kw, 'init_from': 'resume'})
    assert train.train(again, StopAfter(8, 4))['interrupted']  # stopped again: its checkpoint now says init_from='resume'
    resumed = train.train(again)
    assert resumed['steps'] == 8 and resumed['val_loss'] == full['val_loss']
    assert without_timing(read_log(tmp_path / 'b')) == without_timing(read_log(tmp_path / 'a'))


def test_a_checkpoint_padded_to_another_vocab_multiple_names_it(tiny_cfg, tmp_path):
    """A run trained with --vocab_multiple=7 (vocab 259 for 256 ids) given as --init_from to a run at the
    default multiple: refused in one line naming --vocab_multiple=7 (it said to use the dataset it was trained
    on, which this is); with it, the run starts from the checkpoint."""
    train.train(tiny_cfg(out_dir=str(tmp_path / 'seven'), vocab_multiple=7, budget=2))
    path = tmp_path / 'seven' / 'ckpt.pt'
    with pytest.raises(UserError, match=r'has vocab 259, the data needs 256: give --vocab_multiple=7, as it was trained'):
        train.Trainer(tiny_cfg(out_dir=str(tmp_path / 'x'), init_from=str(path)))
    assert train.train(tiny_cfg(out_dir=str(tmp_path / 'y'), init_from=str(path), vocab_multiple=7, budget=2))['steps'] == 2


def test_checkpoint_contents(tiny_cfg):
    cfg = tiny_cfg(budget=6)
    train.train(cfg)
    ckpt = load(cfg.out_dir)  # weights_only=True: plain types and tensors only
    assert {'model', 'optimizer', 'model_args', 'iter_num', 'config'} <= set(ckpt)
    assert ckpt['iter_num'] == 6 and ckpt['config'] == dataclasses.asdict(cfg)
    assert {k: ckpt['model_args'][k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'bias')} \
        == dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256, bias=True)
    assert_same_tensors(GPT.from_checkpoint(ckpt).state_dict(), ckpt['model'])
    info = json.loads((Path(cfg.out_dir) / 'config.json').read_text())
    assert info['config']['budget'] == 6 and 'git_commit' in info and 'torch' in info


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(budget=8, eval_interval=4)
    real_save, calls = torch.save, []

    def save_then_die(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b'\x80\x02partial pickle')  # half a file, then the machine goes away
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', save_then_die)
    with pytest.raises(UserError, match=r'cannot write the checkpoint .*ckpt.pt \(disk full\).* the previous checkpoint is kept'):
        train.train(cfg)  # the second checkpoint (step 8) fails mid-write: one line
    monkeypatch.setattr(torch, 'save', real_save)
    assert len(calls) == 2
    assert runs.load_checkpoint(Path(cfg.out_dir) / 'ckpt.pt')['iter_num'] == 4
    result = train.train(dataclasses.replace(cfg, init_from='resume'))
    assert result['steps'] == 8 and load(cfg.out_dir)['iter_num'] == 8


def test_a_second_scratch_run_refuses_the_out_dir(tiny_cfg):
    cfg = tiny_cfg(budget=3)
    train.train(cfg)
    with pytest.raises(UserError, match='already holds a run'):
        train.train(cfg)
    assert load(cfg.out_dir)['iter_num'] == 3  # untouched
    train.train(dataclasses.replace(cfg, budget=2, overwrite=True))
    records = [r for r in read_log(cfg.out_dir) if 'train_loss' in r]
    assert [r['step'] for r in records] == [1, 2]  # the old run's log is gone, not appended to
    with pytest.raises(UserError, match='no checkpoint'):
        train.train(tiny_cfg(out_dir=cfg.out_dir + '_empty', init_from='resume'))


def test_init_from_a_checkpoint_path(tiny_cfg, tmp_path, capsys):
    """The checkpoint's shape wins over the keys' (model='small'): said in one line, and config.json records the
    model trained (model_args) beside the keys (it recorded only the keys' shape, not the model's)."""
    source = tiny_cfg(budget=5, out_dir=str(tmp_path / 'source'))
    train.train(source)
    path = tmp_path / 'source' / 'ckpt.pt'
    cfg = tiny_cfg(out_dir=str(tmp_path / 'finetune'), init_from=str(path), model='small', budget=2)
    capsys.readouterr()
    trainer = train.Trainer(cfg)
    assert trainer.model.config.n_layer == 2 and trainer.model.config.n_embd == 64  # the checkpoint's shape wins
    assert f"--init_from={path}: training its model (n_layer=2, n_head=2, n_embd=64, block_size=64); the shape keys' " \
           "n_layer=4, n_head=4, n_embd=128, block_size=128 are not used" in capsys.readouterr().out
    assert_same_tensors(trainer.model.state_dict(), load(tmp_path / 'source')['model'])
    assert trainer.iter_num == 0 and trainer.budget.spent['iters'] == 0 and not trainer.optimizer.state
    assert trainer.run()['steps'] == 2
    info = json.loads((tmp_path / 'finetune' / 'config.json').read_text())
    assert info['config']['model'] == 'small' and info['model_args'] == load(tmp_path / 'finetune')['model_args']
    assert (info['model_args']['n_layer'], info['model_args']['n_embd']) == (2, 64)
    with pytest.raises(UserError, match='no checkpoint'):
        train.Trainer(tiny_cfg(out_dir=str(tmp_path / 'x'), init_from=str(tmp_path / 'missing.pt')))


def test_train_script_end_to_end(tmp_path):
    out_dir = tmp_path / 'run'
    out = run_script('train.py', '--model=tiny', '--batch_size=8', '--budget_unit=iters', '--budget=30',
                     f'--out_dir={out_dir}', '--sample_tokens=20', timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    progress = [l for l in out.stdout.splitlines() if l.startswith('step ') and 'tok/s' in l and 'mfu' in l]
    assert progress and progress[-1].startswith('step 30 '), out.stdout
    assert '--- sample ---' in out.stdout
    for name in ('ckpt.pt', 'log.jsonl', 'config.json'):
        assert (out_dir / name).exists(), name
    final = read_log(out_dir)[-1]
    assert final['step'] == 30 and final['iters'] == 30 and math.isfinite(final['val_loss'])
    assert json.loads((out_dir / 'config.json').read_text())['config']['budget_unit'] == 'iters'


def test_ddp_two_processes(tiny_cfg, tmp_path):
    steps, out_dir = 10, tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
           '--model=tiny', '--batch_size=8', '--budget_unit=iters', f'--budget={steps}', '--compile_loss=False',
           '--sample_tokens=0', '--log_interval=1', '--eval_batches=4', '--peak_flops=1e12', f'--out_dir={out_dir}']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    log = read_log(out_dir)
    records = [r for r in log if 'train_loss' in r]
    assert len(records) == steps and math.isfinite(log[-1]['val_loss'])
    assert records[-1]['tokens'] == 2 * steps * 8 * 64            # both ranks' examples are counted
    assert records[-1]['train_loss'] < records[0]['train_loss']
    ddp = load(out_dir)['model']
    assert all(torch.isfinite(v).all() for v in ddp.values())
    # Rank r trains on slice r of one global batch of 16, and DDP averages the gradients: the same
    # update, up to float rounding, as one process with batch 16 (rank 1 must not repeat rank 0's data).
    single = tiny_cfg(out_dir=str(tmp_path / 'single'), batch_size=16, budget=steps)
    train.train(single)
    ref = load(single.out_dir)['model']
    assert max((ddp[k] - ref[k]).abs().max().item() for k in ref) < 1e-4


def test_sample_only_prints_samples_from_a_saved_run(tiny_cfg, capsys):
    """--sample_only=True: GPT continues --start; T5-lite fills a masked span after it; nothing is trained,
    nothing in the run folder changes."""
    for model_type, extra in (('gpt', {}), ('t5', dict(model='t5-tiny', block_size=32))):
        cfg = tiny_cfg(out_dir=str(Path(tiny_cfg().out_dir) / model_type), model_type=model_type, budget=2, **extra)
        train.train(cfg)
        before = {p.name: p.read_bytes() for p in Path(cfg.out_dir).iterdir()}
        capsys.readouterr()
        train.main(dataclasses.replace(cfg, init_from='resume', sample_only=True, start='def f(', num_samples=2,
                                       sample_tokens=20))
        out = capsys.readouterr().out
        samples = out.split('--- sample ')[1:]
        assert [s[:4] for s in samples] == ['1 --', '2 --'], out
        assert all(s.split('---\n', 1)[1].startswith('def f(') for s in samples), out
        if model_type == 't5':
            assert all(' => ' in s for s in samples), out
        assert {p.name: p.read_bytes() for p in Path(cfg.out_dir).iterdir()} == before


def test_wandb_logs_what_log_jsonl_holds(tiny_cfg, monkeypatch):
    wandb = pytest.importorskip('wandb', reason='wandb is an optional extra (pip install wandb)')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    logged = []
    real_init = wandb.init

    defined = {}

    def init(**kwargs):
        run = real_init(**kwargs)
        real_log, real_define = run.log, run.define_metric
        run.log = lambda record, **kw: (logged.append(dict(record)), real_log(record, **kw))[1]
        run.define_metric = lambda name, **kw: (defined.setdefault(name, kw), real_define(name, **kw))[1]
        return run
    monkeypatch.setattr(wandb, 'init', init)
    cfg = tiny_cfg(budget=4, eval_interval=2, wandb_log=True, wandb_run_name='t')
    train.train(cfg)
    assert logged == read_log(cfg.out_dir)
    assert defined['*'] == {'step_metric': 'step'} and {'step', 'tokens', 'rst'} <= set(defined)  # charts against steps
    assert all('step' in r for r in logged)
    assert any((Path(cfg.out_dir) / 'wandb').glob('offline-run-*'))   # the offline run's files, for `wandb sync`


def test_wandb_missing_is_one_line(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)                   # import wandb raises ImportError
    with pytest.raises(UserError, match='pip install wandb'):
        train.train(tiny_cfg(budget=2, wandb_log=True))


def test_wandb_that_cannot_start_is_one_line_naming_offline_mode(tiny_cfg, monkeypatch):
    """No login and no network (wandb raises its UsageError): one line that names WANDB_MODE=offline, no run written."""
    class UsageError(Exception):
        pass

    def init(**kwargs):
        raise UsageError('No API key configured. Use `wandb login` to log in.')
    monkeypatch.setitem(sys.modules, 'wandb', types.SimpleNamespace(init=init))
    cfg = tiny_cfg(budget=2, wandb_log=True)
    with pytest.raises(UserError, match=r'^--wandb_log=True: wandb did not start \(UsageError: No API key configured.*'
                                        r'WANDB_MODE=offline to log locally$'):
        train.train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_a_resume_refused_for_a_missing_extra_leaves_the_log_as_it_was(tiny_cfg, monkeypatch):
    """A resume trims log.jsonl to its checkpoint (records a killed run wrote after it): only once every
    refusal is past. Here the refusal is wandb missing, and the log keeps its bytes."""
    cfg = tiny_cfg(budget=4, eval_interval=2)
    train.train(cfg)
    log = Path(cfg.out_dir) / 'log.jsonl'
    with open(log, 'a') as f:
        f.write(json.dumps({'step': 99, 'train_loss': 1.0}) + '\n')  # what a resume would trim
    before = log.read_bytes()
    monkeypatch.setitem(sys.modules, 'wandb', None)
    with pytest.raises(UserError, match='pip install wandb'):
        train.train(dataclasses.replace(cfg, init_from='resume', wandb_log=True))
    assert log.read_bytes() == before


def test_setup_device_gives_cuda_an_index(monkeypatch):
    """--device=cuda reaches torch.cuda.set_device as cuda:0: torch 2.11 refuses a bare 'cuda' there, which
    stopped every train.py, rho.py, slm.py and madpo.py run on the first GPU this project was lent (H200)."""
    set_to = []

    def set_device(device):
        if device.index is None:  # what torch 2.11 raises
            raise ValueError(f'Expected a torch.device with a specified index or an integer, but got:{device}')
        set_to.append(device)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', set_device)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: True)
    rt = runs.setup_device(train.TrainConfig(device='cuda'))
    assert rt.device == torch.device('cuda', 0) and set_to == [torch.device('cuda', 0)] and rt.dtype == torch.bfloat16
    with pytest.raises(UserError, match='not available'):
        runs.setup_device(train.TrainConfig(device='cuda:1'))


def test_sampling_keys_and_a_prompt_from_a_file(tiny_cfg, tmp_path, capsys):
    """nanoGPT's sampling habits: --temperature (0 = greedy), --top_k (1 = greedy too), --start=FILE:path."""
    import dataclasses
    cfg = tiny_cfg(budget=3)
    train.train(cfg)
    capsys.readouterr()
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('def main(')
    samples = []
    for temperature, top_k in ((0.0, 40), (1.0, 1), (0.0, 0)):
        train.sample_only(dataclasses.replace(cfg, init_from='resume', sample_only=True, start=f'FILE:{prompt}',
                                              num_samples=1, sample_tokens=20, temperature=temperature, top_k=top_k))
        samples.append(capsys.readouterr().out)
    assert all(s.split('---\n', 2)[-1].startswith('def main(') for s in samples), samples
    assert samples[0] == samples[1] == samples[2]  # greedy three ways
    with pytest.raises(train.UserError, match='no file at'):
        dataclasses.replace(cfg, start=f'FILE:{tmp_path}/nope.txt')
    with pytest.raises(train.UserError, match='not a regular file at'):  # a folder; a FIFO would block the read
        dataclasses.replace(cfg, start=f'FILE:{tmp_path}')
    (tmp_path / 'latin1.txt').write_bytes(b'\xff\xfe caf\xe9')
    with pytest.raises(train.UserError, match='cannot read .*latin1.txt as UTF-8'):  # before the run, not after it
        dataclasses.replace(cfg, start=f"FILE:{tmp_path / 'latin1.txt'}")


def test_gpt2_tokens_train_offline_and_only_the_sample_needs_the_tokenizer(tmp_path, tiny_cfg, monkeypatch):
    """nanoGPT's gpt2 bins, imported: training reads ids, so a machine that cannot load gpt2's files (offline)
    trains with --sample_tokens=0 (the vocabulary padded to 50304); asking for a sample says so before training."""
    import numpy as np
    import configurator
    from data import import_bins
    from data.loader import DataError
    folder = tmp_path / 'owt'
    folder.mkdir()
    for split, n in (('train', 20_000), ('val', 2_000)):
        ids = np.random.default_rng(len(split)).integers(0, 50257, n).astype(np.uint16)
        ids[::50] = 50256  # documents end with end-of-text, as nanoGPT writes them
        ids.tofile(folder / f'{split}.bin')
    configurator.cli(import_bins.import_bins, import_bins.ImportConfig, [f'--input={folder}', f'--out_dir={tmp_path / "corpus"}'])

    def offline(name):
        raise DataError(f"cannot load tokenizer '{name}' (offline)")
    monkeypatch.setattr(train, 'get_tokenizer', offline)
    result = train.train(tiny_cfg(dataset=str(tmp_path / 'corpus'), tokenizer='gpt2', budget=2, sample_tokens=0))
    assert result['steps'] == 2 and math.isfinite(result['val_loss'])
    with pytest.raises(DataError, match=r"cannot load tokenizer 'gpt2' \(offline\); or train without the final sample: --sample_tokens=0"):
        train.train(tiny_cfg(dataset=str(tmp_path / 'corpus'), tokenizer='gpt2', budget=2, sample_tokens=10,
                             out_dir=str(tmp_path / 'b')))
    assert not (tmp_path / 'b' / 'log.jsonl').exists()
