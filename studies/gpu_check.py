"""The GPU check: what a lent GPU must confirm, in one script that finishes in <= 8 minutes on one GPU.

    python -m studies.gpu_check                     # on a GPU machine (H100/H200/A100: ~5 minutes)
    python -m studies.gpu_check --device=cpu        # its CPU form at tiny sizes: tests/test_gpu_check.py runs it in CI
    python -m studies.gpu_check --only=loss,methods --methods=all
    python -m studies.gpu_check --help              # the checks, methods and keys; runs nothing

1. gpt2     GPT-2 124M training steps with bf16 autocast, torch.compile and fused AdamW: tokens/s and MFU
            against the GPU's dense bf16 peak (budget.device_peak_flops; nanoGPT's FLOP count).
2. loss     the fused loss path against eager F.cross_entropy at V 50304, N 32768, d 768: time and peak
            memory ratios, forward+backward.
3. methods  a few steps of every method through its own entry point (train.py with each optimizer and
            architecture and T5-lite, rho.py, the SLM and MADPO studies' --quick), each in a subprocess;
            Muon, schedule-free AdamW and layer dropping under --compile=True at GPT-2 124M on a GPU.
4. ddp      with two GPUs or more: a 2-process torchrun of train.py over nccl.

Each check prints its figures on one line; the script exits 1 if any check failed (after running all) or
none measured anything (every check chosen was skipped: --only=ddp on one GPU), 2 for a bad name, key or
value (one line naming the choices, before any check runs).
"""
import contextlib
import dataclasses
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repo root: the library's scripts, and the cwd of subprocesses
if __name__ == '__main__' and not __package__:  # run as a script (python studies/gpu_check.py): the library is one folder up
    sys.path.insert(0, str(ROOT))

from budget import device_peak_flops  # noqa: E402
from configurator import cli, key, require  # noqa: E402
from loss import FUSED_CHUNK  # noqa: E402
from model import GPT, PRESETS, GPTConfig  # noqa: E402

