"""Hostile but realistic data inputs (issue 17, classes 1, 4 and 10): each ends in one line naming what is
wrong and how to fix it, a non-zero exit, no traceback, and nothing already prepared lost.

Class 1: a corpus is built beside its target and swapped in only when complete, so a failed re-prepare
(bad input, disk full, Ctrl-C, a second prepare at once) leaves the old corpus byte for byte.
Class 4: corpus files that parse but lie (meta.json of the wrong shape or types, a dtype or vocab_size
that does not match the tokens, truncated streams) are refused before a token is read.
Class 10: corpus names cannot leave the data folder, and the hint for a missing dataset is a command
that works."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import configurator
import data.loader as loader
from conftest import ROOT, run_script
from data.fineweb_edu import prepare as fineweb
from data.loader import DATA_ROOT, Corpus, CorpusBuild, DataError, data_dir, get_tokenizer, write_corpus
from data.ngram import ngram_floors
from data.text import prepare as text_prepare

WORDS = ['alpha', 'beta', 'gamma', 'tensor', 'loss', 'token', 'batch', 'zeta', 'é', '∑']


def docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [(f'doc{i}', ' '.join(rng.choice(WORDS, 30 + i)) + '\n') for i in range(n)]


def files(folder):
    """The corpus files of a folder, by name (caches such as checked.json left out)."""
    return {n: (folder / n).read_bytes() for n in ('train.bin', 'val.bin', 'meta.json', 'noise.bin') if (folder / n).exists()}


def leftovers(target):
    """Temporaries a build may leave: its build folder or lock beside the target, temp files inside."""
    return sorted(p.name for p in target.parent.glob(f'.{target.name}.*')) + \
        (sorted(p.name for p in target.glob('*.tmp*')) if target.is_dir() else [])


def one_line_exit(capsys, entry, cls, argv, code=2):
    with pytest.raises(SystemExit) as e:
        configurator.cli(entry, cls, argv)
    err = capsys.readouterr().err
    assert e.value.code == code and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    return err


@pytest.fixture
def old(tmp_path):
    """An existing corpus (with a noise.bin of its own, like mathmix's) and its files' bytes."""
    target = tmp_path / 'corpus'
    write_corpus(target, docs(), get_tokenizer('byte'), 'old', val_frac=0.2, extra_files={'noise.bin': b'old noise'})
    return target, files(target)


# -----------------------------------------------------------------------------
# class 1: a failed re-prepare never destroys the working corpus

def test_reprepare_with_too_little_input_keeps_the_old_corpus(tmp_path, text_name):
    book = tmp_path / 'book.txt'
    book.write_text(''.join(t for _, t in docs(200)))
    text_prepare.prepare(text_prepare.PrepareConfig(input=str(book), name=text_name, doc_chars=500))
    target = DATA_ROOT / 'text' / text_name / 'byte'
    before = files(target)
    (tmp_path / 'tiny.txt').write_text('one short document')  # no val split possible
    out = run_script('data/text/prepare.py', f'--input={tmp_path / "tiny.txt"}', f'--name={text_name}', '--overwrite=True')
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and 'val split' in out.stderr, out.stderr
    assert files(target) == before and leftovers(target) == []
    Corpus(target)


def test_a_name_already_built_from_another_input_is_kept_unless_overwrite(tmp_path, text_name):
    """A mistyped --name must not replace a corpus that checkpoints were trained on (they would no longer
    resume): another --input under that name is refused before anything is read; the same --input rebuilds."""
    book, other = tmp_path / 'book.txt', tmp_path / 'other.txt'
    book.write_text(''.join(t for _, t in docs(200)))
    other.write_text(''.join(t for _, t in docs(200, seed=3)))
    text_prepare.prepare(text_prepare.PrepareConfig(input=str(book), name=text_name, doc_chars=500))
    target = DATA_ROOT / 'text' / text_name / 'byte'
    before = files(target)
    out = run_script('data/text/prepare.py', f'--input={other}', f'--name={text_name}', '--doc_chars=500')
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f'error: {target} already holds a corpus built from {book}: give another --name, or --overwrite=True to replace it'], out.stderr
    assert files(target) == before and leftovers(target) == []
    out = run_script('data/text/prepare.py', f'--input={book}', f'--name={text_name}', '--doc_chars=500')
    assert out.returncode == 0 and files(target) == before, out.stderr  # the same input: rebuilt, the same bytes
    out = run_script('data/text/prepare.py', f'--input={other}', f'--name={text_name}', '--doc_chars=500', '--overwrite=True')
    assert out.returncode == 0 and Corpus(target).meta['source'] == str(other) and files(target) != before, out.stderr


def half_then_enospc(real, victim):
    """atomic_write_bytes that writes half of `victim` into its temp file, then fails like a full disk."""
    def write(path, data):
        if os.path.basename(path) != victim:
            return real(path, data)

        def half(f):
            f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return loader.atomic_write(path, half)
    return write


@pytest.mark.parametrize('victim', ['train.bin', 'val.bin', 'noise.bin', 'meta.json', 'checked.json'])
def test_disk_full_at_any_write_keeps_the_old_corpus(old, monkeypatch, victim):
    target, before = old
    monkeypatch.setattr(loader, 'atomic_write_bytes', half_then_enospc(loader.atomic_write_bytes, victim))
    new_docs = docs(80, seed=1)
    if victim == 'checked.json':  # a cache the reader writes: its failure costs nothing
        write_corpus(target, new_docs, get_tokenizer('byte'), 'new', val_frac=0.2, extra_files={'noise.bin': b'new'})
        assert files(target)['noise.bin'] == b'new' and leftovers(target) == []
        return
    with pytest.raises(DataError, match='No space left on device.*nothing was changed'):
        write_corpus(target, new_docs, get_tokenizer('byte'), 'new', val_frac=0.2, extra_files={'noise.bin': b'new'})
    assert files(target) == before and leftovers(target) == []
    Corpus(target)


def test_disk_full_through_a_prepare_script_is_one_line(capsys, monkeypatch, text_name, tmp_path):
    (tmp_path / 'a.txt').write_text(''.join(t for _, t in docs(100)))
    argv = [f'--input={tmp_path / "a.txt"}', f'--name={text_name}', '--doc_chars=400']
    configurator.cli(text_prepare.prepare, text_prepare.PrepareConfig, argv)
    target = DATA_ROOT / 'text' / text_name / 'byte'
    before = files(target)
    monkeypatch.setattr(loader, 'atomic_write_bytes', half_then_enospc(loader.atomic_write_bytes, 'train.bin'))
    err = one_line_exit(capsys, text_prepare.prepare, text_prepare.PrepareConfig, argv + ['--doc_chars=300'])
    assert 'No space left on device' in err and files(target) == before and leftovers(target) == []


def test_ctrl_c_mid_build_keeps_the_old_corpus_and_removes_temporaries(old):
    target, before = old

    def interrupted():
        yield from docs(30)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_corpus(target, interrupted(), get_tokenizer('byte'), 'new', val_frac=0.2)
    assert files(target) == before and leftovers(target) == []


def test_a_killed_prepares_leftovers_are_taken_over(old):
    """SIGKILL leaves a build folder and a lock file (its flock died with it): the next prepare proceeds."""
    target, _ = old
    (target.parent / '.corpus.build').mkdir()
    (target.parent / '.corpus.build' / 'train.bin.tmp123').write_bytes(b'half')
    (target.parent / '.corpus.lock').write_text('999999\n')
    (target / 'val.bin.tmp77').write_bytes(b'old-style temporary')
    write_corpus(target, docs(70, seed=2), get_tokenizer('byte'), 'new', val_frac=0.2)
    assert Corpus(target).meta['source'] == 'new' and leftovers(target) == []


def test_a_second_prepare_refuses_while_the_first_holds_the_lock(capsys, text_name, tmp_path):
    """flock locks belong to an open file, so a second open in this process contends like another process."""
    target = DATA_ROOT / 'text' / text_name / 'byte'
    (tmp_path / 'a.txt').write_text(''.join(t for _, t in docs(100)))
    with CorpusBuild(target):
        err = one_line_exit(capsys, text_prepare.prepare, text_prepare.PrepareConfig,
                            [f'--input={tmp_path / "a.txt"}', f'--name={text_name}'])
        assert (target.parent / '.byte.lock').exists() and (target.parent / '.byte.build').is_dir()
    assert f'another prepare (pid {os.getpid()}) is writing' in err and not target.exists()
    assert leftovers(target) == []  # the lock file and build folder go with their holder


def test_a_run_that_finds_the_default_corpus_being_prepared_waits_and_uses_it(tmp_path, monkeypatch, capsys):
    """Two runs started at once on a fresh clone (budget.py --jobs=2) both find no stdlib corpus: the
    second waits for the first's prepare and reads its corpus, instead of failing or building it again."""
    import threading
    import time
    import train
    target = tmp_path / 'stdlib' / 'byte'
    monkeypatch.setattr(train, 'data_dir', lambda dataset, tokenizer: target)

    def slow_docs():
        time.sleep(1.5)
        yield from docs(70)
    other = threading.Thread(target=write_corpus, args=(target, slow_docs(), get_tokenizer('byte'), 'the other run'))
    other.start()
    while not (target.parent / '.byte.lock').exists():
        time.sleep(0.01)
    corpus = train.load_corpus(train.TrainConfig())
    other.join()
    assert corpus.meta['source'] == 'the other run' and 'preparing the embedded stdlib corpus' in capsys.readouterr().out


def test_two_prepares_started_at_once_leave_one_good_corpus(text_name, tmp_path):
    book = tmp_path / 'book.txt'
    book.write_text(''.join(t for _, t in docs(800)))
    cmd = [sys.executable, 'data/text/prepare.py', f'--input={book}', f'--name={text_name}', '--doc_chars=2000']
    runs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(r.wait(timeout=120), r.stderr.read()) for r in runs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or (rc == 2 and 'another prepare' in err and len(err.strip().splitlines()) == 1), err
    target = DATA_ROOT / 'text' / text_name / 'byte'
    alone = tmp_path / 'alone'  # the same corpus prepared alone, for reference
    write_corpus(alone, text_prepare.text_documents(book, 2000), get_tokenizer('byte'), str(book.resolve()))
    for name in ('train.bin', 'val.bin'):
        assert files(target)[name] == files(alone)[name]
    assert leftovers(target) == []


def test_disk_full_in_a_resumable_build_keeps_finished_shards(tmp_path, monkeypatch):
    shards = tmp_path / 'shards'
    shards.mkdir()
    for s in range(3):
        (shards / f'{s}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for _, t in docs(20, seed=s)))
    cfg = fineweb.PrepareConfig(input=str(shards), out_dir=str(tmp_path / 'c'), tokenizer='byte', val_frac=0.2, num_proc=1)
    fineweb.prepare(cfg)
    before = files(tmp_path / 'c')
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 5:  # the second shard's val part (each shard: its two parts, then the state)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    with pytest.raises(DataError, match='No space left.*kept in .*run again to resume'):
        fineweb.prepare(cfg)
    monkeypatch.undo()
    assert files(tmp_path / 'c') == before  # the old corpus untouched
    assert list(json.loads((tmp_path / '.c.build' / 'state.json').read_text())['parts']) == ['0.jsonl']
    fineweb.prepare(cfg)
    assert files(tmp_path / 'c').keys() == before.keys() and leftovers(tmp_path / 'c') == []
    for name in ('train.bin', 'val.bin'):
        assert files(tmp_path / 'c')[name] == before[name]


def test_floors_cache_follows_the_corpus(old):
    target, _ = old
    first = ngram_floors(Corpus(target))
    path = target / 'ngram_floors.json'
    assert json.loads(path.read_text())['entries'][-1]['floors'] == first
    cache = json.loads(path.read_text())
    entry = cache['entries'][-1]
    for bad in ({**first, 'trigram': 'nan'}, {'unigram': 1.0}, None, {**first, 'bigram': -1.0}):
        path.write_text(json.dumps({'entries': [{**entry, 'floors': bad}]}))
        assert ngram_floors(Corpus(target)) == first  # an edited or damaged cache is recomputed, not served
    for damaged in ('[1, 2]', '{"entries": 3}', '{"entries": [7, {"key": 3}]}'):
        path.write_text(damaged)
        assert ngram_floors(Corpus(target)) == first
    path.write_text(json.dumps({'entries': [{**entry, 'key': {**entry['key'], 'smoothing': 'add-one'}}]}))
    assert ngram_floors(Corpus(target)) == first  # another estimator's cache is not served either
    assert json.loads(path.read_text())['entries'][-1]['key'] == entry['key']
    write_corpus(target, docs(60, seed=5), get_tokenizer('byte'), 'new', val_frac=0.2)
    assert ngram_floors(Corpus(target)) != first  # re-prepared: recomputed, not the stale cache
    assert leftovers(target) == []


@pytest.mark.parametrize('where', ['file', 'parent_file'])
def test_an_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path, where):
    (tmp_path / 'f').write_text('a file')
    target = tmp_path / 'f' if where == 'file' else tmp_path / 'f' / 'c'
    with pytest.raises(DataError, match='give another --out_dir|failed'):
        write_corpus(target, docs(), get_tokenizer('byte'), 'x', val_frac=0.2)
    assert (tmp_path / 'f').read_text() == 'a file'


# -----------------------------------------------------------------------------
# class 4: corpus files that parse but have the wrong shape

def edit_meta(folder, change):
    meta = json.loads((folder / 'meta.json').read_text())
    (folder / 'meta.json').write_text(json.dumps(change(meta)))


def without(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def setting(path, value):
    def change(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return meta
    return change


META_CASES = {
    'a list': lambda m: [m], 'a string': lambda m: 'meta', 'null': lambda m: None,
    'no tokenizer': without('tokenizer'), 'no vocab_size': without('vocab_size'), 'no dtype': without('dtype'),
    'no counts': without('counts'), 'dtype float32': setting(['dtype'], 'float32'), 'dtype int64': setting(['dtype'], 'int64'),
    'dtype uint8': setting(['dtype'], 'uint8'), 'dtype a list': setting(['dtype'], ['uint16']),
    'dtype null': setting(['dtype'], None), "vocab_size '256'": setting(['vocab_size'], '256'),
    'vocab_size 256.0': setting(['vocab_size'], 256.0), 'vocab_size true': setting(['vocab_size'], True),
    'vocab_size 0': setting(['vocab_size'], 0), 'vocab_size -5': setting(['vocab_size'], -5),
    'vocab_size below the largest token': setting(['vocab_size'], 100),
    'vocab_size too large for uint16': setting(['vocab_size'], 70_000), 'tokenizer 5': setting(['tokenizer'], 5),
    'counts a list': setting(['counts'], []), 'counts without val': setting(['counts'], {'train': {'tokens': 5}}),
    "tokens '10'": setting(['counts', 'val', 'tokens'], '10'), 'tokens -1': setting(['counts', 'val', 'tokens'], -1),
    'tokens 0': setting(['counts', 'val', 'tokens'], 0), 'tokens a float': setting(['counts', 'train', 'tokens'], 1e3),
}


@pytest.mark.parametrize('case', list(META_CASES))
def test_meta_json_of_the_wrong_shape_is_refused(old, case):
    target, _ = old
    edit_meta(target, META_CASES[case])
    with pytest.raises(DataError, match='prepare it again'):
        Corpus(target)


@pytest.mark.parametrize('content', [b'', b'{"tokenizer": "byte",', b'\xff\xfe\x00garbage', b'NaN', 'directory'])
def test_meta_json_that_does_not_parse_is_refused(old, content):
    target, _ = old
    (target / 'meta.json').unlink()
    if content == 'directory':
        (target / 'meta.json').mkdir()
    else:
        (target / 'meta.json').write_bytes(content)
    with pytest.raises(DataError, match='prepare it again'):
        Corpus(target)


def test_a_lying_dtype_with_matching_counts_is_caught_by_the_token_range(old):
    """uint16 tokens labelled uint32 with the counts halved: sizes agree, the tokens read are pairs glued
    into ids far above vocab_size. (The converse, uint32 read as uint16, reads each id followed by a 0,
    all in range: no check on the files alone can see it.)"""
    target, _ = old
    for split in ('train', 'val'):
        path = target / f'{split}.bin'
        if path.stat().st_size % 4:
            path.write_bytes(path.read_bytes() + b'\x00\x00')
    edit_meta(target, lambda m: {**m, 'dtype': 'uint32', 'counts': {
        s: {'tokens': (target / f'{s}.bin').stat().st_size // 4} for s in ('train', 'val')}})
    with pytest.raises(DataError, match='holds token id .* but vocab_size is 256.*prepare it again'):
        Corpus(target)


def test_the_range_check_is_not_skipped_by_a_stale_or_copied_cache(old, tmp_path):
    target, _ = old
    Corpus(target)
    assert (target / 'checked.json').exists()
    edit_meta(target, setting(['vocab_size'], 100))  # meta.json edited after the check
    with pytest.raises(DataError, match='holds token id'):
        Corpus(target)


@pytest.mark.parametrize('damage', ['one byte short', 'half', 'empty', 'missing', 'a directory', 'longer'])
def test_a_damaged_stream_is_refused(old, damage):
    target, _ = old
    path = target / 'val.bin'
    data = path.read_bytes()
    path.unlink()
    if damage == 'a directory':
        path.mkdir()
    elif damage != 'missing':
        path.write_bytes({'one byte short': data[:-1], 'half': data[:len(data) // 2], 'empty': b'',
                          'longer': data + b'\x00\x00'}[damage])
    with pytest.raises(DataError, match='val.bin .*prepare it again'):
        Corpus(target)


@pytest.mark.parametrize('case', ['a list', 'vocab_size below the largest token'])
def test_train_py_on_a_broken_corpus_is_one_line(old, capsys, case, tmp_path):
    import train
    target, _ = old
    edit_meta(target, META_CASES[case])
    err = one_line_exit(capsys, train.main, train.TrainConfig,
                        [f'--dataset={target}', f'--out_dir={tmp_path / "run"}', '--model=tiny', '--budget_unit=iters',
                         '--budget=1', '--device=cpu'])
    assert 'prepare it again' in err and not (tmp_path / 'run' / 'ckpt.pt').exists()


# -----------------------------------------------------------------------------
# class 10: paths

@pytest.mark.parametrize('arg', ['--name=../../x', '--name=..', '--name=/tmp/abs', '--name=a/b', '--name=.hidden',
                                 '--tokenizer=../../x', '--tokenizer=a/b'])
def test_corpus_names_cannot_leave_the_data_folder(capsys, tmp_path, arg):
    (tmp_path / 'a.txt').write_text(''.join(t for _, t in docs()))
    before = sorted(os.listdir(ROOT)), sorted(os.listdir(ROOT.parent)), sorted(os.listdir(DATA_ROOT / 'text'))
    err = one_line_exit(capsys, text_prepare.prepare, text_prepare.PrepareConfig, [f'--input={tmp_path / "a.txt"}', arg])
    assert re.search('--name|--tokenizer', err)
    assert (sorted(os.listdir(ROOT)), sorted(os.listdir(ROOT.parent)), sorted(os.listdir(DATA_ROOT / 'text'))) == before


def test_an_input_whose_stem_is_no_name_asks_for_one(capsys, tmp_path):
    (tmp_path / '.notes.txt').write_text(''.join(t for _, t in docs()))
    err = one_line_exit(capsys, text_prepare.prepare, text_prepare.PrepareConfig, [f'--input={tmp_path / ".notes.txt"}'])
    assert 'give --name' in err


def missing_dataset_hint(dataset):
    import train
    with pytest.raises(DataError) as e:
        train.load_corpus(train.TrainConfig(dataset=dataset))
    return re.search(r'`(python [^`]+)`', str(e.value)).group(1)


@pytest.mark.parametrize('kind', ['text/NAME', 'NAME', 'absolute path'])
def test_the_hint_for_a_missing_dataset_is_a_command_that_works(tmp_path, kind):
    """The hinted command line, run through the script's own argument parsing (in this process: faster)."""
    name = f'pytest_hint_{os.getpid()}'
    dataset = {'text/NAME': f'text/{name}', 'NAME': name, 'absolute path': str(tmp_path / name)}[kind]
    made = {'text/NAME': DATA_ROOT / 'text' / name, 'NAME': DATA_ROOT / name, 'absolute path': tmp_path / name}[kind]
    notes = tmp_path / 'notes'
    notes.mkdir()
    for i, (_, text) in enumerate(docs(60)):
        (notes / f'{i}.txt').write_text(text)
    try:
        command = missing_dataset_hint(dataset)
        assert command.startswith('python data/text/prepare.py --input=YOUR_TEXT')
        configurator.cli(text_prepare.prepare, text_prepare.PrepareConfig, command.replace('YOUR_TEXT', str(notes)).split()[2:])
        assert Corpus(data_dir(dataset, 'byte')).meta['counts']['val']['tokens'] > 0
    finally:
        shutil.rmtree(made, ignore_errors=True)


def test_hints_for_the_shipped_corpora():
    from data.loader import prepare_command
    assert prepare_command('fineweb_edu', 'gpt2') == 'python data/fineweb_edu/prepare.py --tokenizer=gpt2'
    assert prepare_command('openwebtext', 'byte') == 'python data/openwebtext/prepare.py --tokenizer=byte'
    assert prepare_command('mathmix/train', 'byte') == 'python data/mathmix/prepare.py'
    assert '--out_dir=data/text/byte' in prepare_command('text', 'byte')
    assert '--out_dir=' in prepare_command('../../etc', 'byte')  # shown, never run by us
