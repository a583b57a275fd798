"""The lab's one plan runner: every study (the No Train No Gain protocol, the SLM and MADPO studies) is a
list of runs, each one command of the library (`python train.py --k=v ...`, `python rho.py ...`), and this
module runs such a list: finished runs are skipped, killed ones resume, the rest start afresh, `--jobs`
at a time with the CPU threads split between them.

A run is reused only when its folder records every key of the planned run (runs.records_config): a
plan with another value of any key runs it again instead of serving the old result.
"""
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from configurator import UserError
from runs import config_difference, records_config, run_diverged, run_finished

ROOT = Path(__file__).resolve().parent.parent  # where the library's scripts are


@dataclasses.dataclass
class Run:
    label: str                  # what the progress line calls it
    script: str                 # the library's entry point, relative to ROOT ('train.py', 'rho.py', ...)
    args: dict                  # its --key=value; args['out_dir'] is its folder
    exclusive: str = ''         # runs sharing a non-empty tag wait for the first of them to succeed (it builds a shared model)
    finished: Callable = None   # (out_dir) -> bool; None: its log shows the whole budget spent (runs.run_finished)
    self_resuming: bool = False  # the script skips and resumes its own parts (WSD branches): always started as is

    @property
    def out_dir(self):
        return Path(self.args['out_dir'])

    def is_done(self):
        return (not self.self_resuming and records_config(self.out_dir, self.args)
                and (self.finished or run_finished)(self.out_dir))

    def command(self):
        """Its command line: it resumes a killed run of these same keys, and starts afresh (replacing it) over
        anything else in its folder, e.g. a run of an older plan with another budget."""
        resume = (self.out_dir / 'ckpt.pt').exists() and records_config(self.out_dir, self.args)
        args = (self.args if self.self_resuming else {**self.args, 'init_from': 'resume'} if resume
                else {**self.args, 'overwrite': True})
        return [sys.executable, str(ROOT / self.script)] + [
            f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}' for k, v in args.items()]


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
    jobs_of = [Job(run.label, run.command(), Path(f'{run.out_dir}.out'), run.exclusive) for run in todo]
    failed = []
    for job, last in run_jobs(jobs_of, jobs):  # in the invoking folder: paths resolve as the user wrote them
        if diverged(todo[jobs_of.index(job)]):
            print(f'{job.label}: diverged, counted as an infinite loss ({last})', flush=True)
        else:
            failed.append((job, last))
    if failed:
        job, last = failed[0]
        raise UserError(f'{len(failed)} run(s) failed, first: {job.label}: {last} (see {job.log})')


@dataclasses.dataclass
class Job:
    label: str              # what the progress line calls it
    argv: list              # the command
    log: Path               # its stdout and stderr
    exclusive: str = ''     # jobs sharing a non-empty tag wait for the first of them to succeed


def run_jobs(jobs, n_parallel, cwd=None):
    """Run every Job, n_parallel at a time with the CPU threads split between them; print one line as
    each ends (its last 'done:' line, or its last line) -> the failed ones' (job, last line). Each job runs
    in a session of its own, so a Ctrl-C or SIGTERM reaches this process only, which passes one SIGTERM to
    every running job (each saves a checkpoint at its next step boundary), waits for them and re-raises:
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


def _run_jobs(jobs, n_parallel, cwd, running):
    todo, failed, t0, n = list(jobs), [], time.time(), len(jobs)
    built = set()  # exclusive tags whose first job succeeded: the rest of them may run side by side
    env = {**os.environ, 'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 1) // n_parallel))}
    while todo or running:
        busy = {job.exclusive for job in running.values() if job.exclusive and job.exclusive not in built}
        for job in list(todo):
            if len(running) == n_parallel:
                break
            if job.exclusive in busy:
                continue
            todo.remove(job)
            if job.exclusive and job.exclusive not in built:
                busy.add(job.exclusive)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, 'w') as out:
                running[subprocess.Popen(job.argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)] = job
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            job = running.pop(proc)
            lines = job.log.read_text(errors='replace').splitlines() or ['?']
            if proc.returncode != 0:
                failed.append((job, lines[-1]))
            else:
                built.add(job.exclusive)
            done = n - len(todo) - len(running)
            eta = (time.time() - t0) / done * (n - done)
            status = next((l for l in reversed(lines) if l.startswith('done:')), lines[-1])
            print(f'[{done}/{n}] {job.label}: {status} | eta {eta / 60:.1f} min', flush=True)
    return failed
