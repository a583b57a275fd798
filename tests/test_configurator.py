"""configurator: config files then --key=value in order, type checks, one-line errors with exit code 2."""
import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import ROOT, run_script
from configurator import ConfigError, cli, parse, require


@dataclass(frozen=True)
class Toy:
    lr: float = 0.1
    steps: int = 10
    name: str = 'adamw'
    flag: bool = False
    betas: tuple = (0.9, 0.95)
    anything: tuple = ()

    def __post_init__(self):
        require(self.steps > 0, f'--steps must be positive, got {self.steps}')


def write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_untouched_without_arguments():
    assert parse(Toy, []) == Toy()


def test_file_then_overrides_apply_in_order(tmp_path):
    first = write(tmp_path / 'a.py', 'import math\nlr = 0.5\nsteps = 3\n_private = 1\ndef helper(): pass\n')
    second = write(tmp_path / 'b.py', 'steps = 7\n')
    cfg = parse(Toy, [first, '--lr=0.25'])
    assert (cfg.lr, cfg.steps) == (0.25, 3)       # the override after the file wins
    cfg = parse(Toy, ['--lr=0.25', first])
    assert (cfg.lr, cfg.steps) == (0.5, 3)        # the file after the override wins
    cfg = parse(Toy, [first, second, '--steps=9', '--name=lion'])
    assert (cfg.lr, cfg.steps, cfg.name) == (0.5, 9, 'lion')
    assert parse(Toy, [first, second]).steps == 7


def test_values_are_literals_and_bare_words_stay_strings():
    cfg = parse(Toy, ['--lr=3e-4', '--steps=12', '--name=lion', '--flag=True', "--anything=(1, 'a')"])
    assert cfg == Toy(lr=3e-4, steps=12, name='lion', flag=True, anything=(1, 'a'))
    assert parse(Toy, ["--name='1'"]).name == '1'


def test_int_accepted_for_float_and_becomes_float():
    cfg = parse(Toy, ['--lr=1'])
    assert cfg.lr == 1.0 and type(cfg.lr) is float


def test_a_text_key_takes_number_like_text_as_given_but_a_config_file_is_typed(tmp_path):
    """--out_dir=2024 names the folder '2024' (a shell cannot easily quote it as a Python string); in a
    config file, `name = 3` is a number where text belongs: refused, naming the key."""
    for text in ('3', '2024', 'True', 'None', '(1, 2)', '1e400'):
        assert parse(Toy, [f'--name={text}']).name == text
    with pytest.raises(ConfigError, match="--name must be str like the default 'adamw', got 3"):
        parse(Toy, [write(tmp_path / 'c.py', 'name = 3\n')])


@pytest.mark.parametrize('source', ['--lr=1' + '0' * 400, 'lr = 10 ** 400\n'])
def test_an_integer_too_large_for_a_float_key_is_one_line(tmp_path, source):
    argv = [source] if source.startswith('--') else [write(tmp_path / 'big.py', source)]
    with pytest.raises(ConfigError, match=r'^--lr has 401 digits, too large for a float: give a number below 1e308$'):
        parse(Toy, argv)


def test_list_becomes_tuple_with_element_types():
    cfg = parse(Toy, ['--betas=[0.8, 1]'])
    assert cfg.betas == (0.8, 1.0) and type(cfg.betas) is tuple and type(cfg.betas[1]) is float
    assert parse(Toy, ['--anything=[1, 2]']).anything == (1, 2)
    with pytest.raises(ConfigError, match='--betas'):
        parse(Toy, ["--betas=['a', 0.9]"])


@pytest.mark.parametrize('arg, key', [('--lr=fast', '--lr'), ('--steps=1.5', '--steps'), ('--steps=True', '--steps'),
                                      ('--flag=1', '--flag'), ('--betas=0.9', '--betas')])
def test_wrong_type_names_the_key(arg, key):
    with pytest.raises(ConfigError, match=key):
        parse(Toy, [arg])


@pytest.mark.parametrize('arg, says', [('--learning_rate=1e-3', "(nanoGPT's name: here --lr)"),
                                       ('--max_iters=5000', "(nanoGPT's name: here --budget_unit=iters --budget=N)"),
                                       ('--gradient_accumulation_steps=8', "(nanoGPT's name: here --grad_accum (per process))")])
