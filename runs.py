"""A run's surroundings: the device it runs on, the model it starts from, and the run folder, which
train.py writes and everything else reads: its checkpoint, log and config, the rules for continuing it,
and its lock.

    out_dir/ckpt.pt      one dict: the model (+ model_args), optimizer, budget, data position, RNG states, the
                         method and the config; loaded with weights_only=True (nanoGPT's checkpoints load too)
    out_dir/log.jsonl    one JSON record per line: train steps, evals, what methods log
    out_dir/config.json  the run's keys, command line, git commit, versions
    out_dir/lock         held (an flock) while a run writes the folder

setup_device gives every entry point its Runtime (device, DDP rank, autocast dtype); build_model makes a
run's model, fresh (after check_memory says it fits) or from --init_from=PATH. A resumed run must be the
saved run (check_resume_config, check_resume_method); the lab (studies/) reads finished runs (read_run); method
files load saved models (load_model) to score with or start from. It is a file of its own because all of
them need these and the lab must not import the training loop.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from configurator import ConfigError, UserError, require_writable, signals_deferred
from data.loader import DataError, FolderLock, atomic_write, atomic_write_bytes, file_sha256, read_result
from model import MODELS, PRESETS, model_vocab_size


# -----------------------------------------------------------------------------
# where a run runs: the device, DDP, the autocast dtype, and whether the model fits

@dataclass
class Runtime:
    """Where this process runs: its device, the autocast dtype, and its rank among world_size (DDP)."""
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def print(self, *args):
        if self.master:
            print(*args, flush=True)

    def reduce(self, value, op):
        """A float reduced over the ranks (op: dist.ReduceOp.MAX, AVG, ...); the value itself in one process."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=op)
        return t.item()


def setup_device(cfg):
    """The Runtime --device and --dtype name; under torchrun (RANK is set) this process joins the group."""
    ddp = 'RANK' in os.environ
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    name = cfg.device
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if ddp and name.startswith('cuda'):
        name = f'cuda:{local}'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got '{cfg.device}'") from None
    here = {'cpu': True, 'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available()}
    if not here.get(device.type, False) or (device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f'--device={cfg.device} is not available on this machine: use --device=auto or --device=cpu')
    if device.type == 'cuda':
        device = torch.device('cuda', device.index or 0)  # set_device refuses a bare 'cuda' (torch 2.11)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}.get(cfg.dtype)
    if cfg.dtype == 'auto':
        dtype = torch.bfloat16 if device.type == 'cuda' and torch.cuda.is_bf16_supported() else torch.float32
    return Runtime(device, dtype, rank, world, local)


def free_memory(device):
    """Bytes this process could still allocate on device (CPU: the kernel's MemAvailable)."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def check_memory(cfg, vocab_size, device):
    """Refuse, before allocating, a configuration whose training step cannot fit: fp32 weights, grads and
    two optimizer moments (16 bytes a parameter), plus one micro-batch's activations (a lower bound: ~16
    fp32 values of width n_embd per token and block, the attention scores, one chunk of loss logits)."""
    d = cfg.model_dims()
    L, C, T, B = d['n_layer'], d['n_embd'], d['block_size'], cfg.batch_size
    params = 12 * L * C * C + (vocab_size + T) * C
    activations = B * T * L * (16 * C + 2 * d['n_head'] * T) + 2048 * vocab_size
    need, have = 16 * params + 4 * activations, free_memory(device)
    if need > have:
        raise UserError(f'this configuration needs at least {need / 2**30:.1f} GiB (weights, gradients, optimizer '
                        f'state, one micro-batch), {device} has {have / 2**30:.1f} GiB free: lower --batch_size '
                        f'(raise --grad_accum to keep the step), --block_size or the model size')


# -----------------------------------------------------------------------------
# checkpoints, and the model a run starts from

def save_checkpoint(path, ckpt):
    """Write a checkpoint whole or not at all: to a temporary swapped in (a crash mid-write leaves the previous
    checkpoint), with Ctrl-C and SIGTERM held until it is written. A full disk, torch.save's RuntimeError
    or an OSError, is one line; the previous checkpoint is kept."""
    try:
        with signals_deferred():
            atomic_write(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and 'write' not in str(e).lower() and 'inline_container' not in str(e):
            raise  # not the disk (torch's zip writer names itself, or the write, when the disk fails it): a bug
        reason = e.strerror if isinstance(e, OSError) and e.strerror else ' '.join(str(e).split()).split('] ')[-1][:160]
        raise UserError(f'cannot write the checkpoint {path} ({reason}): free space on that disk or give another '
                        '--out_dir; the previous checkpoint is kept') from None


MODEL_ARGS = ('vocab_size', 'block_size', 'n_layer', 'n_embd')  # what every checkpoint's model_args must give


def load_checkpoint(path):
    """A checkpoint dict: ours, or nanoGPT's (model + model_args); pickled code is never run."""
    if not path.is_file():
        raise UserError(f'no checkpoint at {path}: check --init_from and --out_dir (or start with --init_from=scratch)')
    try:
        with warnings.catch_warnings():  # a garbage file can make the unpickler warn before it fails
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'checkpoint {path} is unreadable ({type(e).__name__}): it is corrupt or not ours') from None
    args = ckpt.get('model_args') if isinstance(ckpt, dict) else None
    if not (isinstance(ckpt.get('model') if args is not None else None, dict) and isinstance(args, dict)
            and all(isinstance(args.get(k), int) and args[k] > 0 for k in MODEL_ARGS)):
        raise UserError(f"{path} is not a model checkpoint (a dict with 'model' weights and 'model_args' giving "
                        f"{', '.join(MODEL_ARGS)})")
    if not isinstance(ckpt.get('config', {}), dict):
        raise UserError(f"{path} is damaged: its 'config' is a {type(ckpt['config']).__name__}, not a dict of keys: "
                        f"use an intact checkpoint")
    return ckpt


