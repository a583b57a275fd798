"""The lab's one plan runner: every study (the No Train No Gain protocol, the SLM and MADPO studies) is a
list of runs, each one command of the library (`python train.py --k=v ...`, `python rho.py ...`), and this
module runs such a list: finished runs are skipped, killed ones resume, the rest start afresh, `--jobs`
at a time with the CPU threads split between them.

A run is reused only when its folder records every key of the planned run (runs.records_config): a
plan with another value of any key runs it again instead of serving the old result.

While runs go, the runner is never silent for more than a minute: every PROGRESS_EVERY seconds one line
per running run (its latest step, the share of its budget spent, its latest val loss, read from its
log.jsonl) and one line of ETA, from the wall seconds per budget unit of the runs finished so far in this
invocation (budget-weighted, so one short run finishing does not make the estimate jump).

On a machine with several GPUs each run gets GPUs of its own (CUDA_VISIBLE_DEVICES in its environment);
with one GPU the runs share it; on a CPU nothing changes. A Run with nproc > 1 is started with
`torchrun --standalone --nproc_per_node=N` and takes N GPUs.
"""
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from configurator import UserError
from data.loader import FolderLock, lock_holder
from runs import config_difference, in_use, read_log, records_config, run_diverged, run_finished

ROOT = Path(__file__).resolve().parent.parent  # where the library's scripts are
PROGRESS_EVERY = 60.0  # seconds between progress reports while runs go


@dataclasses.dataclass
class Run:
    label: str                  # what the progress line calls it
    script: str                 # the library's entry point, relative to ROOT ('train.py', 'rho.py', ...)
    args: dict                  # its --key=value; args['out_dir'] is its folder
    exclusive: str = ''         # runs sharing a non-empty tag wait for the first of them to succeed (it builds a shared model)
    finished: Callable = None   # (out_dir) -> bool; None: its log shows the whole budget spent (runs.run_finished)
    self_resuming: bool = False  # the script skips and resumes its own parts (WSD branches): always started as is
    nproc: int = 1              # processes of one run (DDP): > 1 starts it under torchrun, one GPU each

    @property
    def out_dir(self):
        return Path(self.args['out_dir'])

    def is_done(self):
        return (not self.self_resuming and records_config(self.out_dir, self.args)
                and (self.finished or run_finished)(self.out_dir))

    def resumes(self):
        return (self.out_dir / 'ckpt.pt').exists() and records_config(self.out_dir, self.args)

    def command(self):
        """Its command line: it resumes a killed run of these same keys, and starts afresh (replacing it) over
        anything else in its folder, e.g. a run of an older plan with another budget."""
        args = (self.args if self.self_resuming else {**self.args, 'init_from': 'resume'} if self.resumes()
                else {**self.args, 'overwrite': True})
        return launcher(self.nproc) + [str(ROOT / self.script)] + [
            f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}' for k, v in args.items()]

    def cost(self):
        """(budget unit, budget) of the run, what the ETA weighs it by: ('run', 1.0) for a run without a
        numeric budget (a MADPO stage); a WSD trunk trains to its largest branch."""
        budget, unit = self.args.get('budget'), self.args.get('budget_unit')
        if not isinstance(budget, (int, float)) or not isinstance(unit, str):
            return 'run', 1.0
        return unit, float(budget) * max(self.args.get('branch_budgets') or (1,))


def launcher(nproc):
    """The program a run's script is given to: this Python, or torchrun (the one beside it, if installed there)."""
    if nproc == 1:
        return [sys.executable]
    beside = Path(sys.executable).parent / 'torchrun'
    return [str(beside) if beside.exists() else shutil.which('torchrun') or 'torchrun', '--standalone',
            f'--nproc_per_node={nproc}']


@contextlib.contextmanager
def study_lock(out_dir):
    """Held by a study (ablate, lr_check) while it checks, runs and tables the runs under out_dir: a second study
    on the folder would find the first's runs half done, start them again (they refuse, in use) or truncate
    their console logs, and both would end in failures; it is refused up front instead. The kernel frees a dead
    holder's lock (kill -9). Folders made for the lock that stay empty are removed again."""
    out_dir = Path(out_dir)
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    busy = lambda pid: UserError(f'--out_dir={out_dir} is being used by another study (pid {pid}): '  # noqa: E731
                                 'wait for it, or give another --out_dir')
    try:
        with FolderLock(out_dir / '.study.lock', busy):
            yield
    finally:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()


