"""The shard pipeline's inputs and resume, against corpora built by hand (byte tokens: a split's stream is
its documents' UTF-8, in order): a shard replaced or added after a stopped prepare, --input as a folder,
a file or a glob read from the invoking folder, damaged or odd text, and a hash split that leaves val empty."""
import gzip
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

import configurator
from conftest import ROOT, run_script
from data.fineweb_edu import prepare as fineweb
from data.loader import ByteTokenizer, Corpus, DataError, is_val, write_corpus
from data.text import prepare as text_prepare

WORDS = ['alpha', 'beta', 'gamma', 'tensor', 'loss', 'token', 'batch', 'é', '∑']
SPLITS = ('train', 'val')
VAL_FRAC = 0.3


def texts(seed, n):
    rng = np.random.default_rng(seed)
    return [' '.join(rng.choice(WORDS, 5 + int(rng.integers(20)))) + '\n' for _ in range(n)]


def write_jsonl(path, rows):
    """rows: texts, or dicts written as they are (to give ids or odd values)."""
    data = ''.join(json.dumps(r if isinstance(r, dict) else {'text': r}) + '\n' for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith('.gz') else data)


def named(shard, rows):
    """(document name, text) as the pipeline names rows without an id: shard:row."""
    return [(f'{shard}:{i}', t) for i, t in enumerate(rows)]


def expected(docs, val_frac=VAL_FRAC):
    """The streams of a byte corpus of these documents, built by hand."""
    return {s: ''.join(t for n, t in docs if is_val(n, val_frac) == (s == 'val')).encode() for s in SPLITS}


def streams(folder):
    corpus = Corpus(folder)
    return {s: np.asarray(corpus.splits[s]).astype(np.uint8).tobytes() for s in SPLITS}


def cfg(input, out, **kw):
    return fineweb.PrepareConfig(**{'input': str(input), 'out_dir': str(out), 'tokenizer': 'byte',
                                    'val_frac': VAL_FRAC, 'num_proc': 1, **kw})


@pytest.fixture
def parts_written(monkeypatch):
    """(calls, stop): the shards write_part is asked to tokenize, in order; a name put in `stop` raises
    KeyboardInterrupt (Ctrl-C) when its turn comes, after the shards before it are finished."""
    real, calls, stop = fineweb.write_part, [], set()

    def write_part(shard, *args):
        calls.append(shard.name)
        if shard.name in stop:
            raise KeyboardInterrupt
        return real(shard, *args)
    monkeypatch.setattr(fineweb, 'write_part', write_part)
    return calls, stop


def stopped_at(src, out, parts_written, name, **kw):
    """A prepare of src stopped by Ctrl-C when shard `name` is reached; the recorder cleared for the resume."""
    calls, stop = parts_written
    stop.add(name)
    with pytest.raises(KeyboardInterrupt):
        fineweb.prepare(cfg(src, out, **kw))
    stop.clear()
    calls.clear()


def state(out):
    return json.loads((out.parent / f'.{out.name}.build' / 'state.json').read_text())


# -----------------------------------------------------------------------------
# resume: each finished part is kept only while its shard is the same

def test_a_replaced_shard_is_tokenized_again_and_the_others_kept(tmp_path, parts_written, capsys):
    src, out = tmp_path / 'in', tmp_path / 'c'
    for i in range(3):
        write_jsonl(src / f'{i}.jsonl', texts(i, 8))
    stopped_at(src, out, parts_written, '2.jsonl')
    assert list(state(out)['parts']) == ['0.jsonl', '1.jsonl']
    write_jsonl(src / '0.jsonl', texts(10, 9))  # a fresh download of shard 0, different from the one read
    fineweb.prepare(cfg(src, out))
    assert parts_written[0] == ['0.jsonl', '2.jsonl']
    assert '0.jsonl changed since the prepare stopped' in capsys.readouterr().err
    docs = named('0.jsonl', texts(10, 9)) + named('1.jsonl', texts(1, 8)) + named('2.jsonl', texts(2, 8))
    assert streams(out) == expected(docs)


