"""RESULTS.md is generated, never typed: regenerated here from the committed records, it must equal the
committed file, and every figure it embeds must exist and have been drawn from the records as they are."""
import json
import math
import re

import pytest

from studies import results


def test_results_md_is_what_the_records_give():
    want = results.render().splitlines()
    have = results.OUT.read_text().splitlines()
    first = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), None)
    assert have == want, (f'RESULTS.md line {first + 1 if first is not None else min(len(have), len(want)) + 1} differs '
                          'from the records: run `python -m studies.results`')


def test_every_figure_exists_and_was_drawn_from_the_current_records():
    sources = json.loads((results.FIGURES / 'sources.json').read_text())
    embedded = re.findall(r'\]\((docs/figures/[^)]+\.png)\)', results.OUT.read_text())
    assert embedded, 'RESULTS.md embeds no figure'
    for path in embedded:
        name = path.split('/')[-1]
        assert (results.ROOT / path).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', path
        assert name in sources, f'{name} has no source entry: `python -m studies.results --figures=True`'
        folder = results.RECORDS / sources[name]['records']
        assert results.evidence_hash(folder) == sources[name]['sha256'], (
            f'{name} was drawn from other records than {folder} holds now: `python -m studies.results --figures=True`')


def test_a_changed_record_is_caught(tmp_path):
    """The check is real: one edited digit in one run's log makes its section's table, which render() puts in
    RESULTS.md, differ, and the figure's evidence hash with it."""
    import shutil
    section = results.SECTIONS['ntng_cpu']
    copy = tmp_path / section.records
    shutil.copytree(results.RECORDS / section.records, copy)
    log = next(copy.rglob('baseline/b120/s0/log.jsonl'))
    lines = log.read_text().splitlines()
    last = json.loads(lines[-1])
    last['val_loss'] += 0.01
    log.write_text('\n'.join(lines[:-1] + [json.dumps(last)]) + '\n')
    assert section.table(copy) != section.table(results.RECORDS / section.records)
    assert results.evidence_hash(copy) != results.evidence_hash(results.RECORDS / section.records)


def test_the_finals_prose_claim_holds_for_the_tables_as_they_are():
    """The finals section says the spread of its gap column is smaller than the end nearest zero of every
    better-or-worse cell's 95% CI in the No Train No Gain tables, except the cells it names: re-read from
    RESULTS.md, so a run added later that breaks it fails here and the sentence is reworded."""
    text = results.OUT.read_text()
    tables = text[text.index('## No Train No Gain at CPU scale'):text.index('## Finals on all of val')]
    reading = text[text.index('**Reading so far** (runs scored'):text.index('## Rho-1 Selective')]
    spread = float(re.search(r'spread of the gap column \(largest minus smallest mean\): (\d\.\d+)', text).group(1))
    significant, within = cells_nearest_zero(tables)
    assert significant, 'no better-or-worse cell found: the parsing no longer matches the tables'
    for cell, end in within(spread):
        assert cell in reading, f'{cell} has its CI end {end} within the gap spread {spread}: name it in the finals reading'


def test_every_delta_on_all_of_val_has_the_eval_windows_sign_and_excludes_zero_as_the_reading_says():
    """The finals reading says each Δ on all of val has the sign of its eval windows' Δ, both CIs excluding zero:
    re-read from RESULTS.md's table, so a run added later that breaks it fails here and the sentence is reworded."""
    text = results.OUT.read_text()
    table = text[text.index('## Finals on all of val'):text.index('**Reading so far** (runs scored')]
    interval = r'([+-]\d\.\d+) \[([+-]\d\.\d+), ([+-]\d\.\d+)\] \(n=\d+\)'
    pairs = [(line, re.search(rf'\| {interval} \| {interval} \|\s*$', line)) for line in table.splitlines()]
    pairs = [(line, m) for line, m in pairs if m]
    assert pairs, 'no row with a Δ on both window sets: the parsing no longer matches the table'
    for line, m in pairs:
        d1, lo1, hi1, d2, lo2, hi2 = map(float, m.groups())
        assert d1 * d2 > 0 and lo1 * hi1 > 0 and lo2 * hi2 > 0, line