def checkpoint_model_type(ckpt):
    return ckpt.get('config', {}).get('model_type', 'gpt')  # nanoGPT's checkpoints are GPTs


@contextlib.contextmanager
def refused_if_damaged(path, what, fix):
    """Loading a checkpoint's pieces: an error on the way (a weight missing or of another shape, a state
    without its keys) is one line naming the file, what failed and the fix."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError, AttributeError, IndexError) as e:
        raise UserError(f"checkpoint {path} {what} ({type(e).__name__}: {' '.join(str(e).split())[:120]}): {fix}") from None


def model_from_checkpoint(ckpt, path, **overrides):
    """The model a checkpoint holds; one whose model_args do not describe its weights is refused."""
    with refused_if_damaged(path, 'does not match its own model_args', 'it is damaged or not a model checkpoint'):
        return MODELS[checkpoint_model_type(ckpt)][0].from_checkpoint(ckpt, **overrides)


def checkpoint_model(cfg, ckpt, path, vocab_size, device):
    """The model a checkpoint holds, checked against the run's model type and data (vocab), on device."""
    model_type = checkpoint_model_type(ckpt)
    if model_type != cfg.model_type:
        raise UserError(f"{path} holds a '{model_type}' model: pass --model_type={model_type}")
    want = {model_vocab_size(model_type, vocab_size, ckpt['model_args']['block_size'], m) for m in (1, cfg.vocab_multiple)}
    if ckpt['model_args']['vocab_size'] not in want:  # padded or not: a checkpoint of before the padding, nanoGPT's
        saved = ckpt.get('config', {}).get('vocab_multiple')  # padded to another multiple than this run's: say which
        padded = isinstance(saved, int) and saved > 0 and ckpt['model_args']['vocab_size'] == model_vocab_size(
            model_type, vocab_size, ckpt['model_args']['block_size'], saved)
        fix = f'give --vocab_multiple={saved}, as it was trained' if padded else 'use the dataset and tokenizer it was trained with'
        raise UserError(f"{path} has vocab {ckpt['model_args']['vocab_size']}, the data needs "
                        f"{' or '.join(map(str, sorted(want)))}: {fix}")
    data_ids = {'n_tokens': vocab_size} if model_type == 'gpt' else {}  # never sample a padded id
    return model_from_checkpoint(ckpt, path, dropout=cfg.dropout, compile_loss=cfg.compile_loss, **data_ids).to(device)


