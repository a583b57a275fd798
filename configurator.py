"""Config files and --key=value overrides, type-checked against a frozen dataclass of defaults.

    python train.py config/gpt2_124m.py --lr=3e-4 --compile=True

Arguments apply left to right: a config file (a Python file you wrote; it is run, so only use your own)
sets any of its top-level names, then each --key=value overrides. Values are parsed with
ast.literal_eval (a bare word stays a string), and must have the default's type (an int is accepted
for a float, a list for a tuple). An unknown key, a wrong type or an out-of-range value is a one-line
error naming the key, exit code 2, no traceback. Unlike nanoGPT's configurator nothing is exec'd into a
module's globals, so every file stays importable and testable.
"""
import ast
import dataclasses
import difflib
import runpy
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class ConfigError(UserError):
    pass


def require(ok, message):
    if not ok:
        raise ConfigError(message)


def _closest(key, keys):
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    return f" (closest: {', '.join(near)})" if near else ''


def coerce(key, value, default):
    """Return value as default's type, or raise ConfigError naming the key."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if kind is tuple and isinstance(value, tuple) and default:
        return tuple(coerce(key, v, default[0]) for v in value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f'--{key} must be {kind.__name__} like the default {default!r}, got {value!r}')
    return value


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: --optimizer=lion


def _read_file(path):
    try:
        names = runpy.run_path(path)
    except FileNotFoundError:
        raise ConfigError(f'config file {path} not found') from None
    return {k: v for k, v in names.items() if not k.startswith('_') and not callable(v)
            and type(v).__name__ != 'module'}


def parse(cls, argv):
    """Build a cls instance from defaults, then config files and --key=value overrides, in order."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    values = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            require(eq, f"expected --key=value, got '{arg}'")
            updates = {key: _literal(text)}
        else:
            require(arg.endswith('.py'), f"expected a config file (.py) or --key=value, got '{arg}'")
            updates = _read_file(arg)
        for key, value in updates.items():
            require(key in defaults, f'unknown config key --{key}{_closest(key, list(defaults))}')
            values[key] = coerce(key, value, defaults[key])
    return cls(**values)


def describe(cfg):
    return '\n'.join(f'  {k} = {v!r}' for k, v in dataclasses.asdict(cfg).items())


def cli(entry, cls, argv=None):
    """Parse argv into cls and call entry(cfg); user errors become one line on stderr and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ('-h', '--help'):
        print(f'usage: python {sys.argv[0]} [config.py ...] [--key=value ...]\n\nkeys and defaults:')
        print(describe(cls()))
        return None
    try:
        return entry(parse(cls, argv))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