# The sizes of each form: the GPU form's are the issue's; the CPU form's only keep the code paths alive.
SIZES = {
    'cuda': dict(preset='gpt2', vocab=50304, batch=16, steps=20, compile=True, loss_n=32768,
                 loss_chunks=(FUSED_CHUNK, 8192), method_steps=20, method_model={},
                 gpt2_model={'model': 'gpt2', 'batch_size': 8, 'compile': True}),
    'cpu': dict(preset='tiny', vocab=256, batch=4, steps=3, compile=False, loss_n=512, loss_chunks=(128,),
                method_steps=2, method_model={'model': 'tiny', 'batch_size': 4, 'compile_loss': False},
                gpt2_model={'model': 'tiny', 'batch_size': 4, 'compile_loss': False}),
}


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def check_gpt2(device, size):
    """Training steps of the preset (GPT-2 124M on a GPU) on random tokens, the loop's fused mean loss."""
    torch.manual_seed(0)
    cfg = GPTConfig(**PRESETS[size['preset']], vocab_size=size['vocab'], compile_loss=device.type == 'cuda')
    model = GPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=device.type == 'cuda')
    train_model = torch.compile(model) if size['compile'] else model
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else contextlib.nullcontext()
    x = torch.randint(0, cfg.vocab_size, (size['batch'], cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)

    def step():
        with autocast:
            loss = train_model(x, y, weight=1 / y.numel())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(3):  # the compile and the allocator's warm-up
        step()
    synchronize(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(size['steps']):
        loss = step()
    synchronize(device)
    tok_s = size['steps'] * x.numel() / (time.perf_counter() - t0)
    mfu = model.estimate_mfu(tok_s, device_peak_flops(device))
    assert torch.isfinite(loss), f'loss {loss.item()}'
    return (f'{size["preset"]} ({model.num_params() / 1e6:.0f}M), batch {size["batch"]}x{cfg.block_size}, '
            f'compile {size["compile"]}: {tok_s / 1e3:.1f}k tokens/s, MFU {100 * mfu:.1f}% '
            f'(warm-up {warm:.0f}s, loss {loss.item():.3f})')


def measure_loss(name, device, n, v, d=768):
    """Best seconds of 3 calls (after a warm-up) and peak memory in MB (CUDA: allocated above the inputs;
    CPU: the resident set's rise, so a rough figure) of one forward+backward of a loss variant."""
    from studies.bench import loss_call, loss_inputs, peak_extra_mb
    h, w, t = loss_inputs(n, d, v, backward=True, device=device)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else contextlib.nullcontext()

    def call():
        with autocast:
            loss_call(name, h, w, t, backward=True, use_compile=device.type == 'cuda')
        synchronize(device)
    with warnings.catch_warnings(record=True) as caught:  # the warm-up compiles: a silent eager fallback is no measurement
        warnings.simplefilter('always')
        call()
    fell_back = [str(c.message) for c in caught if 'torch.compile of the per-token loss failed' in str(c.message)]
    if fell_back:
        raise RuntimeError(f'{name}: {fell_back[0]}')
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = peak_extra_mb(call)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times), peak


def check_loss(device, size):
    n, v = size['loss_n'], 50304 if device.type == 'cuda' else 1024
    base_s, base_mb = measure_loss('eager', device, n, v)
    parts = [f'N {n}, V {v}, d 768, fwd+bwd: eager {base_s * 1e3:.1f} ms, {base_mb:.0f} MB']
    for chunk in size['loss_chunks']:
        s, mb = measure_loss(f'fused_{chunk}', device, n, v)
        parts.append(f'fused chunk {chunk}: time {s / base_s:.2f}x, memory {mb / max(base_mb, 1e-9):.3f}x ({mb:.0f} MB)')
    return '; '.join(parts)


def method_commands(device, size, out):
    """{name: argv}: every method through its entry point, a few steps each, writing under out."""
    steps = size['method_steps']
    run = dict(device=device.type, budget_unit='iters', budget=steps, sample_tokens=0, eval_interval=steps,
               eval_batches=2, log_interval=1, overwrite=True, **size['method_model'])
    t5 = {**run, 'model_type': 't5', 'model': 't5-tiny' if device.type == 'cpu' else 't5-small-cpu'}
    gpt2 = {**run, **size['gpt2_model']}  # today's optimizers and compiled layer dropping at GPT-2 124M on a GPU
    commands = {
        'adamw': ('train.py', run),
        'lion': ('train.py', {**run, 'optimizer': 'lion', 'lr': 3e-4}),
        'sophiag': ('train.py', {**run, 'optimizer': 'sophiag', 'lr': 1e-3, 'hess_interval': 2}),
        'stack': ('train.py', {**run, 'arch': 'stack'}),
        'drop': ('train.py', {**run, 'arch': 'drop'}),
        't5': ('train.py', t5),
        'sb': ('rho.py', {**run, 'method': 'sb'}),
        'rho': ('rho.py', {**run, 'method': 'rho', 'il_out_dir': str(out / 'rho_il'), 'il_cache': str(out / 'il_cache')}),
        'slm': ('-m studies.slm', {'quick': True, 'device': device.type}),
        'madpo': ('-m studies.madpo', {'quick': True, 'device': device.type}),
        'muon': ('train.py', {**gpt2, 'optimizer': 'muon'}),  # Newton-Schulz in bfloat16 on CUDA
        'sfadamw': ('train.py', {**gpt2, 'optimizer': 'sfadamw', 'warmup_frac': 0.0, 'warmup_units': 1.0}),
        'drop_compiled': ('train.py', {**gpt2, 'arch': 'drop'}),  # compiled block by block (train.compiled)
    }
    return {name: [sys.executable, *script.split(), *(f'--{k}={v}' for k, v in {**keys, 'out_dir': str(out / name)}.items())]
            for name, (script, keys) in commands.items()}


FAST_METHODS = ('sophiag', 't5', 'sb')  # the CPU form's: the loop with a hook, T5-lite, rho.py (the rest: --methods=all)


def check_methods(device, size, which):
    with tempfile.TemporaryDirectory() as tmp:
        commands = method_commands(device, size, Path(tmp))
        names = list(commands) if which == 'all' else FAST_METHODS if which == 'fast' else which.split(',')
        lines, failed = [], []
        for name in names:
            t0 = time.perf_counter()
            try:
                out = subprocess.run(commands[name], cwd=ROOT, capture_output=True, text=True, timeout=600)
                ok, tail = out.returncode == 0, (out.stdout + out.stderr)[-1500:]
            except subprocess.TimeoutExpired as e:  # one method's hang must not lose the others' lines
                ok, tail = False, f'timed out after {e.timeout:.0f}s'
            lines.append(f'{name} {"ok" if ok else "FAILED"} {time.perf_counter() - t0:.0f}s')
            if not ok:
                failed.append(f'{name}: {" ".join(commands[name][1:])}\n{tail}')
    if failed:
        raise RuntimeError(', '.join(lines) + '\n' + '\n'.join(failed))
    return ', '.join(lines)


def check_ddp(device, size):
    if device.type != 'cuda' or torch.cuda.device_count() < 2:
        return 'skipped: needs 2 GPUs'
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               '--budget_unit=iters', '--budget=20', '--sample_tokens=0', '--eval_interval=20', '--eval_batches=2',
               f'--out_dir={tmp}/ddp']
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError((out.stdout + out.stderr)[-2000:])
    return '2 processes over nccl: ' + out.stdout.strip().splitlines()[-1]