def load_model(path, device, compile_loss=True, check=None):
    """A saved model for scoring or sampling (a reference, IL or reward backbone): frozen, in eval mode.
    check(ckpt): the caller's refusal of a checkpoint that does not fit its use, before the model is built."""
    ckpt = load_checkpoint(Path(path))
    if check is not None:
        check(ckpt)
    model = model_from_checkpoint(ckpt, path, dropout=0.0, compile_loss=compile_loss)
    return model.to(device).eval().requires_grad_(False)


def build_model(cfg, vocab_size, device, saved=None):
    """A fresh model from the config, or one initialised from --init_from=PATH (its shape wins), on device.
    saved: the run's own checkpoint, which a resume rebuilds (a run begun from a checkpoint has its shape,
    whatever --n_embd and the rest say)."""
    if saved is not None or cfg.init_from.endswith('.pt'):
        path = Path(cfg.out_dir) / 'ckpt.pt' if saved is not None else Path(cfg.init_from)
        return checkpoint_model(cfg, saved if saved is not None else load_checkpoint(path), path, vocab_size, device)
    check_memory(cfg, vocab_size, device)
    model_cls, config_cls = MODELS[cfg.model_type]
    dims = cfg.model_dims()
    data_ids = {'n_tokens': vocab_size} if cfg.model_type == 'gpt' else {}
    return model_cls(config_cls(vocab_size=model_vocab_size(cfg.model_type, vocab_size, dims['block_size'], cfg.vocab_multiple),
                                dropout=cfg.dropout, bias=cfg.bias, compile_loss=cfg.compile_loss, **data_ids, **dims)).to(device)


# -----------------------------------------------------------------------------
# continuing a run

RESUME_KEYS = ('optimizer', 'budget', 'data', 'objective', 'arch', 'active_layers', 'iter_num', 'val_loss', 'rng')
# keys a resumed run may change: where and how it runs, how often it reports; every other key (the data,
# the model, the method, the budget and its schedule) is what the saved run is, and may not change
MAY_CHANGE_ON_RESUME = {'out_dir', 'rst_repeats', 'init_from', 'overwrite', 'eval_interval', 'log_interval', 'sample_tokens',
                        'sample_only', 'start', 'num_samples', 'temperature', 'top_k', 'wandb_log', 'wandb_project', 'wandb_run_name',
                        'device', 'dtype', 'compile', 'compile_loss', 'peak_flops', 'skip_nonfinite'}


def method_name(objective):
    """A run's method: the script and class of its objective (rho.SelectiveBackprop). A class that only
    wraps another objective (a test's interruption, say) has wraps_objective = True and is skipped."""
    cls = next(c for c in type(objective).__mro__ if not getattr(c, 'wraps_objective', False))
    module = sys.modules.get(cls.__module__)
    return f"{Path(getattr(module, '__file__', None) or cls.__module__).stem}.{cls.__name__}"


def check_resume_config(cfg, ckpt, path):
    """A resumed run must be the saved run: the same value of every key that is not in MAY_CHANGE_ON_RESUME
    (checked before anything is loaded or written; one line names the first difference)."""
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise UserError(f'{path} cannot be resumed (it lacks {", ".join(missing)}): start from it with '
                        f'--init_from={path} instead')
    spent = ckpt['budget'].get(cfg.budget_unit) if isinstance(ckpt['budget'], dict) else None
    if not isinstance(spent, (int, float)):  # {} would resume with nothing spent
        raise UserError(f"{path} cannot be resumed: its budget state holds no '{cfg.budget_unit}' spent (it is "
                        f"damaged): resume from an intact copy, or start again with --init_from=scratch --overwrite=True")
    saved, now = ckpt.get('config', {}), dataclasses.asdict(cfg)
    for k in sorted((saved.keys() | now.keys()) - MAY_CHANGE_ON_RESUME):
        was, new = saved.get(k, now.get(k)), now.get(k, saved.get(k))
        if (tuple(was) if isinstance(was, list) else was) != new:
            raise UserError(f'--{k}={new!r} differs from the saved run ({k}={was!r}) in {path.parent}: resume '
                            f'with the same value, or start a new run in another --out_dir')