def cells_nearest_zero(tables):
    """Every better-or-worse cell (Holm *) of the tables as '`label` at B RST' with its CI's end nearest zero,
    and a function of the spread giving the cells whose end is not beyond it."""
    found, budgets = [], []
    for line in tables.splitlines():
        cols = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('| method |'):
            budgets = [c.split()[-1] for c in cols[1:]]
            continue
        for budget, col in zip(budgets, cols[1:] if line.startswith('| ') else []):
            m = re.search(r'Δ [+-]\d\.\d+ \[([+-]\d\.\d+), ([+-]\d\.\d+)\] p=\S+\*', col)
            if m and float(m[1]) * float(m[2]) > 0:
                found.append((f'`{cols[0]}` at {budget} RST', min(abs(float(m[1])), abs(float(m[2])))))
    return found, lambda spread: [(cell, end) for cell, end in found if end <= spread]


def test_the_lr_rerun_table_pairs_every_row_with_the_rerun_baseline(tmp_path):
    """The 480-RST column read against a rerun baseline: here the CPU table's own baseline runs stand in for the
    rerun, so every row's Δ must be the CPU table's and the rerun-against-tuned line exactly zero."""
    import shutil
    cpu = results.RECORDS / 'ntng-cpu-2026-11-30' / 'ablation'
    assert 'pending' in results.lr_rerun_table(tmp_path)
    shutil.copytree(cpu / 'baseline' / 'b480', tmp_path / 'ablation_lr' / 'baseline' / 'b480')
    table = results.lr_rerun_table(tmp_path)
    cpu_table = results.ntng_table(cpu)
    for row in ('stack', 'drop', 'muon', 'sfadamw'):
        assert re.search(rf'^\| {row} \| ', table, re.M), row
    stack_delta = re.search(r'^\| stack \|.*\| (\S+ ± \S+ \(n=5\) Δ \S+ \[\S+, \S+\]) p=\S+ \|$', cpu_table, re.M).group(1)
    assert stack_delta in table
    assert 'Δ +0.0000 [+0.0000, +0.0000]' in table and 'paired seeds 0, 1, 2, 3, 4' in table
    shutil.copytree(cpu / 'stack' / 'b480', tmp_path / 'ablation_lr' / 'stack' / 'b480')  # a rerun row takes its row's place
    table = results.lr_rerun_table(tmp_path)
    assert stack_delta in table  # given once: compare refuses two runs of one cell and seed
    assert re.search(r'^stack at lr \S+ against stack at its tuned lr \S+, 480 RST, paired seeds 0, 1, 2, 3, 4: Δ \+0\.0000 '
                     r'\[\+0\.0000, \+0\.0000\] p=1 -> equivalent within ±0\.02 \(90% CI \[\+0\.0000, \+0\.0000\]\)$', table, re.M)
    for log in (tmp_path / 'ablation_lr' / 'stack' / 'b480').glob('s*/log.jsonl'):  # every seed's last eval 0.05 lower
        records = [json.loads(line) for line in log.read_text().splitlines()]
        last = max(i for i, r in enumerate(records) if 'val_loss' in r)
        records[last]['val_loss'] -= 0.05
        log.write_text(''.join(json.dumps(r) + '\n' for r in records))
    assert re.search(r'^stack at .*: Δ -0\.0500 \[-0\.0500, -0\.0500\] p=0 -> better \(90% CI', results.lr_rerun_table(tmp_path), re.M)
    today = results.RECORDS / 'ntng-today-2026-12-06' / 'ablation'  # a row whose tuning moves another lr key
    shutil.copytree(today / 'muon' / 'b480', tmp_path / 'ablation_lr' / 'muon' / 'b480')
    table = results.lr_rerun_table(tmp_path)
    assert re.search(r'^muon at muon_lr 0\.04 against muon at its tuned muon_lr 0\.04, 480 RST, paired seeds 0, 1, 2, 3, 4: '
                     r'Δ \+0\.0000', table, re.M)


