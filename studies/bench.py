"""Benchmarks (not tests): every figure is a ratio against a baseline measured in the same run.

    python -m studies.bench            # all of it, ~20 minutes on one busy CPU core
    python -m studies.bench loss       # the loss path against eager (vocab 50304, B*T 4096, d 768)
    python -m studies.bench train      # tokens/s and MFU of the default config, optimizer step-time ratios
    python -m studies.bench compile    # whole-model --compile=True against eager, tokens/s
    python -m studies.bench slm        # SLM's step time (cached / online reference) against CLM's
    python -m studies.bench tokenize   # one pipeline worker's tokens/s: byte, and a 2000-merge BPE trained here
    python -m studies.bench loss --chunks=256,512,1024   # the fused path at other chunk sizes
    python -m studies.bench --help     # the benchmarks and keys; measures nothing

Each benchmark prints its figures; one that fails prints one FAILED line and the rest still run. The exit
status is 0 when every benchmark named measured, 1 when one failed (nothing measured), 2 for a bad name,
key or value (one line naming the choices, before anything runs).

Memory on the CPU: torch's CPU allocator keeps no peak counter, so a thread samples the process's
resident set every millisecond during the measured call (a fresh subprocess per variant); the figure
is the peak minus the resident set just before the call. Times are the best of a few calls, the variants
taking turns in one process: load from other processes only ever slows a call down.
"""
import dataclasses
import json
import math
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repo root: the library's scripts, and the cwd of subprocesses
if __name__ == '__main__' and not __package__:  # run as a script (python studies/bench.py): the library is one folder up
    sys.path.insert(0, str(ROOT))

from configurator import check_distinct, cli, key, require  # noqa: E402
from loss import FUSED_CHUNK  # noqa: E402

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


def loss_inputs(n, d, v, backward, device='cpu'):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.5).to(device).requires_grad_(backward)
    w = (torch.randn(v, d, generator=g) * 0.02).to(device).requires_grad_(backward)
    return h, w, torch.randint(0, v, (n,), generator=g).to(device)


def loss_call(name, h, w, t, backward, use_compile=True):
    """One call of a loss variant: eager (F.cross_entropy on full logits, nanoGPT's), per_token (chunked,
    two-pass: the weights are not known in the forward) or fused_<chunk> (weighted_loss, mean weights);
    use_compile: the chunk kernels compiled (the default) or eager. 'matmuls' is the floor: eager's matmuls
    alone, one for the forward, three with the backward."""
    from loss import LOSS_CHUNK, per_token_loss, weighted_loss
    if name == 'matmuls':
        with torch.no_grad():
            logits = h @ w.t()
            if backward:
                logits @ w, logits.t() @ h
        return
    with torch.set_grad_enabled(backward):
        if name == 'eager':
            loss = F.cross_entropy((h @ w.t()).float(), t)
        elif name == 'per_token':
            loss = per_token_loss(h, w, t, chunk=LOSS_CHUNK, use_compile=use_compile).mean()
        else:
            loss = weighted_loss(h, w, t, 1 / len(t), chunk=int(name.split('_')[1]), use_compile=use_compile)
    if backward:
        loss.backward()
        h.grad = w.grad = None


def _loss_memory(name, backward):
    """Runs inside a fresh subprocess: the peak extra MB of one call of a variant (after a warm-up)."""
    h, w, t = loss_inputs(N, D, V, backward)
    loss_call(name, h, w, t, backward)  # compile / warm-up
    return peak_extra_mb(lambda: loss_call(name, h, w, t, backward))