def check_resume_method(ckpt, method, path):
    """...and the same method: a Selective Backprop run is not continued by train.py, nor a baseline by rho.py."""
    saved_method = ckpt.get('method', method)  # checkpoints from before methods were recorded: not checked
    if saved_method != method:
        raise UserError(f'{path} is a {saved_method} run, this command would continue it as {method}: resume it '
                        f'with {saved_method.split(".")[0]}.py, or start a new run in another --out_dir')


# -----------------------------------------------------------------------------
# the folder: config.json, its lock, the log

def run_info(cfg):
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ''
    return {'config': dataclasses.asdict(cfg), 'argv': sys.argv, 'git_commit': commit,
            'python': sys.version.split()[0], 'torch': torch.__version__}


def prepare_out_dir(cfg, out_dir, master):
    """Refuse to train from scratch over an existing run unless asked to, or in a folder with a folder where
    the run's files go. Nothing is deleted here: with --overwrite=True the old run's checkpoint and log go
    when the new run starts (Trainer.start_folder), so a call that fails a later check (data, checkpoint,
    device) leaves the old run as it was."""
    ckpt, log = out_dir / 'ckpt.pt', out_dir / 'log.jsonl'
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f'--out_dir={out_dir} is a file: give a folder')
    for name in ('ckpt.pt', 'log.jsonl', 'config.json', 'lock'):
        if (out_dir / name).is_dir():
            raise UserError(f'{out_dir / name} is a folder where the run keeps its {name}: move it away, or use another --out_dir')
    if cfg.init_from != 'resume' and (ckpt.exists() or log.exists()) and not cfg.overwrite:
        raise UserError(f'{out_dir} already holds a run: use --init_from=resume to continue it, '
                        f'--overwrite=True to replace it, or another --out_dir')
    if master:
        require_writable(out_dir / 'ckpt.pt')
        out_dir.mkdir(parents=True, exist_ok=True)


def format_seconds(s):
    return '?' if s is None else f'{int(s // 60)}m{int(s % 60):02d}s'


PROGRESS_EVERY = 30.0  # seconds between the progress lines of a pass outside the loop (which logs its own)


def progress(what, total, unit, start=0, every=None):
    """A callback done -> `what: done/total unit (share) | rate | eta`, printed at most every `every` seconds
    and when done reaches total, so a long pass (a precompute, a sampling) is never silent for a minute.
    start: units done before this process began (a resumed pass), left out of the rate. every: None = PROGRESS_EVERY."""
    t0, last, every = time.time(), [time.time()], PROGRESS_EVERY if every is None else every

    def report(done):
        now = time.time()
        if now - last[0] >= every or done >= total:
            last[0], rate = now, (done - start) / max(now - t0, 1e-9)
            print(f'{what}: {done:,}/{total:,} {unit} ({done / total:.0%}) | {rate:,.0f} {unit}/s | '
                  f'eta {format_seconds((total - done) / max(rate, 1e-9))}', flush=True)
    return report


def start_wandb(cfg, saved):
    """--wandb_log=True: a Weights & Biases run that receives every log.jsonl record (WANDB_MODE=offline
    works without network); a resumed run continues the saved wandb run."""
    try:
        import wandb
    except ImportError:
        raise UserError('--wandb_log=True needs the optional package wandb: pip install wandb') from None
    run_id = (saved or {}).get('wandb_id') or uuid.uuid4().hex[:8]
    try:
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or cfg.out_dir, id=run_id, resume='allow',
                         config=dataclasses.asdict(cfg), dir=cfg.out_dir)
    except Exception as e:  # no login, no network, a bad project name: wandb's own error types vary by version
        raise UserError(f"--wandb_log=True: wandb did not start ({type(e).__name__}: {' '.join(str(e).split())[:120]}): "
                        f'log in with `wandb login`, or run with WANDB_MODE=offline to log locally') from None
    for axis in WANDB_AXES:  # plotted against the run's step by default, not wandb's count of records
        run.define_metric(axis)
    run.define_metric('*', step_metric='step')
    return run