def test_rho_axis_table_crosses_rho_with_lr_and_marks_the_chosen_point(tmp_path):
    """Sophia-G's rho axis: one cell per (rho, lr) run, final and win rate as the run logged them, the tuned
    point in bold, a point not run a dash; the extension's folder joins the CPU tuning's points."""
    import shutil
    cpu = results.RECORDS / 'ntng-cpu-2026-11-30' / 'tune'
    tune, extension = tmp_path / 'tune', tmp_path / 'ext'
    shutil.copy(cpu / 'tuned.json', tune.mkdir() or tune / 'tuned.json')
    for point, base in (('lr0.00025_rho0.04', tune), ('lr0.0005_rho0.16', tune), ('lr0.00025_rho0.16', extension)):
        shutil.copytree(cpu / 'sophiag' / point, base / 'sophiag' / point)
    table = results.rho_axis_table(tune, extension=extension)
    rows = {line.split(' | ')[0].strip('| '): line.split(' | ')[1:] for line in table.splitlines() if line.startswith('| 0.')}
    assert sorted(rows) == ['0.04', '0.16']
    from runs import read_run
    chosen = read_run(str(cpu / 'sophiag' / 'lr0.00025_rho0.04' / 's1000'))
    assert rows['0.04'][0] == f"**{chosen['final']:.4f} ({chosen['stats']['win_rate']:.3f})**"
    assert rows['0.04'][1].strip(' |') == '—'
    assert '**' not in rows['0.16'][0] and rows['0.16'][1].strip(' |') != '—'
    # once the extension's tuned.json is recorded, its choice is the one in bold
    record = json.loads((cpu / 'tuned.json').read_text())
    record['tuned']['sophiag'].update(lr=0.00025, rho=0.16)
    (extension / 'tuned.json').write_text(json.dumps(record))
    table = results.rho_axis_table(tune, extension=extension)
    assert '**' in next(line for line in table.splitlines() if line.startswith('| 0.16 |')).split(' | ')[1]
    assert '**' not in next(line for line in table.splitlines() if line.startswith('| 0.04 |'))


def test_gap_change_line_pairs_each_seeds_gap_across_budgets(monkeypatch):
    """Stacking's gap to the baseline per seed at 960 RST against at 480, by hand: gaps 0.03/0.05/0.04 against
    0.01 each, differences 0.02/0.04/0.03: mean 0.03, sd 0.01, half-width t(2) 4.303 x 0.01/sqrt(3) = 0.0248.
    Read only when every seed the design runs is in (3 here; the protocol's 5 leave these 3 pending)."""
    assert 'pending (3 of 5 paired seeds)' in results.gap_change_line(
        [{'label': r, 'budget': b, 'seed': s, 'final': 1.0, 'complete': True}
         for r in ('baseline', 'stack') for b in (480.0, 960.0) for s in range(3)], 960.0, 480.0)
    monkeypatch.setattr(results, 'paired_seeds', lambda: 3)
    def run(label, budget, seed, final):
        return {'label': label, 'budget': budget, 'seed': seed, 'final': final, 'complete': True}
    runs = [run('baseline', 480.0, s, 1.0) for s in range(3)] + [run('stack', 480.0, s, 1.01) for s in range(3)]
    runs += [run('baseline', 960.0, s, 0.9) for s in range(3)] + [run('stack', 960.0, s, 0.9 + g) for s, g in enumerate((0.03, 0.05, 0.04))]
    line = results.gap_change_line(runs, 960.0, 480.0)
    assert 'paired seeds 0, 1, 2: Δ +0.0300 [+0.0052, +0.0548]' in line and line.endswith('-> stacking loses ground')
    runs[-1]['final'] = 0.9 - 0.05  # differences 0.02/0.04/-0.06: the interval spans 0
    assert results.gap_change_line(runs, 960.0, 480.0).endswith('-> not resolved')
    assert 'pending (1 of 3 paired seeds)' in results.gap_change_line(runs[:6] + runs[6:7] + runs[9:10], 960.0, 480.0)


