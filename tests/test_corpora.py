"""The pre-training corpus pipeline (data/fineweb_edu, data/openwebtext) offline: shards the tests write
(parquet and jsonl), the byte tokenizer and a gpt2-style BPE built here through tiktoken's own Encoding,
worker processes, the val split, --max_tokens, resuming after an interruption, the offline messages."""
import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

from conftest import run_script
from data.loader import Corpus, DataError, is_val

tiktoken = pytest.importorskip('tiktoken')
regex = pytest.importorskip('regex')  # tiktoken's own dependency
from data.fineweb_edu import prepare as fineweb  # noqa: E402
from data.openwebtext import prepare as owt  # noqa: E402

# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, each with one leading space; whitespace
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORDS = ['the', 'model', 'token', 'loss', 'batch', 'layer', 'grad', 'über', 'naïve', 'データ', '42', "don't", '+=']


def train_bpe(text, n_merges):
    """Byte-level BPE (Sennrich et al. 2016, as GPT-2 uses it): every byte is a token; repeatedly the most
    frequent adjacent pair inside a pre-tokenized word becomes a new token. Returns tiktoken's ranks."""
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(PAT, text))
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        candidates = [(c, p) for p, c in pairs.items() if p[0] + p[1] not in ranks]
        if not candidates:
            break
        _, (a, b) = max(candidates)
        ranks[a + b] = len(ranks)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return ranks


def test_bpe(text=None, n_merges=120):
    """A gpt2-style Encoding built offline (what tiktoken.get_encoding('gpt2') would download)."""
    ranks = train_bpe(text or random_text(0, 3000), n_merges)
    return tiktoken.Encoding('test_bpe', pat_str=PAT, mergeable_ranks=ranks, special_tokens={'<|endoftext|>': len(ranks)})


test_bpe.__test__ = False  # a helper, not a test


def random_text(seed, n_words):
    rng = np.random.default_rng(seed)
    return ' '.join(rng.choice(WORDS, n_words)) + rng.choice(['.', '!\n', ' 7\n\n'])


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """A folder with a parquet shard (with an `id` column, like FineWeb's) and a jsonl shard (without);
    returns (folder, [(doc name for the split, text)] in stream order)."""
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    folder = tmp_path_factory.mktemp('shards')
    docs_a = [(f'<urn:uuid:{i:04d}>', random_text(i, 20 + 7 * i)) for i in range(60)]
    docs_b = [random_text(100 + i, 15 + 5 * i) for i in range(50)]
    pq.write_table(pa.table({'id': [d for d, _ in docs_a], 'text': [t for _, t in docs_a]}), folder / 'a.parquet',
                   row_group_size=16)
    (folder / 'sub').mkdir()
    (folder / 'sub' / 'b.jsonl').write_text(''.join(json.dumps({'text': t, 'url': 'x'}) + '\n' for t in docs_b))
    (folder / 'notes.txt').write_text('not a shard: ignored')
    return folder, docs_a + [(f'sub/b.jsonl:{i}', t) for i, t in enumerate(docs_b)]


def split_docs(docs, val_frac):
    return {s: [t for name, t in docs if is_val(name, val_frac) == (s == 'val')] for s in ('train', 'val')}


def cfg(folder, out, **kw):
    return fineweb.PrepareConfig(input=str(folder), out_dir=str(out), **{'tokenizer': 'byte', 'val_frac': 0.2,
                                                                         'num_proc': 1, **kw})


def test_byte_prepare_from_the_command_line(shards, tmp_path):
    folder, docs = shards
    out = run_script('data/fineweb_edu/prepare.py', f'--input={folder}', '--tokenizer=byte', '--val_frac=0.2',
                     f'--out_dir={tmp_path / "c"}', '--num_proc=2')
    assert out.returncode == 0, out.stderr
    assert 'tokens/s' in out.stderr and 'ETA' in out.stderr
    corpus = Corpus(tmp_path / 'c')
    want = split_docs(docs, 0.2)
    assert want['val'] and want['train']
    for split in ('train', 'val'):  # byte: no end-of-text token, documents follow each other
        assert isinstance(corpus.splits[split], np.memmap)
        assert np.asarray(corpus.splits[split]).astype(np.uint8).tobytes() == ''.join(want[split]).encode(), split
        assert corpus.meta['counts'][split]['documents'] == len(want[split])
    assert corpus.meta['shards'] == 2 and not list(tmp_path.glob('.c.*'))  # no build folder or lock left


def test_bpe_in_worker_processes_separates_documents_with_eot(shards, tmp_path):
    folder, docs = shards
    enc = test_bpe()
    fineweb.prepare(cfg(folder, tmp_path / 'par', num_proc=2), encoding=enc)
    fineweb.prepare(cfg(folder, tmp_path / 'one', num_proc=1), encoding=enc)
    par, one = Corpus(tmp_path / 'par'), Corpus(tmp_path / 'one')
    assert par.meta['tokenizer'] == 'test_bpe' and par.vocab_size == enc.n_vocab and par.meta['dtype'] == 'uint16'
    want = split_docs(docs, 0.2)
    for split in ('train', 'val'):
        tokens = np.asarray(par.splits[split]).tolist()
        assert tokens == np.asarray(one.splits[split]).tolist(), 'the worker count changed the stream'
        assert tokens == [t for text in want[split] for t in enc.encode_ordinary(text) + [enc.eot_token]]
        assert len(tokens) < 0.6 * len(''.join(want[split]).encode())  # merges were used
        pieces = enc.decode(tokens).split('<|endoftext|>')
        assert pieces == want[split] + ['']