WANDB_AXES = ('step', 'tokens', 'rst', 'flops')  # x-axes a chart can pick in wandb (every record carries step)


def trim_log(log_path, iter_num):
    """After a resume, drop log records written after the checkpoint we resumed from."""
    if log_path.exists():
        kept = [r for r in read_log(log_path) if not isinstance(r.get('step', 0), (int, float)) or r.get('step', 0) <= iter_num]
        atomic_write_bytes(log_path, ''.join(json.dumps(r) + '\n' for r in kept).encode())


@contextlib.contextmanager
def locked_out_dir(cfg):
    """Checks out_dir (prepare_out_dir), then holds out_dir/lock for the run: a second run on the folder
    refuses while the first lives; a lock left by a dead process (kill -9) is free again. A run that fails
    before writing removes the (empty) folders it made."""
    out_dir, master = Path(cfg.out_dir), int(os.environ.get('RANK', 0)) == 0
    new = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # the folders prepare_out_dir makes, deepest first
    prepare_out_dir(cfg, out_dir, master)
    if not master:
        yield
        return
    with locked_folder(out_dir, new):
        for leftover in out_dir.glob('*.tmp[0-9]*'):  # a killed writer's temporary: no live writer holds the lock
            leftover.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def locked_folder(out_dir, made=None):
    """out_dir/lock held while a run (or a stage that trains nothing, MADPO's pairs) writes the folder: a second
    one refuses while the first lives, and a lock left by a dead process (kill -9) is free again. made: the
    folders made for it, deepest first (default: those not there yet), removed again if it fails before writing
    (bad data, table, tokenizer), so it leaves no empty folder."""
    out_dir = Path(out_dir)
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()] if made is None else made
    try:
        with FolderLock(out_dir / 'lock', in_use(out_dir)):
            yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def in_use(out_dir):
    """The refusal a run folder's lock raises while another process holds it."""
    return lambda pid: UserError(f'{out_dir} is in use by another run (pid {pid}): wait for it to end, or use another --out_dir')


@contextlib.contextmanager
def locked_folders(folders):
    """Hold the lock of each existing run folder in folders (one that does not exist holds no run): a
    process about to write into other runs' folders (a WSD trunk, its branches' checkpoints) refuses while
    any of them is in use, before it has changed anything. Under DDP rank 0 holds them, as it holds out_dir's."""
    if int(os.environ.get('RANK', 0)) != 0:
        yield
        return
    with contextlib.ExitStack() as stack:
        for folder in folders:
            if Path(folder).is_dir():
                stack.enter_context(locked_folder(folder, made=[]))
        yield


# -----------------------------------------------------------------------------
# reading finished runs (the lab's compare, ablate, tune)

def derive_label(c):
    if c.get('label'):
        return c['label']
    if c.get('method'):
        return c['method']
    if c.get('arch', 'full') != 'full':
        return c['arch']
    if c.get('optimizer', 'adamw') != 'adamw':
        return c['optimizer']
    return 'wsd' if c.get('schedule') == 'wsd' else 'baseline'


def eval_windows(c):
    """(block_size, n) of the val windows a GPT run's evals score (loader.val_ids), or None (T5-lite scores
    span-corrupted examples; a config without the keys)."""
    try:
        T = c.get('block_size') or PRESETS[c['model']]['block_size']
        return (int(T), int(c['eval_batches']) * int(c['batch_size'])) if c.get('model_type', 'gpt') == 'gpt' else None
    except (KeyError, TypeError, ValueError):
        return None


def system_suffix(c):
    """' [h200]' for a run charged under another RST table than its shape's default (--rst_table=
    config/rst/h200/...: the folder names the reference system, else the file does): a row of its own."""
    table = c.get('rst_table') if c.get('budget_unit') == 'rst' else ''
    if not isinstance(table, str) or not table:
        return ''
    path = Path(table)
    return f' [{path.parent.name if path.parent.name not in ("", ".", "rst") else path.stem}]'