def test_a_replacement_of_the_same_size_and_mtime_is_caught_by_its_content(tmp_path, parts_written):
    src, out = tmp_path / 'in', tmp_path / 'c'
    write_jsonl(src / 'a.jsonl', texts(0, 8))
    write_jsonl(src / 'b.jsonl', texts(1, 8))
    stopped_at(src, out, parts_written, 'b.jsonl')
    path, st = src / 'a.jsonl', os.stat(src / 'a.jsonl')
    edited = [t.replace('beta', 'bEta') for t in texts(0, 8)]
    assert edited != texts(0, 8)
    write_jsonl(path, edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    fineweb.prepare(cfg(src, out))
    assert parts_written[0] == ['a.jsonl', 'b.jsonl']
    assert streams(out) == expected(named('a.jsonl', edited) + named('b.jsonl', texts(1, 8)))


def test_shards_added_before_and_after_the_finished_ones_equal_a_fresh_prepare(tmp_path, parts_written):
    """Shards are taken in name order, and the parts are joined in that order: a shard that sorts before
    the finished ones is tokenized alone, and the corpus is the one a fresh prepare writes."""
    src, out, fresh = tmp_path / 'in', tmp_path / 'c', tmp_path / 'fresh'
    for name, seed in (('b', 1), ('c', 2), ('d', 3)):
        write_jsonl(src / f'{name}.jsonl', texts(seed, 8))
    stopped_at(src, out, parts_written, 'd.jsonl')
    write_jsonl(src / 'a.jsonl', texts(0, 8))
    write_jsonl(src / 'e.jsonl', texts(4, 8))
    fineweb.prepare(cfg(src, out))
    assert parts_written[0] == ['a.jsonl', 'd.jsonl', 'e.jsonl']  # b and c were kept
    docs = [d for name, seed in zip('abcde', range(5)) for d in named(f'{name}.jsonl', texts(seed, 8))]
    assert streams(out) == expected(docs)
    fineweb.prepare(cfg(src, fresh))
    for name in ('train.bin', 'val.bin'):
        assert (out / name).read_bytes() == (fresh / name).read_bytes()
    assert Corpus(out).meta['counts'] == Corpus(fresh).meta['counts'] and Corpus(out).meta['shards'] == 5


def test_under_max_tokens_a_kept_part_must_start_where_it_did(tmp_path, parts_written):
    """The cap falls where the tokens before it say: a shard added in front moves it into b, whose part
    was finished whole, so b is redone (and c is not reached); the corpus is still a fresh prepare's."""
    src, out, fresh = tmp_path / 'in', tmp_path / 'c', tmp_path / 'fresh'
    write_jsonl(src / 'b.jsonl', texts(1, 8))
    write_jsonl(src / 'c.jsonl', texts(2, 8))
    everything = [d for name, seed in zip('abc', range(3)) for d in named(f'{name}.jsonl', texts(seed, 8))]
    size = {name: sum(len(t.encode()) for t in texts(seed, 8)) for name, seed in zip('abc', range(3))}
    cap = size['a'] + size['b'] // 2  # past all of b alone; half way into b once a is in front
    stopped_at(src, out, parts_written, 'c.jsonl', max_tokens=cap)
    assert not state(out)['parts']['b.jsonl']['stopped']
    write_jsonl(src / 'a.jsonl', texts(0, 8))
    fineweb.prepare(cfg(src, out, max_tokens=cap))
    assert parts_written[0] == ['a.jsonl', 'b.jsonl']
    lengths = np.cumsum([len(t.encode()) for _, t in everything])
    kept = int(np.searchsorted(lengths, cap)) + 1  # up to the first document end at or past the cap
    assert 8 < kept < 16 and streams(out) == expected(everything[:kept])
    fineweb.prepare(cfg(src, fresh, max_tokens=cap))
    assert streams(fresh) == streams(out)


def test_a_shard_that_changes_while_it_is_read_is_one_line_and_not_kept(tmp_path, monkeypatch):
    src, out = tmp_path / 'in', tmp_path / 'c'
    write_jsonl(src / 'a.jsonl', texts(0, 8))
    write_jsonl(src / 'b.jsonl', texts(1, 8))
    real = fineweb.write_part

    def appended_to_while_read(shard, *args):
        def read():
            yield from shard.read()
            if shard.name == 'b.jsonl':  # a download still writing into the folder
                with open(shard.path, 'a') as f:
                    f.write(json.dumps({'text': 'late\n'}) + '\n')
        return real(shard._replace(read=read), *args)
    monkeypatch.setattr(fineweb, 'write_part', appended_to_while_read)
    with pytest.raises(DataError, match=r'b\.jsonl changed while it was being read: run the same command again'):
        fineweb.prepare(cfg(src, out))
    assert list(state(out)['parts']) == ['a.jsonl'] and not out.exists()
    monkeypatch.undo()
    fineweb.prepare(cfg(src, out))
    assert streams(out) == expected(named('a.jsonl', texts(0, 8)) + named('b.jsonl', texts(1, 8) + ['late\n']))


def test_a_damaged_part_or_record_is_tokenized_again(tmp_path, parts_written):
    src, out = tmp_path / 'in', tmp_path / 'c'
    for i in range(3):
        write_jsonl(src / f'{i}.jsonl', texts(i, 8))
    stopped_at(src, out, parts_written, '2.jsonl')
    build = out.parent / f'.{out.name}.build'
    train_part = fineweb.part_paths(SimpleNamespace(folder=build), '0.jsonl')['train']
    train_part.write_bytes(train_part.read_bytes()[:-3])  # shorter than its record counts
    saved = state(out)
    saved['parts']['1.jsonl'] = 'not a record'
    (build / 'state.json').write_text(json.dumps(saved))
    fineweb.prepare(cfg(src, out))
    assert parts_written[0] == ['0.jsonl', '1.jsonl', '2.jsonl']
    assert streams(out) == expected([d for i in range(3) for d in named(f'{i}.jsonl', texts(i, 8))])


# -----------------------------------------------------------------------------
# --input: a folder, a file or a glob, read from the invoking folder

@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder to run in, holding shards/{a,b}.jsonl.gz, shards/sub/c.jsonl.gz and a notes.txt."""
    work = tmp_path / 'work'
    for name, seed in (('a.jsonl.gz', 0), ('b.jsonl.gz', 1), ('sub/c.jsonl.gz', 2)):
        write_jsonl(work / 'shards' / name, texts(seed, 8))
    (work / 'shards' / 'notes.txt').write_text('not a shard')
    monkeypatch.chdir(work)
    return work


def test_input_takes_a_folder_a_file_and_a_glob(work):
    a, b, c = named('a.jsonl.gz', texts(0, 8)), named('b.jsonl.gz', texts(1, 8)), named('sub/c.jsonl.gz', texts(2, 8))
    for input, docs in (('shards/*.jsonl.gz', a + b),  # '*' stays in its folder
                        ('shards/**/*.jsonl.gz', a + b + c), ('shards', a + b + c),
                        ('shards/sub/c.jsonl.gz', named('c.jsonl.gz', texts(2, 8)))):
        assert 0 < sum(is_val(n, VAL_FRAC) for n, _ in docs) < len(docs)  # both splits from the hash alone
        out = work / 'out' / input.replace('/', '_').replace('*', 'S')
        fineweb.prepare(cfg(input, out.relative_to(work)))
        assert streams(out) == expected(docs), input
    assert Corpus(work / 'out' / 'shards_SS_S.jsonl.gz').meta['source'] == str(work / 'shards/**/*.jsonl.gz')


def test_a_glob_from_the_command_line_is_read_from_the_folder_it_runs_in(work):
    out = run_script(ROOT / 'data/fineweb_edu/prepare.py', '--input=shards/*.jsonl.gz', '--out_dir=glob',
                     '--tokenizer=byte', f'--val_frac={VAL_FRAC}', '--num_proc=1', cwd=work)
    assert out.returncode == 0, out.stderr
    assert streams(work / 'glob') == expected(named('a.jsonl.gz', texts(0, 8)) + named('b.jsonl.gz', texts(1, 8)))


def one_line_exit(capsys, entry, cls, argv):
    with pytest.raises(SystemExit) as e:
        configurator.cli(entry, cls, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    return err


@pytest.mark.parametrize('input, message', [
    ('nope/shards', r'--input=nope/shards does not exist \(a relative path is read from .*work\)'),
    ('shards/*.parquet', r"--input='shards/\*.parquet' \(read from .*work\) holds no .parquet, .jsonl or .jsonl.gz"),
    ('shards/notes.txt', r'--input=shards/notes.txt is not one of .parquet, .jsonl or .jsonl.gz shards'),
])
def test_an_input_that_names_no_shard_is_one_line(work, capsys, input, message):
    import re
    err = one_line_exit(capsys, fineweb.prepare, fineweb.PrepareConfig, [f'--input={input}', '--out_dir=c', '--tokenizer=byte'])
    assert re.search(message, err), err
    assert not (work / 'c').exists() and not list(work.glob('.c.*'))


def test_text_prepare_takes_a_glob_too(work):
    notes = {'n1.md': 'first note ' * 30, 'n2.md': 'second ' * 40, 'deep/n3.md': 'third ' * 50, 'n4.txt': 'plain'}
    for rel, text in notes.items():
        (work / 'notes' / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / 'notes' / rel).write_text(text)
    docs = [(rel, notes[rel]) for rel in sorted(notes) if rel.endswith('.md')]
    val_frac = next(v for v in np.linspace(0.05, 0.95, 91) if 0 < sum(is_val(n, v) for n, _ in docs) < len(docs))
    text_prepare.prepare(text_prepare.PrepareConfig(input='notes/**/*.md', out_dir='notes_corpus', val_frac=val_frac))
    assert streams(work / 'notes_corpus') == expected(docs, val_frac)


# -----------------------------------------------------------------------------
# damaged and odd text

@pytest.fixture
def old(tmp_path):
    """A good corpus at tmp_path/c and its files' bytes: no failure below may change it."""
    src = tmp_path / 'good'
    write_jsonl(src / 'a.jsonl', texts(0, 20))
    fineweb.prepare(cfg(src, tmp_path / 'c'))
    return tmp_path / 'c', {n: (tmp_path / 'c' / n).read_bytes() for n in ('train.bin', 'val.bin', 'meta.json')}


def refused(capsys, tmp_path, old, message):
    """The prepare of tmp_path/in over the old corpus: one line holding message, the old corpus unchanged."""
    capsys.readouterr()  # the old corpus's own prepare said its part
    err = one_line_exit(capsys, fineweb.prepare, fineweb.PrepareConfig,
                        [f'--input={tmp_path / "in"}', f'--out_dir={old[0]}', '--tokenizer=byte', '--num_proc=1'])
    assert message in err, err
    assert {n: (old[0] / n).read_bytes() for n in old[1]} == old[1]
    return err


def test_a_truncated_gzip_shard_is_one_line_before_anything_is_tokenized(tmp_path, capsys, old, monkeypatch):
    write_jsonl(tmp_path / 'in' / 'a.jsonl.gz', texts(1, 50))
    whole = (tmp_path / 'in' / 'b.jsonl.gz')
    whole.write_bytes(gzip.compress(''.join(json.dumps({'text': t}) + '\n' for t in texts(2, 200)).encode()))
    whole.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    monkeypatch.setattr(fineweb, 'write_part', lambda *a: pytest.fail('tokenized before the shards were checked'))
    refused(capsys, tmp_path, old, f'cannot read {whole} (a truncated .gz')
    assert not list(tmp_path.glob('.c.*'))  # no build was started


def test_damaged_gzip_data_is_one_line(tmp_path, capsys, old):
    path = tmp_path / 'in' / 'b.jsonl.gz'
    write_jsonl(path, texts(2, 200))
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = b'\xff' * 8
    path.write_bytes(bytes(data))
    refused(capsys, tmp_path, old, f'cannot read {path} (')


def test_a_byte_that_is_not_utf8_is_one_line_naming_shard_and_line(tmp_path, capsys, old):
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'b.jsonl').write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    refused(capsys, tmp_path, old, f"{tmp_path / 'in' / 'b.jsonl'}:2 is not UTF-8 (byte 0xe9 at column 14)")


