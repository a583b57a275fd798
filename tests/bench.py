"""Benchmarks (not tests): every figure is a ratio against a baseline measured in the same run.

    python tests/bench.py            # all of it, a few minutes on 2 CPU cores
    python tests/bench.py loss       # the per-token loss only (vocab 50304, B*T 4096, d 768)
    python tests/bench.py train      # tokens/s and MFU of the default config, optimizer step-time ratios

Memory on the CPU: torch's CPU allocator keeps no peak counter, so a thread samples the process's
resident set every millisecond during the measured call (a fresh subprocess per variant); the figure
is the peak minus the resident set just before the call.
"""
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N, D, V = 4096, 768, 50304  # tokens (B*T), model width, GPT-2 vocab padded


def _rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_extra_mb(fn):
    """Run fn() while sampling the resident set; the peak above the level before the call, in MB."""
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_mb()) - base


def _loss_variant(name, backward, repeats=3):
    """Runs inside a fresh subprocess: median seconds and peak extra MB of one variant."""
    from model import per_token_loss
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, D, generator=g) * 0.5).requires_grad_(backward)
    w = (torch.randn(V, D, generator=g) * 0.02).requires_grad_(backward)
    t = torch.randint(0, V, (N,), generator=g)

    def run():
        if name == 'eager':
            loss = F.cross_entropy((h @ w.t()).float(), t, reduction='none')
        else:
            loss = per_token_loss(h, w, t, chunk=int(name.split('_')[1]), use_compile=True)
        if backward:
            loss.sum().backward()
            h.grad = w.grad = None
        return loss

    run()  # compile / warm-up
    peak = peak_extra_mb(run)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {'seconds': sorted(times)[len(times) // 2], 'peak_mb': peak}


def bench_loss():
    print(f'per-token loss: N={N} tokens, d={D}, vocab={V}; eager = F.cross_entropy((h @ w.T).float(), reduction="none")')
    for backward in (False, True):
        results = {}
        for name in ('eager', 'chunked_512', 'chunked_2048'):
            code = f'import sys; sys.path.insert(0, {str(ROOT / "tests")!r}); import bench, json; ' \
                   f'print(json.dumps(bench._loss_variant({name!r}, {backward})))'
            out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results['eager']
        label = 'forward+backward' if backward else 'forward only'
        print(f'  {label}: eager {base["seconds"]:.3f}s, {base["peak_mb"]:.0f} MB extra peak')
        for name, r in results.items():
            if name != 'eager':
                print(f'    {name} (compiled): time {r["seconds"] / base["seconds"]:.2f}x, '
                      f'peak memory {r["peak_mb"] / max(base["peak_mb"], 1):.2f}x ({r["seconds"]:.3f}s, {r["peak_mb"]:.0f} MB)')


def _run_train(**overrides):
    import train
    with tempfile.TemporaryDirectory() as out:
        cfg = train.TrainConfig(out_dir=out, sample_tokens=0, log_interval=10_000, eval_interval=10_000,
                                budget_unit='iters', **overrides)
        trainer = train.Trainer(cfg)
        summary = trainer.run()
        state = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        return summary, state, trainer.peak_flops, trainer.model


def bench_train(steps=60):
    print(f'default config (python train.py), {steps} optimizer steps each, wall of training steps only:')
    rows = {}
    _run_train(optimizer='adamw', budget=10)  # warm-up: the first run in a process pays one-off costs
    for name, lr in (('adamw', 2e-3), ('lion', 3e-4), ('sophiag', 1e-3)):
        summary, state_bytes, peak, model = _run_train(optimizer=name, lr=lr, budget=steps)
        rows[name] = (summary['spent']['wall'] / summary['steps'], state_bytes)
        if name == 'adamw':
            tok_s = summary['spent']['tokens'] / summary['spent']['wall']
            print(f'  adamw: {tok_s / 1e3:.1f}k tokens/s, MFU {100 * model.estimate_mfu(tok_s, peak):.1f}% '
                  f'of the measured fp32 matmul peak ({peak / 1e9:.0f} GFLOP/s)')
    base_time, base_state = rows['adamw']
    for name, (sec, state) in rows.items():
        print(f'  {name}: step time {sec / base_time:.3f}x adamw ({1e3 * sec:.1f} ms; sophiag amortised over '
              f'its Hessian steps), optimizer state {state / base_state:.2f}x ({state / 1e6:.1f} MB)')


if __name__ == '__main__':
    which = sys.argv[1:] or ['loss', 'train']
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime("%Y-%m-%d")}')
    if 'loss' in which:
        bench_loss()
    if 'train' in which:
        bench_train()