CHECKS = {  # name: (the check, what it confirms); a run takes them in this order
    'gpt2': (check_gpt2, 'GPT-2 124M training steps, bf16 autocast, compile, fused AdamW: tokens/s and MFU'),
    'loss': (check_loss, 'the fused loss path against eager F.cross_entropy: time and peak memory ratios'),
    'methods': (check_methods, 'a few steps of every method through its own entry point, each in a subprocess'),
    'ddp': (check_ddp, 'with two GPUs or more: a 2-process torchrun of train.py over nccl'),
}
METHODS = tuple(method_commands(torch.device('cpu'), SIZES['cpu'], Path()))  # the names --methods takes
METHOD_CHOICES = f"all, fast ({', '.join(FAST_METHODS)}) or a comma list of {', '.join(METHODS)}"
USAGE = ('[--key=value ...]\n\nchecks (--only; each prints one line, and the exit status is 1 if any failed):\n'
         + '\n'.join(f'  {name:<8} {what}' for name, (_, what) in CHECKS.items()) + f'\n\nmethods (--methods): {METHOD_CHOICES}')


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    device: str = key('cuda' if torch.cuda.is_available() else 'cpu', ('cuda', 'cpu'))  # cuda: the GPU form; cpu: tiny sizes
    only: str = ','.join(CHECKS)  # a comma list of the checks to run: any of gpt2, loss, methods, ddp
    methods: str = ''  # the methods check's: all, fast or a comma list of methods; '' = all on cuda, fast on cpu


def names_in(text, kind, valid, choices=None):
    """A comma list of names, each of them valid; else a one-line error naming the unknown ones and the choices."""
    names = text.split(',')
    unknown = [name or "''" for name in names if name not in valid]
    require(not unknown, f"unknown {kind} {', '.join(unknown)}; choose from {choices or ', '.join(valid)}")
    return names


def run(cfg):
    """Every check in cfg.only, each reported on one line (a failure too); 1 if any failed, else 0."""
    checks = names_in(cfg.only, 'check', CHECKS)
    if cfg.methods not in ('', 'all', 'fast'):
        names_in(cfg.methods, 'method', METHODS, METHOD_CHOICES)
    require(cfg.device == 'cpu' or torch.cuda.is_available(), 'no CUDA device here; run with --device=cpu for the CPU form')
    device, size = torch.device(cfg.device), SIZES[cfg.device]
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'gpu_check on {name}, torch {torch.__version__}, {time.strftime("%Y-%m-%d %H:%M")}', flush=True)
    failures, measured = 0, 0
    for check in checks:
        t0 = time.perf_counter()
        try:
            extra = (cfg.methods or ('all' if device.type == 'cuda' else 'fast'),) if check == 'methods' else ()
            result = CHECKS[check][0](device, size, *extra)
            measured += not result.startswith('skipped')
            print(f'{check}: {result} [{time.perf_counter() - t0:.0f}s]', flush=True)
        except Exception as e:  # report every check, then fail
            failures += 1
            print(f'{check}: FAILED ({type(e).__name__}: {e}) [{time.perf_counter() - t0:.0f}s]', flush=True)
    if not failures and not measured:  # a run that confirmed nothing must not read as a pass
        print(f"error: nothing measured: every check chosen ({', '.join(checks)}) was skipped on this machine", file=sys.stderr)
    return 1 if failures or not measured else 0


def main(argv=None):
    """--help anywhere prints the usage; a bad key, value or name is one line and exit 2, before any check."""
    argv = sys.argv[1:] if argv is None else argv
    return cli(run, CheckConfig, ['--help'] if {'-h', '--help'} & set(argv) else argv, USAGE)


if __name__ == '__main__':
    sys.exit(main())