def _loss_seconds(names, backward, rounds=3):
    """Runs inside one subprocess: the best seconds of each variant over rounds in which the variants take
    turns, so a change in the machine's load hits them alike."""
    h, w, t = loss_inputs(N, D, V, backward)
    times = {name: [] for name in names}
    for name in names:
        loss_call(name, h, w, t, backward)  # compile / warm-up
    for _ in range(rounds):
        for name in names:
            t0 = time.perf_counter()
            loss_call(name, h, w, t, backward)
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def _in_subprocess(call):
    code = f'import sys; sys.path.insert(0, {str(ROOT)!r}); import json; from studies import bench; print(json.dumps(bench.{call}))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:  # its last line says what failed (the exception under a traceback)
        raise RuntimeError(f"{call}: {(out.stderr.strip().splitlines() or ['exit status %d' % out.returncode])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_loss(chunks):
    from loss import FUSED_CHUNK, LOSS_CHUNK
    print(f'loss: N={N} tokens, d={D}, vocab={V}, fp32; eager = F.cross_entropy((h @ w.T).float(), t) '
          f'(the mean); per_token = chunk {LOSS_CHUNK}, two-pass; fused = weighted_loss (weights known)')
    names = ['eager', 'matmuls', 'per_token', *(f'fused_{c}' for c in chunks or [FUSED_CHUNK])]
    for backward in (False, True):
        seconds = _in_subprocess(f'_loss_seconds({names!r}, {backward})')
        memory = {name: _in_subprocess(f'_loss_memory({name!r}, {backward})') for name in names if name != 'matmuls'}
        print(f'  {"forward+backward" if backward else "forward only"}: eager {seconds["eager"]:.2f}s, '
              f'{memory["eager"]:.0f} MB extra peak; its matmuls alone (the floor) {seconds["matmuls"] / seconds["eager"]:.2f}x')
        for name in names[2:]:
            print(f'    {name} (compiled kernels): time {seconds[name] / seconds["eager"]:.2f}x, peak memory '
                  f'{memory[name] / max(memory["eager"], 1):.2f}x ({seconds[name]:.2f}s, {memory[name]:.0f} MB)')


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


def tokens_per_s(summary):
    return summary['spent']['tokens'] / summary['spent']['wall']


def bench_train(steps=30, rounds=2):
    print(f'default config (python train.py), {steps} optimizer steps a run, the optimizers taking turns for '
          f'{rounds} rounds (best per-step wall of each), wall of training steps only:')
    runs = {'adamw': 2e-3, 'lion': 3e-4, 'sophiag': 1e-3}
    best, state_bytes = {}, {}
    _run_train(optimizer='adamw', budget=10)  # warm-up: the first run in a process pays one-off costs
    for _ in range(rounds):
        for name, lr in runs.items():
            summary, state_bytes[name], peak, model = _run_train(optimizer=name, lr=lr, budget=steps)
            best[name] = min(best.get(name, float('inf')), summary['spent']['wall'] / summary['steps'])
            if name == 'adamw':
                tok_s = tokens_per_s(summary)
                print(f'  adamw: {tok_s / 1e3:.1f}k tokens/s, MFU {100 * model.estimate_mfu(tok_s, peak):.1f}% of the '
                      f'fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s, budget.device_peak_flops)')
    for name in runs:
        print(f'  {name}: step time {best[name] / best["adamw"]:.3f}x adamw ({1e3 * best[name]:.1f} ms; sophiag '
              f'amortised over its Hessian steps), optimizer state {state_bytes[name] / state_bytes["adamw"]:.2f}x '
              f'({state_bytes[name] / 1e6:.1f} MB)')


def bench_compile(steps=40):
    """Whole-model torch.compile against eager on the default config: tokens/s of the training steps,
    after a warm-up run of each in this process (the compile is paid there)."""
    print(f'whole-model compile, default config, {steps} steps each (after a warm-up run of each):')
    rates = {}
    for compile_ in (False, True):
        _run_train(compile=compile_, budget=5)
        rates[compile_] = tokens_per_s(_run_train(compile=compile_, budget=steps)[0])
    print(f'  eager {rates[False] / 1e3:.1f}k tokens/s, --compile=True {rates[True] / 1e3:.1f}k tokens/s: '
          f'{rates[True] / rates[False]:.2f}x')


def bench_slm(steps=40):
    """Per-step time of SLM (cached reference losses; an online reference forward per step) against plain
    CLM (k = 1), slm.py's default shape, runs taking turns in one process (the first round warms up)."""
    import dataclasses
    import statistics
    import slm
    import train
    with tempfile.TemporaryDirectory() as out:
        cfg = slm.SLMConfig(out_dir=out, stage='train', budget_unit='iters', budget=steps, ref_budget=20,
                            eval_interval=10 ** 6, log_interval=5, peak_flops=1e12)
        slm.ensure_prepared('', [cfg.noise])
        paths = slm.get_paths(cfg)
        slm.stage_ref(cfg, paths)        # 20 steps: its weights do not change what a step costs
        slm.build_cache(cfg, paths)
        seconds = {'clm': [], 'cached': [], 'online': []}
        for rep in range(3):
            for mode in seconds:
                run = dataclasses.replace(cfg, out_dir=f'{out}/{mode}', overwrite=True, k=1.0 if mode == 'clm' else cfg.k,
                                          ref_mode='online' if mode == 'online' else 'cached', dataset=str(paths.corpus(cfg.noise)))
                train.train(run, slm.SelectiveLM(run, paths))
                logs = [json.loads(line) for line in Path(f'{out}/{mode}/log.jsonl').read_text().splitlines()]
                per_step = [run.batch_size * run.block_size / r['tokens_per_s'] for r in logs if 'tokens_per_s' in r]
                seconds[mode] += per_step[1:] if rep else []
    med = {m: statistics.median(v) for m, v in seconds.items()}
    print(f"SLM per-step time / CLM's: cached {med['cached'] / med['clm']:.2f}x, online {med['online'] / med['clm']:.2f}x "
          f"(median seconds per step {med})")


def bench_tokenize(n_merges=2000, train_chars=2_000_000, rounds=3):
    """What one worker of the corpus pipeline (data/fineweb_edu) encodes per second: the byte tokenizer, and a
    gpt2-style BPE with n_merges merges trained here on the stdlib's sources (gpt2's own 50k-merge encoding
    needs a download). Both encode the same documents, the stdlib's .py files, best of a few rounds."""
    import tiktoken
    from data.fineweb_edu.prepare import encode_documents
    from data.loader import get_tokenizer
    from data.stdlib.prepare import stdlib_documents
    sys.path.insert(0, str(ROOT / 'tests'))  # the BPE trainer lives beside the corpus tests that check it
    from test_corpora import PAT, train_bpe
    texts = [text for _, text in stdlib_documents()]
    t0 = time.perf_counter()
    ranks = train_bpe(''.join(texts)[:train_chars], n_merges)
    print(f'tokenising {sum(map(len, texts)) / 1e6:.1f}M characters in {len(texts)} documents (one process; '
          f'the {len(ranks) - 256}-merge BPE trained on {train_chars / 1e6:.0f}M of them in {time.perf_counter() - t0:.0f} s):')
    bpe = tiktoken.Encoding(f'bpe{n_merges}', pat_str=PAT, mergeable_ranks=ranks, special_tokens={'<|endoftext|>': len(ranks)})
    rates = {}
    for name, tokenizer in [('byte', get_tokenizer('byte')), (bpe.name, get_tokenizer(bpe))]:
        best, tokens = math.inf, 0
        for _ in range(rounds):
            t0 = time.perf_counter()
            tokens = sum(len(a) for a in encode_documents(texts, tokenizer))
            best = min(best, time.perf_counter() - t0)
        rates[name] = sum(map(len, texts)) / best  # characters/s: the text a worker gets through, whatever its tokens
        print(f'  {name}: {tokens / best / 1e6:.2f}M tokens/s, {sum(map(len, texts)) / best / 1e6:.1f}M characters/s, '
              f'{sum(map(len, texts)) / tokens:.2f} characters per token')
    print(f"  BPE / byte, characters per second: {rates[bpe.name] / rates['byte']:.3f}x")


BENCHMARKS = {  # name: (what it measures, how to run it); a run takes them in this order
    'loss': ('the loss path against eager: time and peak memory (vocab 50304, B*T 4096, d 768)', lambda cfg: bench_loss(cfg.chunks)),
    'train': ('tokens/s and MFU of the default config, optimizer step-time and state-size ratios', lambda cfg: bench_train()),
    'compile': ('whole-model --compile=True against eager, tokens/s', lambda cfg: bench_compile()),
    'slm': ("SLM's step time (cached / online reference) against CLM's", lambda cfg: bench_slm()),
    'tokenize': ("one pipeline worker's tokens/s: byte, and a 2000-merge BPE trained here", lambda cfg: bench_tokenize()),
}
USAGE = '[BENCHMARK ...] [--key=value ...]\n\nbenchmarks (none named: all of them, ~20 minutes on one busy CPU core):\n' + \
    '\n'.join(f'  {name:<9} {what}' for name, (what, _) in BENCHMARKS.items())


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    chunks: tuple = key((FUSED_CHUNK,), '>0')  # loss: the fused path's chunk sizes in tokens, e.g. --chunks=256,512,1024

    def __post_init__(self):
        check_distinct('chunks', self.chunks, f'({FUSED_CHUNK},)')


def run(names, cfg):
    """The named benchmarks (all when none is named), each printing its ratios -> 0, or 1 when one failed
    (it printed one FAILED line; the others still ran). An unknown name measures nothing: one line, exit 2."""
    unknown = [n for n in names if n not in BENCHMARKS]
    require(not unknown, f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime("%Y-%m-%d %H:%M")}', flush=True)
    chosen, failed = [n for n in BENCHMARKS if n in (names or BENCHMARKS)], []
    for name in chosen:
        try:
            BENCHMARKS[name][1](cfg)
        except Exception as e:  # one benchmark's failure (a missing package, an OOM) must not lose the others' figures
            print(f"{name}: FAILED ({type(e).__name__}: {' '.join(str(e).split())[:300]})", flush=True)
            failed.append(name)
    if failed:
        print(f"error: {', '.join(failed)} measured nothing ({len(chosen) - len(failed)} of {len(chosen)} benchmark(s) did)",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv):
    """Benchmark names are the bare words, --key=value the rest; --help anywhere prints the usage -> the exit status."""
    flags = [a for a in argv if a.startswith('-')]
    if {'-h', '--help'} & set(flags):
        flags = ['--help']
    flags = [f'--chunks=({a[9:]},)' if re.fullmatch(r'--chunks=-?\d+', a) else a for a in flags]  # one chunk size
    return cli(lambda cfg: run([a for a in argv if not a.startswith('-')], cfg), BenchConfig, flags, USAGE)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
