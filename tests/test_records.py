"""studies/records.py: a study's finished runs copied into a record folder, never checkpoints, never a run
still going or stopped, and never over another run's record."""
import json
import re

import pytest

from configurator import UserError
from studies import records
from test_compare import finished, write_run


@pytest.fixture
def study(tmp_path):
    src = tmp_path / 'out'
    done = finished(src, 'baseline/b10/s0', 'baseline', 10.0, 0, 2.0)
    (done / 'ckpt.pt').write_bytes(b'weights')
    (done / 'final_all_val.json').write_text('{"logged_final": 2.0, "val_loss": 1.9, "windows": 9}')
    (src / 'baseline' / 'b10' / 's0.out').write_text('console\n')
    write_run(src, 'baseline/b10/s1', 'baseline', 10.0, 1, [(4.0, 4000, 2.5)])  # still going: 4 of 10 RST
    stopped = finished(src, 'baseline/b10/s2', 'baseline', 10.0, 2, 2.1)
    (stopped / 'stopped.json').write_text('{}')
    return src


def test_finished_runs_are_recorded_without_checkpoints(study, tmp_path, capsys):
    dst = tmp_path / 'records' / 'study-2026-12-06'
    records.main([str(study), str(dst)])
    assert capsys.readouterr().out == (f'1 finished run(s) recorded in {dst}; 2 left out, no finished training run (going, '
                                       'stopped, a log cut short, or no log): baseline/b10/s1, baseline/b10/s2\n')
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob('*') if p.is_file()) == [
        'baseline/b10/s0.out', 'baseline/b10/s0/config.json', 'baseline/b10/s0/final_all_val.json', 'baseline/b10/s0/log.jsonl']
    assert (dst / 'baseline/b10/s0/log.jsonl').read_bytes() == (study / 'baseline/b10/s0/log.jsonl').read_bytes()
    before = {p: p.read_bytes() for p in dst.rglob('*') if p.is_file()}
    records.main([str(study), str(dst)])  # again, as more runs finish: the same run is the same files
    assert {p: p.read_bytes() for p in dst.rglob('*') if p.is_file()} == before


def test_another_run_at_the_same_path_is_refused_before_anything_is_written(study, tmp_path):
    dst = tmp_path / 'records'
    finished(dst, 'baseline/b10/s0', 'baseline', 10.0, 0, 3.0)
    (dst / 'baseline/b10/s0/config.json').write_text(json.dumps({'config': {'label': 'other'}}))
    before = {p: p.read_bytes() for p in dst.rglob('*') if p.is_file()}
    with pytest.raises(UserError, match='records another run than'):
        records.record(study, dst)
    assert {p: p.read_bytes() for p in dst.rglob('*') if p.is_file()} == before


def test_the_command_needs_two_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        records.main([str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith('usage: python -m studies.records')
    with pytest.raises(SystemExit) as e:
        records.main([str(tmp_path / 'none'), str(tmp_path / 'r')])
    assert e.value.code == 2 and 'is not a folder' in capsys.readouterr().err


def test_a_record_folder_must_be_a_folder_outside_the_study_and_get_runs(study, tmp_path, capsys):
    """A record folder inside the study copied the study into itself (twice the runs, then 'both baseline at
    budget 120 seed 0'); a file as the record folder, or a study with no finished run, said nothing useful."""
    for dst, says in ((study / 'records', 'lie one inside the other'), (tmp_path, 'lie one inside the other'),
                      (tmp_path / 'a_file', 'is a file: give a record folder')):
        if dst.name == 'a_file':
            dst.write_text('x')
        with pytest.raises(UserError, match=says):
            records.record(study, dst)
    assert not (study / 'records').exists()
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='holds no finished run'):
        records.record(tmp_path / 'empty', tmp_path / 'r')
    with pytest.raises(SystemExit) as e:
        records.main(['--help'])
    assert e.value.code == 0 and 'python -m studies.records' in capsys.readouterr().out


def files(folder):
    return {p: p.read_bytes() for p in folder.rglob('*') if p.is_file()}


@pytest.mark.parametrize('line, says', [
    ('{"step": 2, "val_lo', 'log.jsonl line 3 is not a JSON record'),
    ('[3]', r'log.jsonl line 3: a list \(\[3\]\), not a record'),
    ('{"step": 50, "val_loss": NaN, "rst": 5.0, "tokens": 5000}', 'log.jsonl line 3: val_loss=nan is not a finite number'),
    ('{"step": 50, "val_loss": 2.5, "rst": "5", "tokens": 5000}', "log.jsonl line 3: rst='5' is not a finite number"),
])
def test_a_finished_run_with_a_damaged_log_is_refused_before_anything_is_written(study, tmp_path, capsys, line, says):
    """A finished run whose log has a damaged middle line (readers drop it, so it still reads as finished) was copied
    into the record, which studies.results --check then refused: now it is refused here, in one line, and neither a
    new record folder nor one already holding records is written."""
    finished(study, 'baseline/b3/s0', 'baseline', 3.0, 0, 2.0)
    log = study / 'baseline' / 'b3' / 's0' / 'log.jsonl'
    lines = log.read_text().splitlines()
    log.write_text('\n'.join(lines[:2] + [line] + lines[3:]) + '\n')
    fresh, kept = tmp_path / 'rec1', tmp_path / 'rec2'
    finished(kept, 'baseline/b10/s0', 'baseline', 10.0, 0, 2.0)  # recorded before (the same run as the study's)
    (kept / 'baseline' / 'b10' / 's0' / 'config.json').write_bytes((study / 'baseline/b10/s0/config.json').read_bytes())
    before = files(kept)
    for dst in (fresh, kept):
        with pytest.raises(SystemExit) as e:
            records.main([str(study), str(dst)])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert re.match(rf'error: {re.escape(str(study))}/baseline/b3/s0/{says}.*: a damaged run is not recorded, and '
                        rf'nothing was written to {re.escape(str(dst))}', err[0]), err[0]
    assert not fresh.exists() and files(kept) == before


def test_a_finished_run_with_a_partial_last_line_or_a_damaged_score_is_refused_whole(study, tmp_path):
    """A log whose last line was cut after its final eval reads as finished (the readers drop a partial last line),
    and results refuses it in a record; a damaged final_all_val.json was refused only after the runs before it had
    been copied: both are refused before anything is written."""
    done = finished(study, 'baseline/b3/s0', 'baseline', 3.0, 0, 2.0)
    with (done / 'log.jsonl').open('a') as f:
        f.write('{"step": 101, "train_lo')
    dst = tmp_path / 'rec'
    with pytest.raises(UserError, match=r'b3/s0/log.jsonl line 9 is not a JSON record: a damaged run is not recorded'):
        records.record(study, dst)
    assert not dst.exists()
    (done / 'log.jsonl').write_text(''.join(l + '\n' for l in (done / 'log.jsonl').read_text().splitlines()[:-1]))
    (done / 'final_all_val.json').write_text('{"logged_final": "x", "val_loss": 1.9, "windows": 9}')
    with pytest.raises(UserError, match=r'b3/s0/final_all_val.json is not a score .*: a damaged run is not recorded'):
        records.record(study, dst)
    assert not dst.exists()
    (done / 'final_all_val.json').unlink()
    records.record(study, dst)
    assert (dst / 'baseline/b3/s0/log.jsonl').read_bytes() == (done / 'log.jsonl').read_bytes()