def run_plan(plan, jobs, diverged_ok=False):
    """Run every unfinished Run of a plan, `jobs` at a time (each run's output goes to <out_dir>.out).
    diverged_ok (tuning): a run of these keys whose loss went non-finite is a result (that lr is too high),
    not a failure, and is not run again. A failed run raises UserError after the others have finished."""
    def diverged(run):
        return diverged_ok and run_diverged(run.out_dir) and records_config(run.out_dir, run.args)
    todo = [run for run in plan if not (run.is_done() or diverged(run))]
    for run in todo:  # a folder holding a run of other keys is replaced: say which key changed
        diff = config_difference(run.out_dir, run.args) if (run.out_dir / 'config.json').exists() else None
        if diff and not run.self_resuming:
            print(f'{run.out_dir}: replacing a run of other keys ({diff[0]} was {diff[1]!r}, now {diff[2]!r})', flush=True)
    if todo and len(todo) < len(plan):
        print(f'{len(plan) - len(todo)} of the plan\'s {len(plan)} runs are finished already: reused', flush=True)
    jobs_of = [job_of(run) for run in todo]
    failed = []
    for job, last in run_jobs(jobs_of, jobs):  # in the invoking folder: paths resolve as the user wrote them
        if diverged(todo[jobs_of.index(job)]):
            print(f'{job.label}: diverged, counted as an infinite loss ({last})', flush=True)
        else:
            failed.append((job, last))
    if failed:
        job, last = failed[0]
        raise UserError(f'{len(failed)} run(s) failed, first: {job.label}: {last} (see {job.log})')


def job_of(run):
    """The Job that runs a Run; a resumed run's work is what its log has not spent yet."""
    unit, total = run.cost()
    start = latest_progress(run.out_dir, unit).get('spent', 0.0) if run.resumes() and unit != 'run' else 0.0
    return Job(run.label, run.command(), Path(f'{run.out_dir}.out'), run.exclusive, out_dir=run.out_dir, unit=unit,
               total=total, start=min(start, total), nproc=run.nproc)


@dataclasses.dataclass
class Job:
    label: str              # what the progress line calls it
    argv: list              # the command
    log: Path               # its stdout and stderr
    exclusive: str = ''     # jobs sharing a non-empty tag wait for the first of them to succeed
    out_dir: Path = None    # the run folder whose log.jsonl says how far it got (None: progress is its wall time only)
    unit: str = 'run'       # its budget unit ('run': no budget, each job weighs 1)
    total: float = 1.0      # its budget, in unit
    start: float = 0.0      # what it had spent before this invocation (a resumed run)
    nproc: int = 1          # its processes, each given a GPU of its own on a machine with several


# -----------------------------------------------------------------------------
# what a running job has done, and when the plan will end

def latest_progress(out_dir, unit, since=0.0):
    """{'step', 'spent', 'val_loss', 'val_step'} from the newest log.jsonl of a run folder (its own, or a
    sub-run's: a WSD trunk writes one folder per branch) written since `since` (a log older than the job is
    the run it replaces); the keys a log does not give yet are missing."""
    if out_dir is None:
        return {}
    logs = [p for p in [Path(out_dir) / 'log.jsonl', *Path(out_dir).glob('*/log.jsonl')]
            if p.is_file() and p.stat().st_mtime >= since]
    if not logs:
        return {}
    records = read_log(max(logs, key=lambda p: p.stat().st_mtime))
    number = (int, float)
    steps = [r for r in records if isinstance(r.get('step'), number)]
    evals = [r for r in steps if isinstance(r.get('val_loss'), number)]
    spent = [r[unit] for r in records if isinstance(r.get(unit), number)]
    return {**({'step': steps[-1]['step']} if steps else {}), **({'spent': float(spent[-1])} if spent else {}),
            **({'val_loss': evals[-1]['val_loss'], 'val_step': evals[-1]['step']} if evals else {})}


def eta_seconds(finished, remaining, parallel):
    """Seconds until the plan ends, or None before any run has finished. finished: [(unit, work, wall)] of
    the runs that finished in this invocation; remaining: [(unit, work)] still to do, in the order they run
    (the running ones first). Each unit's work costs the wall seconds per unit of its finished runs (summed
    before dividing, so a short run weighs little); a unit none has finished in costs the mean wall of a
    finished run per run. The runs are dealt to `parallel` lanes as the runner starts them (each to the lane
    that frees first): the last run of a plan does not go faster for the idle slots beside it."""
    if not finished:
        return None
    per_unit = {}
    for unit, work, wall in finished:
        w, s = per_unit.get(unit, (0.0, 0.0))
        per_unit[unit] = (w + work, s + wall)
    mean_run = sum(wall for _, _, wall in finished) / len(finished)
    lanes = [0.0] * max(1, parallel)
    for unit, work in remaining:
        w, s = per_unit.get(unit, (0.0, 0.0))
        lanes[lanes.index(min(lanes))] += work * s / w if w > 0 else mean_run
    return max(lanes)