def test_a_nanogpt_key_is_named_as_it_is_here(arg, says):
    import train
    with pytest.raises(ConfigError, match=re.escape(f'unknown config key {arg.split("=")[0]} {says}')):
        parse(train.TrainConfig, [arg])
    with pytest.raises(ConfigError) as e:  # a config without the key it names here (Toy has no budget): no such hint
        parse(Toy, ['--max_iters=1'])
    assert 'nanoGPT' not in str(e.value)


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r'--stpes.*steps'):
        parse(Toy, ['--stpes=3'])
    with pytest.raises(ConfigError, match='--bogus'):
        parse(Toy, [write(tmp_path / 'c.py', 'bogus = 1\n')])
    with pytest.raises(ConfigError, match='--steps'):
        parse(Toy, [write(tmp_path / 'd.py', "steps = 'ten'\n")])


def test_malformed_arguments_are_errors(tmp_path):
    with pytest.raises(ConfigError, match='--lr'):
        parse(Toy, ['--lr'])
    with pytest.raises(ConfigError, match='config file'):
        parse(Toy, ['notes.txt'])
    with pytest.raises(ConfigError, match='not found'):
        parse(Toy, [str(tmp_path / 'missing.py')])
    with pytest.raises(ConfigError, match='sets no keys'):  # e.g. a JSON object saved as .py
        parse(Toy, [write(tmp_path / 'e.py', '{"lr": 1e-3}\n')])


