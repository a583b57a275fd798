"""Config files and --key=value overrides, type-checked against a frozen dataclass of defaults.

    python train.py config/gpt2_124m.py --lr=3e-4 --compile=True

Arguments apply left to right: a config file (a Python file you wrote; it is run, so only use your own)
sets any of its top-level names, then each --key=value overrides. Values are parsed with
ast.literal_eval (a bare word stays a string), and must have the default's type (an int is accepted
for a float, a list for a tuple), and be finite. Each key may declare its valid range next to its default
(`lr: float = key(2e-3, '>0')`), checked for every entry point. An unknown key, a wrong type or an
out-of-range value is a one-line error naming the key, exit code 2, no traceback. Unlike nanoGPT's
configurator nothing is exec'd into a module's globals, so every file stays importable and testable.
"""
import ast
import contextlib
import dataclasses
import difflib
import inspect
import math
import os
import re
import runpy
import signal
import sys
import threading
import traceback
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""
    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C or SIGTERM stopped the command (what it saved, if anything, and how to go on in the message):
    one line, exit code 128 + the signal, 130 for Ctrl-C, 143 for SIGTERM (cli's exit_stopped)."""
    exit_code = 130


class ConfigError(UserError):
    pass


def require_writable(path):
    """Before the work: path (a file to write) can be created in its folder, and is not a folder."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    require(not os.path.isdir(path), f'{path} is a folder: give a file name')
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    require(os.path.isdir(folder), f'cannot write {path}: {folder} is a file, not a folder')
    require(os.access(folder, os.W_OK | os.X_OK), f'cannot write {path}: {folder} is not writable')


def require(ok, message):
    if not ok:
        raise ConfigError(message)


def check_distinct(name, values, example):
    """A sweep's seeds, budgets, betas, ...: at least one, none twice (two runs would share one folder)."""
    require(len(values) > 0, f'--{name} is empty: give at least one, e.g. --{name}="{example}"')
    twice = sorted({v for v in values if values.count(v) > 1})
    require(not twice, f"--{name} has {', '.join(map(str, twice))} more than once: give each once")


def key(default, valid=None):
    """A config field with its valid values beside it: '>0', '>=0', an interval '[0,1)', 'path' (a non-empty
    string) or a tuple of choices. A tuple-valued key's check applies to each element."""
    return dataclasses.field(default=default, metadata={'valid': valid} if valid is not None else {})


_INTERVAL = re.compile(r'([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])$')


def _fits(value, valid):
    if isinstance(valid, tuple):
        return value in valid
    if valid == 'path':
        return isinstance(value, str) and value.strip() != ''
    if valid.startswith('>='):
        return value >= float(valid[2:])
    if valid.startswith('>'):
        return value > float(valid[1:])
    opening, low, high, closing = _INTERVAL.match(valid).groups()
    low, high = float(low), float(high)
    return (low <= value if opening == '[' else low < value) and (value <= high if closing == ']' else value < high)


def _says(valid):
    """How an error names the valid values: 'one of a, b', 'a non-empty path', '> 0', 'in [0, 1)'."""
    if isinstance(valid, tuple):
        return f"one of {', '.join(map(str, valid))}"
    if valid == 'path':
        return 'a non-empty path'
    if valid.startswith('>'):
        op = valid.rstrip('0123456789.e+-')
        return f'{op} {valid[len(op):]}'
    opening, low, high, closing = _INTERVAL.match(valid).groups()
    return f'in {opening}{low}, {high}{closing}'


def declared_range(cls, name):
    """A key's declared range: its own, or the nearest base's (a method config that only changes a
    default, `out_dir: str = 'out/rho'`, keeps TrainConfig's 'path')."""
    for klass in cls.__mro__:
        field = getattr(klass, '__dataclass_fields__', {}).get(name)
        if field is not None and 'valid' in field.metadata:
            return field.metadata['valid']
    return None


def check_ranges(cfg):
    """Every number finite (a tuple's elements too), and every field in its declared range (see key());
    raises ConfigError naming the first key that is not."""
    for f in dataclasses.fields(cfg):
        valid, value = declared_range(type(cfg), f.name), getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        require(all(math.isfinite(v) for v in values if isinstance(v, float)), f'--{f.name} must be a finite number, got {value!r}')
        require(all(abs(v) < 2 ** 63 for v in values if isinstance(v, int)),  # what torch and numpy take as an integer
                f'--{f.name} must be below 2**63 in size, got {value!r}')
        require(all(is_text(v) for v in values if isinstance(v, str)),
                f'--{f.name} holds bytes that are not UTF-8 text ({ascii(value)[:60]}): give it as text')
        if valid is None:
            continue
        for v in (value,) if isinstance(valid, tuple) else values:
            require(_fits(v, valid), f'--{f.name} must be {_says(valid)}, got {value!r}')


def is_text(s):
    """Whether a str can be written as UTF-8: a command line's undecodable bytes arrive as lone surrogates."""
    try:
        s.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


NANOGPT_KEYS = {  # nanoGPT's names for what a key here does (named where the config has that key)
    'learning_rate': ('lr', '--lr'), 'max_iters': ('budget', '--budget_unit=iters --budget=N'),
    'lr_decay_iters': ('budget', 'the schedule decays over the whole --budget'),
    'warmup_iters': ('warmup_units', '--budget_unit=iters --warmup_units=N'),
    'decay_lr': ('min_lr', 'the lr always follows --schedule; --min_lr equal to --lr keeps it constant'),
    'gradient_accumulation_steps': ('grad_accum', '--grad_accum (per process)'),
}


def _closest(key, keys):
    if key in NANOGPT_KEYS and NANOGPT_KEYS[key][0] in keys:
        return f' (nanoGPT\'s name: here {NANOGPT_KEYS[key][1]})'
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    return f" (closest: {', '.join(near)})" if near else ''


def coerce(key, value, default):
    """Return value as default's type, or raise ConfigError naming the key."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f'--{key} has {len(str(abs(value)))} digits, too large for a float: give a number below 1e308') from None
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if kind is tuple and isinstance(value, tuple) and default:
        return tuple(coerce(key, v, default[0]) for v in value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f'--{key} must be {kind.__name__} like the default {default!r}, got {value!r}')
    return value


def _literal(text, default=None):
    """A command-line value: a Python literal, else the text (a bare word: --optimizer=lion). A text key
    takes the text as given where it reads as another literal: --out_dir=2024 is the folder '2024'."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return text if isinstance(default, str) and not isinstance(value, str) else value


def read_config_file(path):
    """A config file's top-level names; an error inside it is one line naming file:line."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path} not found (or not a file)')
    try:
        names = runpy.run_path(path)
    except SyntaxError as e:
        raise ConfigError(f'{path}:{e.lineno}: syntax error in the config file ({e.msg})') from None
    except Exception as e:
        here = os.path.abspath(path)
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == here]
        raise ConfigError(f'{path}:{lines[-1] if lines else "?"}: the config file raised '
                          f'{type(e).__name__}: {e}') from None
    return {k: v for k, v in names.items() if not k.startswith('_') and not callable(v)
            and type(v).__name__ != 'module'}


def parse(cls, argv):
    """Build a cls instance from defaults, then config files and --key=value overrides, in order.

    The one --quick mechanism: a config class with a `quick` field and a QUICK dict (a class attribute
    of smoke-run values) gets QUICK's value for every key the arguments did not set, when quick is on."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    values, given = dict(defaults), set()
    for arg in argv:
        if arg.startswith('--'):
            name, eq, text = arg[2:].partition('=')
            require(eq, f"expected --key=value, got '{arg}'")
            updates = {name: _literal(text, defaults.get(name))}
        else:
            require(arg.endswith('.py'), f"expected a config file (.py) or --key=value, got '{arg}'")
            updates = read_config_file(arg)
            require(updates, f'config file {arg} sets no keys: it holds lines like `lr = 1e-3`')
        for name, value in updates.items():  # `name`: key() is this module's field declaration
            require(name in defaults, f'unknown config key --{name}{_closest(name, list(defaults))}')
            values[name] = coerce(name, value, defaults[name])
            given.add(name)
    if values.get('quick'):
        values.update({k: v for k, v in getattr(cls, 'QUICK', {}).items() if k not in given})
    cfg = cls(**values)
    check_ranges(cfg)
    return cfg


def cli_args(cfg):
    """The --key=value arguments that rebuild cfg with parse(): every key that differs from its default."""
    return [f'--{f.name}={getattr(cfg, f.name)!r}' for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default]


def field_comments(cls):
    """{key: its trailing comment} from the source of cls and its bases (a subclass's comment wins)."""
    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        name = None
        for line in lines:
            m = re.match(r'(\s+)(\w+)\s*:[^=#]*=[^#]*#\s*(.+)$', line)
            more = re.match(r'(\s+)#\s*(.+)$', line)
            if m:
                indent, name = len(m.group(1)), m.group(2)
                comments[name] = m.group(3).strip()
            elif name and more and len(more.group(1)) > indent:  # a comment continued on lines indented under it
                comments[name] += ' ' + more.group(2).strip()
            else:
                name = None
    return comments


def describe(cls):
    """Every key with its default and the comment beside it (what it does, which stage reads it); from
    the class, so a config whose defaults alone do not validate (a required --input) is described too."""
    comments = field_comments(cls)
    rows = [(f'{f.name} = {f.default!r}', comments.get(f.name, '')) for f in dataclasses.fields(cls)]
    width = min(max(len(r[0]) for r in rows), 40)  # a long default (a tuple of arms) pushes only its own comment
    return '\n'.join(f'  {a:<{width}}  # {c}' if c else f'  {a}' for a, c in rows)


STOPPED = []  # the signals (SIGINT, SIGTERM) that stopped this process's work: its exit status is 128 + the first


def stop_signal_name():
    return signal.Signals(STOPPED[0]).name if STOPPED else 'SIGINT'


def _interrupt(signum, frame):
    STOPPED.append(signum)
    raise KeyboardInterrupt


def exit_stopped(message):
    """End a program that a signal stopped: one line, the shell's status for it (130 SIGINT, 143 SIGTERM)."""
    print(message, file=sys.stderr)
    sys.exit(128 + (STOPPED[0] if STOPPED else signal.SIGINT))


def program_name():
    """How the user started this program: `train.py`, or `-m studies.ntng` for a module of the lab."""
    path = Path(sys.argv[0])
    return f'-m {path.parent.name}.{path.stem}' if path.parent.name == 'studies' else path.name


def cli(entry, cls, argv=None, usage='[config.py ...] [--key=value ...]'):
    """Parse argv into cls and call entry(cfg); user errors become one line on stderr and exit 2.
    usage: what follows the program's name on --help's usage line (budget.py names its command there).

    The one Ctrl-C/SIGTERM path of every entry point: SIGTERM (a scheduler's stop) raises
    KeyboardInterrupt like Ctrl-C; the training loop turns both into a checkpoint at a step boundary
    (signals_between_steps below). A program a signal stopped exits with the shell's status for it, 130
    (SIGINT) or 143 (SIGTERM), even when its work returned: a stopped run is not a finished one."""
    argv = sys.argv[1:] if argv is None else argv
    STOPPED.clear()
    if argv and argv[0] in ('-h', '--help'):
        try:
            print(f'usage: python {program_name()} {usage}\n\nkeys and defaults:\n{describe(cls)}', flush=True)
        except BrokenPipeError:  # `--help | head` closed the pipe: not an error, and no traceback at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = entry(parse(cls, argv))
    except Interrupted as e:
        exit_stopped(str(e))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # disk full, read-only folder, a folder where a file belongs: the machine, not a bug
        fix = (f': {e.filename} (check that path, its permissions and the free disk space, or give another one)'
               if e.filename else ' (check the free disk space and the permissions of the folders written)')
        print(f'error: {e.strerror or e}{fix}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # outside a training step (data, a precompute, a second Ctrl-C): its files are written whole
        exit_stopped(f'stopped by {stop_signal_name()} before it finished: run the same command again to go on')
    if STOPPED:  # the loop stopped at a step boundary and saved: not a finished run, whatever entry returned
        exit_stopped(f'stopped by {stop_signal_name()}: the run saved a checkpoint and is not finished')
    return result


def cli_designs(entry, cls, designs):
    """cli for a study with other designs: a first word names one (its config class), else cls runs; a first
    word that is neither a design nor a config file is one line naming the designs."""
    argv = sys.argv[1:]
    if argv and argv[0] in designs:
        return cli(entry, designs[argv[0]], argv[1:], f'{argv[0]} [config.py ...] [--key=value ...]')
    if argv and not argv[0].startswith('-') and not argv[0].endswith('.py'):
        print(f"error: '{argv[0]}' is no design of this study: give one of {', '.join(designs)}, a config file (.py) "
              'or --key=value (none: the main design)', file=sys.stderr)
        sys.exit(2)
    return cli(entry, cls)


@contextlib.contextmanager
def signals_between_steps():
    """Ctrl-C and SIGTERM mostly land inside a step, after its batch (and layer-drop mask) was drawn:
    raising there would checkpoint the previous step with the data already advanced, and the resumed
    run would skip a batch. They are recorded instead and the loop stops at the next step boundary;
    a second Ctrl-C interrupts at once."""
    stop = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        STOPPED.append(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM held off while a block that must not be torn runs (a checkpoint's write: a second
    Ctrl-C inside torch.save surfaced as its RuntimeError). Each is recorded and delivered again, to the
    handler that was in place, as soon as the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for signum in held:
            signal.raise_signal(signum)