def test_lone_surrogates_become_the_replacement_character(tmp_path):
    """JSON can spell a lone surrogate, which has no UTF-8: the text gets U+FFFD there, and an id holding
    one still names (and splits) its document."""
    (tmp_path / 'in').mkdir()
    lines = [r'{"text": "left \ud800 right\n", "id": "doc-\udc00"}', r'{"text": "pair \ud83d\ude00 ok\n"}',
             r'{"text": "tail \udfff"}'] + [json.dumps({'text': t}) for t in texts(3, 10)]
    (tmp_path / 'in' / 'a.jsonl').write_text('\n'.join(lines) + '\n')
    fineweb.prepare(cfg(tmp_path / 'in', tmp_path / 'c'))
    docs = [('doc-\udc00', 'left \ufffd right\n'), ('a.jsonl:1', 'pair \U0001F600 ok\n'), ('a.jsonl:2', 'tail \ufffd')]
    docs += named('a.jsonl', [''] * 3 + texts(3, 10))[3:]
    assert streams(tmp_path / 'c') == expected(docs)


# -----------------------------------------------------------------------------
# every corpus gets a val split

def test_a_split_the_hash_leaves_empty_gets_the_last_document(tmp_path):
    rows = texts(5, 4)
    write_jsonl(tmp_path / 'in' / 'x.jsonl', rows)
    names = [n for n, _ in named('x.jsonl', rows)]
    for val_frac, split, donor in ((1e-4, 'val', 'train'), (0.9999, 'train', 'val')):
        assert all(is_val(n, val_frac) == (donor == 'val') for n in names)  # the hash puts all in one split
        out = tmp_path / split
        fineweb.prepare(cfg(tmp_path / 'in', out, val_frac=val_frac))
        assert streams(out) == {donor: ''.join(rows[:3]).encode(), split: rows[3].encode()}
        meta = Corpus(out).meta
        assert meta[f'moved_to_{split}'] == ['x.jsonl:3'] and meta['counts'][split] == {'documents': 1, 'tokens': len(rows[3].encode())}