def test_max_tokens_stops_at_the_first_document_end_after_it(shards, tmp_path):
    folder, docs = shards
    fineweb.prepare(cfg(folder, tmp_path / 'c', max_tokens=5000))
    corpus = Corpus(tmp_path / 'c')
    lengths = [len(t.encode()) for _, t in docs]
    n_docs = next(i + 1 for i in range(len(docs)) if sum(lengths[:i + 1]) >= 5000)
    want = split_docs(docs[:n_docs], 0.2)
    for split in ('train', 'val'):
        assert np.asarray(corpus.splits[split]).astype(np.uint8).tobytes() == ''.join(want[split]).encode()
    assert corpus.meta['counts']['train']['tokens'] + corpus.meta['counts']['val']['tokens'] == sum(lengths[:n_docs])


def test_an_interrupted_prepare_resumes_at_the_first_unfinished_shard(shards, tmp_path, monkeypatch):
    folder, docs = shards
    fineweb.prepare(cfg(folder, tmp_path / 'clean'))
    real, calls = fineweb.write_part, []

    def interrupted(shard, *args):
        calls.append(shard.name)
        if shard.name.endswith('b.jsonl') and len(calls) == 2:  # the second shard, halfway: Ctrl-C
            real(shard._replace(read=lambda: iter(list(shard.read())[:10])), *args)
            raise KeyboardInterrupt
        return real(shard, *args)
    monkeypatch.setattr(fineweb, 'write_part', interrupted)
    with pytest.raises(KeyboardInterrupt):
        fineweb.prepare(cfg(folder, tmp_path / 'c'))
    build = tmp_path / '.c.build'
    assert not (tmp_path / 'c').exists() and list(json.loads((build / 'state.json').read_text())['parts']) == ['a.parquet']
    fineweb.prepare(cfg(folder, tmp_path / 'c'))
    assert calls == ['a.parquet', 'sub/b.jsonl', 'sub/b.jsonl']  # the finished shard was not redone
    for name in ('train.bin', 'val.bin'):
        assert (tmp_path / 'c' / name).read_bytes() == (tmp_path / 'clean' / name).read_bytes()
    assert Corpus(tmp_path / 'c').meta['counts'] == Corpus(tmp_path / 'clean').meta['counts']
    assert not build.exists()


def test_other_settings_start_the_build_over(shards, tmp_path, monkeypatch, capsys):
    folder, _ = shards
    real = fineweb.write_part

    def first_shard_only(shard, *args):
        if shard.name != 'a.parquet':
            raise KeyboardInterrupt
        return real(shard, *args)
    monkeypatch.setattr(fineweb, 'write_part', first_shard_only)
    with pytest.raises(KeyboardInterrupt):
        fineweb.prepare(cfg(folder, tmp_path / 'c'))
    assert list(json.loads((tmp_path / '.c.build' / 'state.json').read_text())['parts']) == ['a.parquet']
    monkeypatch.undo()
    fineweb.prepare(cfg(folder, tmp_path / 'c', val_frac=0.3))
    assert 'starting over' in capsys.readouterr().err
    assert Corpus(tmp_path / 'c').meta['val_frac'] == 0.3


def test_openwebtext_shares_the_pipeline(shards, tmp_path):
    folder, docs = shards
    assert owt.PrepareConfig().hub_path == 'Skylion007/openwebtext' and owt.PrepareConfig.corpus == 'openwebtext'
    owt.prepare(owt.PrepareConfig(input=str(folder), out_dir=str(tmp_path / 'o'), tokenizer='byte', val_frac=0.2, num_proc=1))
    assert Corpus(tmp_path / 'o').meta['counts']['val']['documents'] == len(split_docs(docs, 0.2)['val'])


@pytest.mark.parametrize('content, message', [
    ('{"text": "ok"}\n[1, 2]\n', r"b\.jsonl:2 is not a JSON object with a 'text'"),
    ('{"title": "no text"}\n', r"b\.jsonl:1 is not a JSON object with a 'text'"),
    ('{"text": "ok"}\n{"text": null}\n', r"b\.jsonl row 1: 'text' is NoneType, not a string"),
])
def test_bad_shards_are_one_line_errors(tmp_path, content, message):
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'b.jsonl').write_text(content)
    with pytest.raises(DataError, match=message):
        fineweb.prepare(cfg(tmp_path / 'in', tmp_path / 'c'))
    (tmp_path / 'in' / 'b.jsonl').unlink()
    (tmp_path / 'in' / 'c.parquet').write_bytes(b'PAR1 not really')
    have_pyarrow = importlib.util.find_spec('pyarrow') is not None  # an optional extra (`datasets` brings it)
    with pytest.raises(DataError, match='not a readable parquet' if have_pyarrow else 'needs pyarrow: pip install datasets'):
        fineweb.prepare(cfg(tmp_path / 'in', tmp_path / 'c'))
    assert not (tmp_path / 'c').exists() and not list(tmp_path.glob('.c.*'))  # nothing left by the failures
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='holds no .parquet'):
        fineweb.prepare(cfg(tmp_path / 'empty', tmp_path / 'c'))
    with pytest.raises(DataError, match='does not exist'):
        fineweb.prepare(cfg(tmp_path / 'missing', tmp_path / 'c'))


def test_without_the_datasets_package_one_line_says_pip_install(monkeypatch):
    monkeypatch.setitem(__import__('sys').modules, 'datasets', None)
    with pytest.raises(DataError, match='pip install datasets'):
        fineweb.hub_shards(fineweb.PrepareConfig())


def test_offline_hub_is_one_line_naming_input(tmp_path):
    pytest.importorskip('datasets')
    out = run_script('data/fineweb_edu/prepare.py', '--tokenizer=byte', f'--out_dir={tmp_path / "c"}',
                     env={'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')})
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and '--input=FOLDER' in out.stderr, out.stderr
    assert not (tmp_path / 'c').exists()