def records_config(folder, values, ignore=('init_from', 'overwrite')):
    """Whether folder/config.json records a run with these config values (a dict: a config's asdict, or
    the keys a command line gives; how it was started aside): a finished run of it can be reused, a killed
    one resumed, any other must not be."""
    return config_difference(folder, values, ignore) is None


def config_difference(folder, values, ignore=('init_from', 'overwrite')):
    """None when folder/config.json records these values, else (key, saved value, planned value) of the first
    key that differs (saved None: no readable config.json, or the key is missing from it)."""
    path = Path(folder) / 'config.json'
    try:
        saved = json.loads(path.read_text()).get('config', {}) if path.is_file() else None
    except (ValueError, AttributeError):
        saved = None
    planned = json.loads(json.dumps(values))
    if not isinstance(saved, dict):
        return ('config.json', None, 'a run of these keys')
    return first_difference(saved, planned, ignore, keys=planned)


MISSING = '(absent)'  # a key one config has and the other not


def first_difference(a, b, ignore=(), keys=None):
    """(key, a's value, b's value) of the first of keys (default: both configs' keys, sorted) outside ignore on
    which two configs differ, or None: the one rule for "is this the same run" and "is this the same row"."""
    keys = sorted(a.keys() | b.keys()) if keys is None else keys
    return next(((k, a.get(k, MISSING), b.get(k, MISSING)) for k in keys
                 if k not in ignore and a.get(k, MISSING) != b.get(k, MISSING)), None)


def read_log(log_path):
    """log.jsonl's records; a line that is not a JSON object (the partial last line of a killed run) is dropped."""
    records = []
    for line in log_path.read_text(errors='replace').splitlines() if log_path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_run(path):
    """A run folder -> its label, budget, seed, evals [(rst, tokens, val_loss)], steps, and completeness;
    a folder that is not a run's, or whose files were damaged or edited out of shape: {'error': ...}."""
    path = Path(path)
    try:
        info = json.loads((path / 'config.json').read_text())
        c = info['config']
        if not (path / 'log.jsonl').is_file():
            raise FileNotFoundError(path / 'log.jsonl')
        records = read_log(path / 'log.jsonl')
        if not (isinstance(c['budget'], (int, float)) and isinstance(c['budget_unit'], str) and isinstance(c['seed'], int)):
            raise TypeError('budget')  # a config.json without them is not a run's
        evals = [r for r in records if 'val_loss' in r]
        if not all(isinstance(r.get(k), (int, float)) for r in evals for k in ('val_loss', 'tokens', 'step')):
            raise TypeError('val_loss')
        # complete: the final eval was logged with the budget spent (a run's last record); a later step's progress
        # line alone is not enough: a damaged final record must not leave an earlier eval passing for the final
        spent = evals[-1].get(c['budget_unit']) if evals else None
        return {'path': str(path), 'label': derive_label(c) + system_suffix(c), 'budget': c['budget'], 'unit': c['budget_unit'],
                'seed': c['seed'], 'steps': max((r.get('step', 0) for r in records), default=0),
                'evals': [(e.get('rst'), e['tokens'], e['val_loss']) for e in evals],
                'final': evals[-1]['val_loss'] if evals else None,
                'complete': isinstance(spent, (int, float)) and spent >= c['budget'],
                'dataset': c.get('dataset'), 'tokenizer': c.get('tokenizer'), 'stats': logged_means(records),
                'eval_windows': eval_windows(c), 'script': script_of(info), 'shape': tuple(c.get(k) for k in SHAPE_KEYS),
                'rst_by_entry': rst_by_entry(evals[-1]) if evals else {}}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {'path': str(path), 'error': f'unreadable ({type(e).__name__})'}