def duration(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def job_line(job, t_start, now):
    """One running job's progress: 'stack budget 6 seed 0: step 120, 4.2 of 6 rst (70%), val loss 2.4130
    at step 100, 1m30s'."""
    p = latest_progress(job.out_dir, job.unit, t_start)
    parts = [f"step {p['step']:g}"] if 'step' in p else ['starting (no log yet)']
    if 'spent' in p:
        parts.append(f"{p['spent']:.4g} of {job.total:g} {job.unit} ({100 * min(p['spent'] / job.total, 1):.0f}%)")
    if 'step' in p:
        parts.append(f"val loss {p['val_loss']:.4f} at step {p['val_step']:g}" if 'val_loss' in p else 'no eval yet')
    return f'  {job.label}: ' + ', '.join(parts) + f', {duration(now - t_start)}'


class Progress:
    """The runner's voice: one line per run that ends, and every PROGRESS_EVERY seconds one ETA line and
    one line per running run. Only the runs that finish in this invocation time the rest. `running` is
    [(job, its start time)] throughout."""

    def __init__(self, jobs, parallel, clock=time.time):
        self.n, self.parallel, self.clock = len(jobs), parallel, clock
        self.t0 = self.last = clock()
        self.finished = []  # (unit, work, wall) of the runs that succeeded here

    def ended(self, job, wall, ok, status, todo, running):
        if ok:
            self.finished.append((job.unit, job.total - job.start, wall))
        done = self.n - len(todo) - len(running)
        print(f'[{done}/{self.n}] {job.label}: {status} | {self.eta(todo, running)}', flush=True)

    def eta(self, todo, running):
        """'eta 12m24s (...)' from the finished runs, or what it waits for."""
        remaining = [(j.unit, max(0.0, j.total - latest_progress(j.out_dir, j.unit, t).get('spent', j.start)))
                     for j, t in running] + [(j.unit, j.total - j.start) for j in todo]
        if not remaining:
            return 'eta: done'
        parallel = min(self.parallel, len(remaining))
        seconds = eta_seconds(self.finished, remaining, parallel)
        if seconds is None:
            return 'eta: after the first run finishes'
        return f'eta {duration(seconds)} ({rates(self.finished)} over {len(self.finished)} finished run(s); {parallel} at a time)'

    def maybe_report(self, todo, running):
        """At most (and at least) once every PROGRESS_EVERY seconds while jobs run."""
        now = self.clock()
        if now - self.last < PROGRESS_EVERY or not running:
            return
        self.last = now
        done = self.n - len(todo) - len(running)
        print(f'progress {duration(now - self.t0)}: {done}/{self.n} done, {len(running)} running | '
              f'{self.eta(todo, running)}', flush=True)
        for job, t in running:
            print(job_line(job, t, now), flush=True)


def rates(finished):
    """'41.2 s per rst': each unit's wall seconds per unit over the finished runs."""
    units = dict.fromkeys(u for u, _, _ in finished)
    return ', '.join(f'{sum(s for v, _, s in finished if v == u) / max(sum(w for v, w, _ in finished if v == u), 1e-12):.3g} '
                     f's per {u}' for u in units)


# -----------------------------------------------------------------------------
# running jobs: parallel, on their GPUs, stopped together

def visible_gpus():
    """The GPU ids a runner hands out, one run each, or None where runs share one GPU or run on the CPU.
    The ids are the ones this process was given (its own CUDA_VISIBLE_DEVICES), else 0..n-1."""
    n = torch.cuda.device_count()
    if n < 2:
        return None
    given = [d for d in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
    return given[:n] if len(given) >= n else [str(i) for i in range(n)]


def check_fits(jobs, gpus):
    """A job of N processes needs N GPUs on a GPU machine (torchrun gives each process its own)."""
    have = len(gpus) if gpus else torch.cuda.device_count()
    too_big = [j for j in jobs if have and j.nproc > have]
    if too_big:
        raise UserError(f'{too_big[0].label} asks for {too_big[0].nproc} processes, one GPU each; this machine has '
                        f'{have} GPU(s): plan it with nproc <= {have}')


def run_jobs(jobs, n_parallel, cwd=None):
    """Run every Job, n_parallel at a time with the CPU threads split between them (on a machine with several
    GPUs: also at most one run per GPU); print one line as each ends (its last 'done:' line, or its last
    line) and the progress of the running ones every minute -> the failed ones' (job, last line). Each job
    runs in a session of its own, so a Ctrl-C or SIGTERM reaches this process only, which passes one SIGTERM
    to every running job (each saves a checkpoint at its next step boundary), waits for them and re-raises:
    nothing is left running."""
    running = {}
    try:
        return _run_jobs(jobs, n_parallel, cwd, running)
    except KeyboardInterrupt:
        stop_jobs(running)
        raise


def stop_jobs(running, grace=120):
    """SIGTERM to every running job, then SIGKILL to any still alive after `grace` seconds."""
    for proc, job in running.items():
        print(f'stopping {job.label} (it saves a checkpoint; the same command resumes it)', flush=True)
        proc.terminate()
    deadline = time.time() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def job_threads(env, n_parallel, cpus):
    """Each job's OMP_NUM_THREADS: the caller's, when set (a run's low bits depend on it, and a study that
    says one thread a job must get one), else the cores shared among the jobs run at once."""
    return env.get('OMP_NUM_THREADS') or str(max(1, (cpus or 1) // n_parallel))


def job_env(env, devices):
    """A job's environment: its own GPUs where the runner hands them out (devices), else the runner's."""
    return {**env, 'CUDA_VISIBLE_DEVICES': ','.join(devices)} if devices else env


def live_run(out_dir):
    """The refusal of a run folder (or of a WSD run's branch folder in it) whose lock a live process holds,
    else '': another study already runs it. The lock is only tried (lock_holder), so a live run's is untouched."""
    for lock in [Path(out_dir) / 'lock', *Path(out_dir).glob('*/lock')] if out_dir is not None else ():
        pid = lock_holder(lock)
        if pid is not None:
            return str(in_use(lock.parent)(pid))
    return ''


def _run_jobs(jobs, n_parallel, cwd, running):
    todo, failed, gpus = list(jobs), [], visible_gpus()
    check_fits(jobs, gpus)
    free = list(gpus or [])  # GPUs no job holds
    held, started = {}, {}   # proc -> its GPUs, its start time
    built = set()  # exclusive tags whose first job succeeded: the rest of them may run side by side
    env = {**os.environ, 'OMP_NUM_THREADS': job_threads(os.environ, n_parallel, os.cpu_count())}
    progress = Progress(jobs, min(n_parallel, len(gpus)) if gpus else n_parallel)
    if jobs:
        idle = f' (--jobs={len(gpus)} would use them all)' if gpus and n_parallel < len(gpus) else ''
        print(f'running {len(jobs)} run(s), {n_parallel} at a time' + (f' on {len(gpus)} GPUs, one run per GPU{idle}' if gpus else '')
              + f'; progress every {PROGRESS_EVERY:g} s', flush=True)
    while todo or running:
        busy = {job.exclusive for job in running.values() if job.exclusive and job.exclusive not in built}
        for job in list(todo):
            if len(running) == n_parallel:
                break
            if job.exclusive in busy or (gpus and len(free) < job.nproc):
                continue
            todo.remove(job)
            refused = live_run(job.out_dir)
            if refused:  # refused before its .out is opened: truncating it would erase the live run's console log
                failed.append((job, refused))
                progress.ended(job, 0.0, False, refused, todo, [(j, started[p]) for p, j in running.items()])
                continue
            if job.exclusive and job.exclusive not in built:
                busy.add(job.exclusive)
            devices = free[:job.nproc] if gpus else []
            free = free[len(devices):]
            job.log.parent.mkdir(parents=True, exist_ok=True)
            started_at = time.time()  # before the child can write: its log is newer (latest_progress)
            with open(job.log, 'w') as out:
                proc = subprocess.Popen(job.argv, stdout=out, stderr=subprocess.STDOUT, env=job_env(env, devices),
                                        cwd=cwd, start_new_session=True)
            running[proc], held[proc], started[proc] = job, devices, started_at
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            job = running.pop(proc)
            free += held.pop(proc)
            lines = job.log.read_text(errors='replace').splitlines() or ['?']
            if proc.returncode != 0:
                failed.append((job, lines[-1]))
            else:
                built.add(job.exclusive)
            status = next((l for l in reversed(lines) if l.startswith('done:')), lines[-1])
            progress.ended(job, time.time() - started.pop(proc), proc.returncode == 0, status, todo,
                           [(j, started[p]) for p, j in running.items()])
        progress.maybe_report(todo, [(j, started[p]) for p, j in running.items()])
    return failed