def test_a_max_tokens_cap_before_the_first_val_document_still_gives_one(tmp_path):
    rows = texts(7, 40)
    write_jsonl(tmp_path / 'in' / 'z.jsonl', rows)
    first_val = next(i for i, (n, _) in enumerate(named('z.jsonl', rows)) if is_val(n, VAL_FRAC))
    assert first_val >= 2  # z.jsonl:11 is the first the hash puts in val
    cap = sum(len(t.encode()) for t in rows[:first_val - 1]) + 1  # crossed by document first_val - 1
    fineweb.prepare(cfg(tmp_path / 'in', tmp_path / 'c', max_tokens=cap))
    assert streams(tmp_path / 'c') == {'train': ''.join(rows[:first_val - 1]).encode(), 'val': rows[first_val - 1].encode()}


def test_one_document_is_one_line_and_keeps_the_old_corpus(tmp_path, capsys, old, parts_written):
    write_jsonl(tmp_path / 'in' / 'one.jsonl', ['a single document\n'])
    refused(capsys, tmp_path, old, 'too few for both a train and a val split: give more input')
    write_jsonl(tmp_path / 'in' / 'two.jsonl', ['a second document\n'])  # the fix: more input; the finished part is kept
    parts_written[0].clear()
    fineweb.prepare(fineweb.PrepareConfig(input=str(tmp_path / 'in'), out_dir=str(old[0]), tokenizer='byte', num_proc=1))
    assert parts_written[0] == ['two.jsonl'] and Corpus(old[0]).meta['counts']['val']['documents'] == 1


def test_write_corpus_refuses_an_empty_split_before_tokenizing(tmp_path):
    class Untouchable(ByteTokenizer):
        def encode(self, text):
            raise AssertionError('tokenized before the split was checked')
    docs = [('a', 'x' * 50), ('b', 'y' * 50)]
    assert not any(is_val(n, 1e-4) for n, _ in docs)
    with pytest.raises(DataError, match=r'no documents landed in the val split .*\(2 in all'):
        write_corpus(tmp_path / 'c', docs, Untouchable(), 'test', val_frac=1e-4)
    assert not (tmp_path / 'c').exists() and not list(tmp_path.glob('.c.*'))


def test_a_small_text_file_asks_for_a_smaller_doc_chars(tmp_path, capsys):
    (tmp_path / 'small.txt').write_text('tiny ' * 100)
    err = one_line_exit(capsys, text_prepare.prepare, text_prepare.PrepareConfig,
                        [f'--input={tmp_path / "small.txt"}', f'--out_dir={tmp_path / "c"}'])
    assert 'no documents landed in the val split' in err and 'a smaller --doc_chars' in err