SHAPE_KEYS = ('model_type', 'model', 'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'batch_size', 'grad_accum')


def script_of(info):
    """The entry point that wrote a run folder (config.json's argv[0]: 'train.py', 'rho.py', ...), '' if unknown."""
    argv = info.get('argv') if isinstance(info, dict) else None
    return Path(argv[0]).name if isinstance(argv, list) and argv and isinstance(argv[0], str) else ''


def rst_by_entry(record):
    """The RST each cost entry charged, if it adds up to the record's RST (a run resumed from a checkpoint
    older than the count has only part of it: {})."""
    entries, rst = record.get('rst_by_entry') or {}, record.get('rst')
    return entries if rst and abs(sum(entries.values()) - rst) <= 1e-6 * rst else {}


METHOD_STATS = ('selected_frac', 'win_rate', 'il_val_loss')  # what methods log about themselves (see method_stats)
IL_LABEL = 'rho_il'  # the label of RHO-LOSS's IL model runs: trained for the rho rows, not a row of a comparison


def logged_means(records):
    """The mean of each method statistic over a run's log records (see method_stats)."""
    out = {}
    for name in METHOD_STATS:
        values = [r[name] for r in records if isinstance(r.get(name), (int, float))]
        if values:
            out[name] = statistics.mean(values)
    return out


def run_finished(out_dir):
    """A run folder whose log shows its whole budget spent."""
    run = read_run(out_dir)
    return 'error' not in run and run['complete']


def run_diverged(out_dir):
    """A run folder whose log records a non-finite loss (train.NonFiniteLoss stopped it): rerunning it with
    the same keys diverges again."""
    return any(r.get('nonfinite') for r in read_log(Path(out_dir) / 'log.jsonl'))


# -----------------------------------------------------------------------------
# caches of what a saved model computed (RHO-LOSS's IL losses, SLM's reference losses, the DPO family's
# reference log-probs): one format and one set of checks

def save_cache(path, values, identity, info=None):
    """values (a numpy array) -> path, with its sidecar path.json: the identity it was computed from (the
    checkpoint's sha256, the data's fingerprint, the shape: whatever decides the values), the payload's dtype,
    shape and sha256, and info (what a report shows). The sidecar goes first and comes back last, so a cache
    whose write was cut short has none and is never read."""
    path = Path(path)
    sidecar = path.with_suffix('.json')  # il_loss.f16 -> il_loss.json
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar.unlink(missing_ok=True)
    data = np.ascontiguousarray(values).tobytes()
    atomic_write_bytes(path, data)
    side = {'identity': json.loads(json.dumps(identity)), 'dtype': str(values.dtype), 'shape': list(values.shape),
            'sha256': hashlib.sha256(data).hexdigest(), **(info or {})}
    atomic_write_bytes(sidecar, json.dumps(side, indent=1).encode())
    return side


def load_cache(path, identity, what, rebuild, info_keys=None, error=DataError):
    """The array save_cache wrote at path (a read-only memmap) and its sidecar, or DataError (one line naming
    `what`, the problem and `rebuild`) when it is missing, damaged (info_keys: {name: type} the sidecar
    must also hold), edited (its sha256 differs) or computed from something else (the first identity key
    that differs, with both values)."""
    path = Path(path)
    sidecar = path.with_suffix('.json')
    if not sidecar.is_file():
        raise error(f'no {what} at {path}: {rebuild}')
    side = read_result(sidecar, {'identity': dict, 'dtype': str, 'shape': list, 'sha256': str, **(info_keys or {})}, rebuild)
    if side['dtype'] not in ('float16', 'float32', 'float64') or not all(isinstance(n, int) and n >= 0 for n in side['shape']):
        raise error(f'{sidecar} is damaged (no valid dtype, shape): {rebuild}')
    want = json.loads(json.dumps(identity))
    for k in sorted(want.keys() | side['identity'].keys()):
        if side['identity'].get(k) != want.get(k):
            raise error(f"stale {what} at {path}: computed with {k}={side['identity'].get(k)!r}, this run has "
                            f"{want.get(k)!r}: {rebuild}")
    size = int(np.prod(side['shape'])) * np.dtype(side['dtype']).itemsize
    if not path.is_file() or path.stat().st_size != size:
        raise error(f'{what} {path} is missing or truncated ({size} bytes expected): {rebuild}')
    if file_sha256(path) != side['sha256']:
        raise error(f'{what} {path} was changed since it was computed (its sha256 differs from its sidecar): {rebuild}')
    return np.memmap(path, dtype=side['dtype'], mode='r', shape=tuple(side['shape'])), side