def test_cli_exits_2_with_one_line(capsys):
    for argv in (['--steps=0'], ['--lr=x'], ['--nope=1']):
        with pytest.raises(SystemExit) as e:
            cli(lambda cfg: None, Toy, argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith('error: '), err
    assert cli(lambda cfg: cfg.steps, Toy, ['--steps=4']) == 4


def test_a_machine_error_exits_1_with_one_line_naming_the_path_and_a_fix(capsys):
    def entry(cfg):
        raise PermissionError(1, 'Operation not permitted', '/sys/run')
    with pytest.raises(SystemExit) as e:
        cli(entry, Toy, [])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith('error: Operation not permitted: /sys/run (') and 'give another' in err, err

    def full(cfg):
        raise OSError(28, 'No space left on device')  # a write's error names no file
    with pytest.raises(SystemExit):
        cli(full, Toy, [])
    err = capsys.readouterr().err
    assert err == 'error: No space left on device (check the free disk space and the permissions of the folders written)\n'


def test_a_stop_outside_a_training_step_says_how_to_go_on(capsys):
    """Ctrl-C in work outside the loop (building a corpus, a precompute, a second Ctrl-C): exit 130 and one line
    naming the signal and what to do (it was a bare "interrupted")."""
    def entry(cfg):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli(entry, Toy, [])
    assert e.value.code == 130
    assert capsys.readouterr().err == 'stopped by SIGINT before it finished: run the same command again to go on\n'


def test_train_config_tuple_and_float_keys():
    from train import TrainConfig
    cfg = parse(TrainConfig, ['--stack_fracs=[0.25, 0.5]', '--lr=1', '--model=tiny'])
    assert cfg.stack_fracs == (0.25, 0.5) and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert dataclasses.asdict(cfg)['model'] == 'tiny'


@pytest.mark.parametrize('arg, names', [('--lrr=1', ['--lrr', 'closest', 'lr']),
                                        ('--batch_size=1.5', ['--batch_size', 'int'])])
def test_train_script_rejects_bad_keys_without_traceback(arg, names):
    out = run_script('train.py', arg)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert 'Traceback' not in out.stderr
    for name in names:
        assert name in lines[0], lines[0]


def test_require_writable_names_a_file_in_the_way(tmp_path):
    from configurator import require_writable
    (tmp_path / 'afile').write_text('x')
    with pytest.raises(ConfigError, match='afile is a file, not a folder'):
        require_writable(tmp_path / 'afile' / 'sub' / 'out.md')
    with pytest.raises(ConfigError, match='is a folder: give a file name'):
        require_writable(tmp_path)
    require_writable(tmp_path / 'new' / 'out.md')  # a folder still to make is fine


@pytest.mark.parametrize('script', ['train.py', 'rho.py', 'slm.py', 'madpo.py', 'data/text/prepare.py', 'data/stdlib/prepare.py'])
def test_help_lists_every_key_even_where_the_defaults_alone_do_not_validate(script):
    out = run_script(script, '--help')  # data/text/prepare.py requires --input: its defaults raise
    assert out.returncode == 0 and 'keys and defaults:' in out.stdout, out.stderr[-2000:]


def test_help_prints_a_comment_continued_on_lines_indented_under_it_in_full():
    """A key whose comment runs on (indented under it) is printed whole; a section comment after a key
    (at the keys' own indent) is not taken as its continuation."""
    from configurator import field_comments

    @dataclass
    class C:
        a: int = 1  # first line
                    # and its second
        # section
        b: int = 2  # b's
    comments = field_comments(C)
    assert comments == {'a': 'first line and its second', 'b': "b's"}
    import train
    assert field_comments(train.TrainConfig)['dtype'].endswith("the fused loss's 1/N-scaled ones first)")
    assert 'gamma_f' in field_comments(train.TrainConfig) and not field_comments(train.TrainConfig)['gamma_f'].endswith('optimizer')


@pytest.mark.parametrize('argv, usage', [(['-m', 'studies.ntng', 'tune'], 'python -m studies.ntng tune '),
                                         (['-m', 'studies.ntng', 'ablate'], 'python -m studies.ntng ablate '),
                                         (['-m', 'studies.ntng', 'compare'], 'python -m studies.ntng compare '),
                                         (['calibrate.py'], 'python calibrate.py '),
                                         (['budget.py', 'schedules'], 'python budget.py schedules ')])
def test_help_names_its_command_and_a_closed_pipe_is_no_traceback(argv, usage):
    out = run_script(*argv, '--help')
    assert out.returncode == 0 and out.stdout.startswith(f'usage: {usage}'), out.stdout[:200]
    r, w = os.pipe()
    os.close(r)  # the reader already gone, as when `| head` has its lines: the write meets a closed pipe
    try:
        closed = subprocess.run([sys.executable, *argv, '--help'], cwd=ROOT, stdout=w,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert closed.returncode == 0 and 'Traceback' not in closed.stderr and 'BrokenPipe' not in closed.stderr, closed.stderr


@pytest.mark.parametrize('arg, says', [('--seed=99999999999999999999', '--seed must be below 2**63 in size'),
                                       ('--start=\udced\udca0\udc80', 'holds bytes that are not UTF-8 text'),
                                       ('--out_dir=out/\udcff', '--out_dir holds bytes that are not UTF-8 text')])
def test_integers_past_int64_and_undecodable_bytes_are_one_line(arg, says):
    """A command line's undecodable bytes arrive as lone surrogates, which no file, log or tokenizer can
    write; an integer past int64 overflows torch's and numpy's seeding: both refused before anything runs."""
    import train
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse(train.TrainConfig, [arg])


def test_a_study_names_its_designs_when_the_first_word_is_none_of_them(monkeypatch, capsys):
    """`python -m studies.slm nosuch` said only "expected a config file (.py) or --key=value": one line naming
    the designs; a design's name picks its config, and no first word the main one."""
    from configurator import cli_designs
    from studies import slm as study
    ran = []
    for argv in (['control', '--jobs=1'], ['--jobs=1']):
        monkeypatch.setattr(sys, 'argv', ['studies/slm.py', *argv])
        cli_designs(lambda cfg: ran.append(type(cfg)), study.StudyConfig, study.DESIGNS)
    assert ran == [study.ControlConfig, study.StudyConfig]
    monkeypatch.setattr(sys, 'argv', ['studies/slm.py', 'nosuch'])
    with pytest.raises(SystemExit) as e:
        cli_designs(lambda cfg: pytest.fail('ran'), study.StudyConfig, study.DESIGNS)
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: 'nosuch' is no design of this study: give one of control, a config file (.py) or --key=value (none: "
        'the main design)']