def test_il_charges_reads_what_each_il_charged_run_paid_before_its_first_step(tmp_path):
    """The CPU table's IL-charged row paid its whole IL search and precompute (more than any budget: no step); a
    run that pays a fraction keeps the rest for its target, and an IL model's own folder is not a row."""
    cpu = results.RECORDS / 'ntng-cpu-2026-11-30' / 'ablation' / 'rho_il_charged'
    run = tmp_path / 'rho_il_f0.1' / 'b120' / 's0'
    run.mkdir(parents=True)
    config = json.loads((cpu / 'b120' / 's0' / 'config.json').read_text())
    config['config'].update(label='rho_il_f0.1', budget=120.0)
    (run / 'config.json').write_text(json.dumps(config))
    records = [{'step': 0, 'il_charged': True, 'il_train_rst': 12.0, 'il_precompute_rst': 85.9, 'il_val_loss': 1.3},
               {'step': 0, 'rst': 97.9, 'tokens': 0.0, 'val_loss': 5.5},
               {'step': 40, 'rst': 121.0, 'tokens': 1.0, 'iters': 40.0, 'val_loss': 2.5}]
    (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    own_il = tmp_path / 'rho_il_f0.1' / 'b120' / 's0_il'  # a whole run of its own, as a record holds it
    own_il.mkdir()
    config['config'].update(label='rho_il', budget=12.0)
    (own_il / 'config.json').write_text(json.dumps(config))
    (own_il / 'log.jsonl').write_text(json.dumps({'step': 10, 'rst': 12.0, 'tokens': 1.0, 'val_loss': 1.3}) + '\n')
    table = results.il_charges([cpu, tmp_path])
    assert '| rho_il_charged | 120 | 3360.03 | 85.90 | 0.00 (0%) | 0 | 5 |' in table
    assert '| rho_il_f0.1 | 120 | 12.00 | 85.90 | 22.10 (18%) | 40 | 1 |' in table and table.count('rho_il_f0.1') == 1
    assert results.il_charges([tmp_path / 'none']) == '(no IL-charged run has finished yet)'


def test_damaged_evidence_stops_the_generation_and_leaves_results_md(tmp_path, monkeypatch):
    """One record cut short (its last line) or a config.json that is no longer JSON: render refuses in one line
    naming the file, before any table is read, so RESULTS.md is never rewritten from damaged evidence."""
    from configurator import UserError
    for damage in (lambda p: p.write_bytes(p.read_bytes()[:-10]), lambda p: p.with_name('config.json').write_text('{')):
        records = tmp_path / str(id(damage)) / 'records'
        log = records / 'study' / 'run' / 'log.jsonl'
        log.parent.mkdir(parents=True)
        log.write_text(json.dumps({'step': 1, 'val_loss': 2.0}) + '\n' + json.dumps({'step': 2, 'val_loss': 1.9}) + '\n')
        log.with_name('config.json').write_text(json.dumps({'config': {'budget': 1.0}}))
        results.check_records_whole(records)  # whole: passes
        damage(log)
        monkeypatch.setattr(results, 'ROOT', tmp_path)
        with pytest.raises(UserError, match=r'study/run/(log.jsonl line 2|config.json) is not a JSON record: the record is damaged'):
            results.check_records_whole(records)


# -----------------------------------------------------------------------------
# a record valid as JSON but of the wrong shape: one line naming the file, the field and the fix, never a traceback

CPU_TUNE = results.RECORDS / 'ntng-cpu-2026-11-30' / 'tune'


def damage(path, edit):
    """Rewrite the JSON file at path: edit(its value) changes it in place; an edit that is no function is its new value."""
    value = json.loads(path.read_text())
    if callable(edit):
        edit(value)
    path.write_text(json.dumps(value if callable(edit) else edit))


@pytest.mark.parametrize('edit, says', [
    (lambda r: r.update(budget='x'), "budget='x' is not a positive number"),
    ([], r'the file holds a list \(\[\]\), not a record'),
    (lambda r: r.update(budget=math.nan), 'budget=nan is not a positive number'),
    (lambda r: r.pop('tuned'), 'tuned is missing'),
    (lambda r: r['tuned']['stack'].update(grid=[{'lr': 'x'}]), r"tuned.stack.grid\[0\].lr='x' is not a positive number"),
    (lambda r: r['tuned']['stack'].update(grid=[{'lr': 0.1, 'final': 2.0}]), r'tuned.stack.grid\[0\].extra is missing'),
    (lambda r: r['tuned']['stack'].pop('lr'), 'tuned.stack.lr is missing'),
    (lambda r: r['tuned'].update(stack=[]), 'tuned.stack holds a list'),
])
def test_a_tuned_json_of_the_wrong_shape_is_one_line(tmp_path, edit, says):
    """The tuning table indexed tuned.json's keys unchecked: a budget that is text, a list for the record or a grid
    point without its keys was a ValueError, TypeError or KeyError with a traceback."""
    from configurator import UserError
    tuned = tmp_path / 'tune' / 'tuned.json'
    tuned.parent.mkdir()
    tuned.write_bytes((CPU_TUNE / 'tuned.json').read_bytes())
    assert 'tuned at budget 120' in results.tuning(tuned.parent)
    damage(tuned, edit)
    with pytest.raises(UserError, match=rf'tune/tuned.json: {says}.*: the record is damaged; restore it \(git checkout -- '):
        results.tuning(tuned.parent)
    tuned.write_text('')
    with pytest.raises(UserError, match='tuned.json is not a JSON record: the record is damaged'):
        results.tuning(tuned.parent)


def rho_axis_copy(tmp_path):
    """The CPU tuning's tuned.json and two of its Sophia-G points, and an empty extension: rho_axis_table's input."""
    import shutil
    tune = tmp_path / 'tune'
    tune.mkdir()
    shutil.copy(CPU_TUNE / 'tuned.json', tune / 'tuned.json')
    for point in ('lr0.00025_rho0.04', 'lr0.0005_rho0.16'):
        shutil.copytree(CPU_TUNE / 'sophiag' / point, tune / 'sophiag' / point)
    return tune, tmp_path / 'ext'


@pytest.mark.parametrize('edit, says', [
    (lambda c: c['config'].pop('rho'), r'config.json: rho is missing \(a positive number\)'),
    (lambda c: c['config'].update(lr='x'), "config.json: lr='x' is not a positive number"),
    (lambda c: c['config'].update(budget=math.nan), 'config.json: budget=nan is not a positive number'),
    ([], r"config.json holds no 'config' record"),
])
def test_a_run_config_of_the_wrong_shape_is_one_line(tmp_path, edit, says):
    """Sophia-G's rho axis read config.json's rho and lr unchecked (a KeyError when one was missing)."""
    from configurator import UserError
    tune, ext = rho_axis_copy(tmp_path)
    assert '| 0.04 |' in results.rho_axis_table(tune, extension=ext)
    config = tune / 'sophiag' / 'lr0.0005_rho0.16' / 's1000' / 'config.json'
    damage(config, edit)
    with pytest.raises(UserError, match=rf'lr0.0005_rho0.16/s1000/{says}.*: the record is damaged; restore it '
                                        r'\(git checkout -- .*lr0.0005_rho0.16/s1000\)'):
        results.rho_axis_table(tune, extension=ext)
    damage(tune / 'tuned.json', lambda r: r['tuned']['sophiag'].pop('rho'))
    with pytest.raises(UserError, match='tuned.json: tuned.sophiag.rho is missing'):
        results.rho_axis_table(tune, extension=ext)


@pytest.mark.parametrize('line, says', [
    ('{"step": 2, "val_lo', 'log.jsonl line 3 is not a JSON record'),
    ('[1, 2]', r'log.jsonl line 3: a list \(\[1, 2\]\), not a record'),
    ('{"step": 50, "val_loss": NaN, "rst": 6.2, "tokens": 1.0}', 'log.jsonl line 3: val_loss=nan is not a finite number'),
])
def test_a_damaged_log_line_is_one_line_where_a_table_would_leave_the_run_out(tmp_path, line, says):
    """The lr check's table and the finals' leave out a run they cannot read (right for a study still running, wrong
    for a record, whose every run finished): a record's damaged log is refused, naming the line."""
    import shutil
    from configurator import UserError
    check = results.RECORDS / 'ntng-lr-check-2026-12-06' / 'baseline'
    shutil.copytree(check, tmp_path / 'baseline')
    assert '| baseline |' in results.lr_check(tmp_path)
    log = tmp_path / 'baseline' / 'x1' / 's1000' / 'log.jsonl'
    lines = log.read_text().splitlines()
    log.write_text('\n'.join(lines[:2] + [line] + lines[3:]) + '\n')
    with pytest.raises(UserError, match=rf'baseline/x1/s1000/{says}.*: the record is damaged'):
        results.lr_check(tmp_path)


def test_a_rerun_config_without_its_lr_is_one_line(tmp_path):
    """The rerun line read each run's lr from config.json unchecked: a KeyError where it was missing."""
    import shutil
    from configurator import UserError
    cpu = results.RECORDS / 'ntng-cpu-2026-11-30' / 'ablation' / 'baseline' / 'b480'
    shutil.copytree(cpu, tmp_path / 'rerun')
    assert 'Δ +0.0000' in results.rerun_line('baseline', tmp_path / 'rerun', cpu, 480.0)
    damage(tmp_path / 'rerun' / 's0' / 'config.json', lambda c: c['config'].pop('lr'))
    with pytest.raises(UserError, match=r'rerun/s0/config.json: lr is missing \(a positive number\): the record is damaged'):
        results.rerun_line('baseline', tmp_path / 'rerun', cpu, 480.0)


@pytest.mark.parametrize('value', ['x', None, math.nan, -1.0])
def test_what_an_il_charged_run_paid_of_the_wrong_type_is_one_line(tmp_path, value):
    import shutil
    from configurator import UserError
    cpu = results.RECORDS / 'ntng-cpu-2026-11-30' / 'ablation' / 'rho_il_charged' / 'b120' / 's0'
    shutil.copytree(cpu, tmp_path / 'rho_il_charged' / 'b120' / 's0')
    log = tmp_path / 'rho_il_charged' / 'b120' / 's0' / 'log.jsonl'
    lines = log.read_text().splitlines()
    first = json.loads(lines[0])
    assert first['il_charged']
    first['il_train_rst'] = value
    log.write_text('\n'.join([json.dumps(first)] + lines[1:]) + '\n')
    with pytest.raises(UserError, match=r's0/log.jsonl line 1: il_train_rst=\S+ is not a number of RST'):
        results.il_charges([tmp_path])


def test_damaged_eval_window_floors_are_one_line(tmp_path):
    """compare reads the eval windows' floors of a recorded floors file where they are recorded: a number in
    place of their record was an AttributeError."""
    import shutil
    from configurator import UserError
    cpu = results.RECORDS / 'ntng-cpu-2026-11-30' / 'ablation'
    shutil.copytree(cpu / 'baseline' / 'b120', tmp_path / 'baseline' / 'b120')
    floors = tmp_path / 'ablation.floors.json'
    shutil.copy(cpu / 'ablation.floors.json', floors)
    assert 'n-gram floors, eval windows' in results.ntng_table(tmp_path)
    for edit, says in ((lambda f: f.update(window_floors=5), "window_floors=5 is not the eval windows' floors"),
                       (lambda f: f.pop('windows'), r'windows is missing \(the eval windows \[block_size, count\]\)'),
                       (lambda f: f['window_floors'].update(bigram='x'), "window_floors=.* is not the eval windows' floors"),
                       (lambda f: f['floors'].update(bigram=math.nan), "floors=.* is not the val split's floors"),
                       ([], r'the file holds a list \(\[\]\), not a record')):
        shutil.copy(cpu / 'ablation.floors.json', floors)
        damage(floors, edit)
        with pytest.raises(UserError, match=f'ablation.floors.json: {says}.*: the record is damaged'):
            results.ntng_table(tmp_path)


def test_the_command_refuses_a_record_of_the_wrong_shape_in_one_line(tmp_path, monkeypatch, capsys):
    """Through the command, as a user meets it: `error: <file>: <field> ...`, exit 2, RESULTS.md untouched."""
    from configurator import cli
    (tmp_path / 'out' / 'records' / 'tune').mkdir(parents=True)
    tuned = tmp_path / 'out' / 'records' / 'tune' / 'tuned.json'
    tuned.write_bytes((CPU_TUNE / 'tuned.json').read_bytes())
    (tmp_path / 'template.md').write_text('# results\n{{tuning}}\n')
    (tmp_path / 'RESULTS.md').write_text('as it was\n')
    for name, value in (('ROOT', tmp_path), ('RECORDS', tmp_path / 'out' / 'records'),
                        ('TEMPLATE', tmp_path / 'template.md'), ('OUT', tmp_path / 'RESULTS.md'),
                        ('SECTIONS', {'tuning': results.Section('tune', results.tuning)})):
        monkeypatch.setattr(results, name, value)
    cli(results.main, results.ResultsConfig, [])
    assert 'tuned at budget 120' in (tmp_path / 'RESULTS.md').read_text()
    capsys.readouterr()
    damage(tuned, lambda r: r.update(budget='x'))
    for argv in (['--check=True'], []):
        with pytest.raises(SystemExit) as e:
            cli(results.main, results.ResultsConfig, argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            "error: out/records/tune/tuned.json: budget='x' is not a positive number: the record is damaged; restore it "
            '(git checkout -- out/records/tune/tuned.json) or record its run again']
    assert 'tuned at budget 120' in (tmp_path / 'RESULTS.md').read_text()


def test_a_cost_table_of_the_wrong_shape_is_one_line(tmp_path, monkeypatch):
    """update_costs shows each table's dates: an 'added' that is not a record of entries was an AttributeError."""
    from configurator import UserError
    for path in ('config/rst/gpt_L4_H4_D128_T128_V256_B32.json', 'config/rst/h200/gpt_L4_H4_D128_T128_V256_B32.json'):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes((results.ROOT / path).read_bytes())
    monkeypatch.setattr(results, 'ROOT', tmp_path)
    assert '| CPU | muon |' in results.update_costs(tmp_path)
    damage(tmp_path / 'config/rst/gpt_L4_H4_D128_T128_V256_B32.json', lambda t: t.update(added=[]))
    with pytest.raises(UserError, match=r'^config/rst/gpt_L4_H4_D128_T128_V256_B32.json: added=\[\] is not a record of each '
                                        r"added entry's date, device and threads: restore it \(git checkout -- "):
        results.update_costs(tmp_path)


def test_figures_without_matplotlib_is_one_line_before_anything_is_written(monkeypatch):
    """--figures=True without matplotlib: refused naming the install, RESULTS.md and docs/figures untouched (it
    rewrote RESULTS.md, then failed copying a figure never drawn, naming a temporary file and the disk)."""
    import sys
    from configurator import UserError
    before = {p: p.read_bytes() for p in [results.OUT, *results.FIGURES.iterdir()]}
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib raises ImportError
    with pytest.raises(UserError, match='--figures=True draws with matplotlib, which is not installed: pip install'):
        results.main(results.ResultsConfig(figures=True))
    assert {p: p.read_bytes() for p in [results.OUT, *results.FIGURES.iterdir()]} == before
