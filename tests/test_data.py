"""data: the stdlib corpus (deterministic, split by document), tokenizers, text prepare, Batches, n-gram floors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from data.loader import (DATA_ROOT, Batches, Corpus, DataError, get_examples, get_tokenizer, is_val,
                         num_examples, val_ids, write_corpus)

# An offline tiktoken: an empty cache and a proxy that refuses at once, so nothing waits on the network.
OFFLINE = {'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9', 'NO_PROXY': ''}


@pytest.fixture(scope='module')
def prepared_twice(tmp_path_factory):
    """data/stdlib/prepare.py run twice through its command line, into two fresh folders."""
    dirs = [tmp_path_factory.mktemp(f'stdlib{i}') / 'byte' for i in range(2)]
    runs = [subprocess.Popen([sys.executable, 'data/stdlib/prepare.py', f'--out_dir={d}'], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in dirs]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    return dirs


def test_stdlib_prepare_is_deterministic(prepared_twice):
    a, b = prepared_twice
    for name in ('train.bin', 'val.bin', 'meta.json'):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta = json.loads((a / 'meta.json').read_text())
    assert meta['tokenizer'] == 'byte' and meta['vocab_size'] == 256
    assert meta['counts']['val']['tokens'] > 100_000 and meta['counts']['train']['tokens'] > 10 * meta['counts']['val']['tokens']


def test_stdlib_split_is_by_document_name(prepared_twice):
    """val.bin is exactly the documents is_val names (less any the writer moved to train for sharing text
    with it, listed in meta.json), in order; train.bin is exactly the rest, in order."""
    from data.stdlib.prepare import stdlib_documents
    corpus = Corpus(prepared_twice[0])
    val_frac, moved = corpus.meta['val_frac'], set(corpus.meta.get('moved_to_train', []))
    want = {'train': bytearray(), 'val': bytearray()}
    names = {'train': set(), 'val': set()}
    for name, text in stdlib_documents():
        split = 'val' if is_val(name, val_frac) and name not in moved else 'train'
        want[split] += text.encode('utf-8')
        names[split].add(name)
    assert not names['train'] & names['val']
    assert 10 <= len(names['val']) < 0.1 * len(names['train'])
    for split in ('train', 'val'):
        assert np.asarray(corpus.splits[split]).astype(np.uint8).tobytes() == bytes(want[split]), split


def test_val_documents_are_not_in_train_and_shared_text_is_rare(prepared_twice):
    """The split is by document, so no document is in both. Text still repeats across documents (license
    headers, codec tables, pydoc topics that repeat another topic): bound that leak, as the README states."""
    corpus = Corpus(prepared_twice[0])
    train = np.asarray(corpus.splits['train']).astype(np.uint8).tobytes()
    val = np.asarray(corpus.splits['val']).astype(np.uint8).tobytes()
    starts = np.random.default_rng(0).integers(0, len(val) - 200, 400)
    leaked = [int(s) for s in starts if val[s:s + 200] in train]
    assert len(leaked) <= 0.05 * len(starts), f'{len(leaked)}/400 sampled 200-byte val windows occur in train'
    from data.stdlib.prepare import stdlib_documents
    names = [name for name, _ in stdlib_documents()]
    assert len(names) == len(set(names)), 'document names must be unique for the split to be by document'


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer('byte')
    text = 'def f(x):\n    return "héllo ∑ 🙂"\t\x00'
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and list(ids) == list(text.encode('utf-8'))
    assert tok.decode(ids) == text and tok.vocab_size == 256


def test_missing_tiktoken_encoding_is_a_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError('no network')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(DataError) as e:
        get_tokenizer('gpt2')
    message = str(e.value)
    assert 'TIKTOKEN_CACHE_DIR' in message and "'gpt2'" in message and '--tokenizer=byte' in message


def test_prepare_with_missing_encoding_exits_2_with_one_line(tmp_path):
    out = run_script('data/stdlib/prepare.py', '--tokenizer=gpt2', f'--out_dir={tmp_path / "gpt2"}',
                     env={**OFFLINE, 'TIKTOKEN_CACHE_DIR': str(tmp_path / 'empty_cache')})
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and 'TIKTOKEN_CACHE_DIR' in out.stderr, out.stderr
    assert 'Traceback' not in out.stderr
    assert not (tmp_path / 'gpt2' / 'meta.json').exists()


def random_text(seed, n_words):
    words = ['alpha', 'beta', 'gamma', 'delta', 'tensor', 'loss', 'token', 'batch', 'layer', 'grad', 'é', 'ß']
    return ' '.join(np.random.default_rng(seed).choice(words, n_words))


def test_text_prepare_on_a_folder(tmp_path, text_name):
    folder = tmp_path / 'notes'
    docs = {}
    for i in range(40):
        rel = f'sub{i % 3}/note{i:02d}.txt' if i % 2 else f'note{i:02d}.md'
        docs[rel] = f'note {i}: ' + random_text(i, 20 + 10 * i) + ' é\n'
    (folder / 'skip.bin').parent.mkdir(parents=True)
    (folder / 'skip.bin').write_bytes(b'\xff\xfe binary, not text')
    for rel, text in docs.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding='utf-8')
    val_frac = 0.2
    assert any(is_val(r, val_frac) for r in docs) and not all(is_val(r, val_frac) for r in docs)
    out = run_script('data/text/prepare.py', f'--input={folder}', f'--name={text_name}',
                     f'--val_frac={val_frac}')
    assert out.returncode == 0, out.stderr
    corpus = Corpus(DATA_ROOT / 'text' / text_name / 'byte')
    assert not corpus.meta.get('moved_to_train')  # no two notes share text
    for split in ('train', 'val'):
        want = b''.join(docs[r].encode() for r in sorted(docs) if is_val(r, val_frac) == (split == 'val'))
        assert np.asarray(corpus.splits[split]).astype(np.uint8).tobytes() == want, split
    assert corpus.meta['counts']['train']['documents'] + corpus.meta['counts']['val']['documents'] == len(docs)


def test_text_prepare_gives_a_split_the_hash_left_empty_the_other_splits_last_document(tmp_path, text_name, capsys):
    """A book cut into documents whose names all hash to train (here 3 of them at val_frac 0.05): the last one
    goes to val, said on stderr, instead of refusing an input that has enough text; one document is refused."""
    from data.text import prepare as text_prepare
    book = tmp_path / 'book.txt'
    book.write_text(random_text(0, 600))
    names = [name for name, _ in text_prepare.text_documents(book, 1500)]
    assert len(names) == 3 and not any(is_val(n, 0.05) for n in names)
    text_prepare.prepare(text_prepare.PrepareConfig(input=str(book), name=text_name, doc_chars=1500))
    counts = Corpus(DATA_ROOT / 'text' / text_name / 'byte').meta['counts']
    assert (counts['train']['documents'], counts['val']['documents']) == (2, 1)
    assert 'the hash split left val without a document: the last train document goes there' in capsys.readouterr().err
    with pytest.raises(DataError, match='val split'):
        write_corpus(tmp_path / 'one', [('only', 'x' * 100)], get_tokenizer('byte'), 'test', val_frac=1e-4, fallback=True)


def test_write_corpus_refuses_an_empty_split(tmp_path):
    with pytest.raises(DataError, match='val split'):
        write_corpus(tmp_path / 'c', [('only-train-doc', 'x' * 100)], get_tokenizer('byte'), 'test', val_frac=1e-4)
    assert not (tmp_path / 'c' / 'meta.json').exists()


def test_a_build_waiting_on_a_first_build_that_fails_builds_in_the_folders_it_removed(tmp_path):
    """The loop's first use waits for another process's build (if_missing); when that build fails and removes the
    folders it made, the waiting one makes them again and builds, instead of failing to open its lock."""
    import threading
    import time
    from data.loader import CorpusBuild
    target, started, outcome = tmp_path / 'text' / 'notes' / 'byte', threading.Event(), {}

    def failing():
        try:
            with CorpusBuild(target, if_missing=True):
                started.set()
                time.sleep(0.5)  # the other build is waiting on the lock by now
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            outcome['first'] = 'stopped'

    def waiting():
        started.wait()
        with CorpusBuild(target, if_missing=True) as build:
            outcome['second'] = build.folder.is_dir()

    threads = [threading.Thread(target=failing), threading.Thread(target=waiting)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert outcome == {'first': 'stopped', 'second': True}


def test_a_failed_first_build_leaves_no_empty_folders_and_a_failed_rebuild_keeps_the_old(tmp_path):
    target = tmp_path / 'text' / 'notes' / 'byte'
    with pytest.raises(DataError, match='val split'):
        write_corpus(target, [('only-train-doc', 'x' * 100)], get_tokenizer('byte'), 'test', val_frac=1e-4)
    assert list(tmp_path.iterdir()) == []  # text/notes/ was made for this build: gone with it
    docs = [(f'doc{i}', 'y' * 50) for i in range(40)]
    write_corpus(target, docs, get_tokenizer('byte'), 'test', val_frac=0.3)
    with pytest.raises(DataError, match='val split'):
        write_corpus(target, [('only-train-doc', 'x' * 100)], get_tokenizer('byte'), 'test', val_frac=1e-4)
    assert Corpus(target).meta['counts']['train']['documents'] + Corpus(target).meta['counts']['val']['documents'] == 40


# -----------------------------------------------------------------------------
# Batches

def stream(n=1001, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint16)


def test_ids_are_stream_offsets():
    tokens, T = stream(), 16
    batches = Batches(tokens, T, seed=1)
    for _ in range(5):
        x, y, ids = batches.next(7)
        assert x.shape == y.shape == (7, T) and x.dtype == y.dtype == torch.int64
        for row, i in enumerate(ids.tolist()):
            assert i % T == 0
            assert x[row].tolist() == tokens[i:i + T].tolist()
            assert y[row].tolist() == tokens[i + 1:i + T + 1].tolist()


def test_an_epoch_covers_every_example_once():
    tokens, T = stream(), 16
    n = num_examples(tokens, T)
    assert n == (len(tokens) - 1) // T == 62
    batches = Batches(tokens, T, seed=3)
    epoch = torch.cat([batches.next_ids(2) for _ in range(n // 2)]).tolist()
    assert sorted(epoch) == [k * T for k in range(n)]
    second = torch.cat([batches.next_ids(2) for _ in range(n // 2)]).tolist()
    assert sorted(second) == sorted(epoch) and second != epoch  # a fresh order each epoch
    assert batches.state_dict() == {'epoch': 2, 'pos': 0}
    other_seed = Batches(tokens, T, seed=4).next_ids(n).tolist()
    assert other_seed != epoch


def test_restricted_examples():
    tokens, T = stream(), 16
    batches = Batches(tokens, T, seed=0, examples=[1, 5, 9])
    assert sorted(batches.next_ids(3).tolist()) == [16, 80, 144]


def test_state_dict_resumes_the_exact_order():
    tokens, T = stream(), 16
    a = Batches(tokens, T, seed=5)
    for _ in range(9):  # 45 of 62 examples: the next draws cross into epoch 1
        a.next(5)
    state = a.state_dict()
    want = [a.next_ids(5).tolist() for _ in range(30)]
    b = Batches(tokens, T, seed=5)
    b.load_state_dict(state)
    assert [b.next_ids(5).tolist() for _ in range(30)] == want


def test_ddp_ranks_get_disjoint_halves_of_one_global_batch():
    tokens, T = stream(), 16
    single = Batches(tokens, T, seed=7)
    ranks = [Batches(tokens, T, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):  # crosses epoch boundaries
        both = single.next_ids(6).tolist()
        r0, r1 = (r.next_ids(3).tolist() for r in ranks)
        assert r0 == both[:3] and r1 == both[3:]
        assert not set(r0) & set(r1)


def test_block_size_larger_than_data_is_a_data_error():
    tokens = stream(50)
    with pytest.raises(DataError, match='block_size=64'):
        Batches(tokens, 64, seed=0)
    with pytest.raises(DataError, match='block_size=64'):
        val_ids(tokens, 64, 8)
    Batches(tokens, 48, seed=0)  # 49 tokens after the first make one example


def test_val_ids_are_fixed_and_in_range():
    tokens, T = stream(), 16
    ids = val_ids(tokens, T, 10)
    assert ids.tolist() == val_ids(tokens, T, 10).tolist() and len(ids) == 10
    assert ids[0] == 0 and ids[-1] == (num_examples(tokens, T) - 1) * T and all(i % T == 0 for i in ids)
    x, y = get_examples(tokens, ids, T)
    assert y[:, :-1].tolist() == x[:, 1:].tolist()
    assert len(val_ids(tokens, T, 1000)) == num_examples(tokens, T)


def test_corpus_refuses_truncated_bin(tmp_path):
    write_corpus(tmp_path / 'c', [(f'doc{i}', random_text(i, 60)) for i in range(200)], get_tokenizer('byte'), 'test')
    corpus = Corpus(tmp_path / 'c')
    assert corpus.vocab_size == 256 and len(corpus.fingerprint()) == 16
    data = (tmp_path / 'c' / 'val.bin').read_bytes()
    (tmp_path / 'c' / 'val.bin').write_bytes(data[:-2])
    with pytest.raises(DataError, match='prepare it again'):
        Corpus(tmp_path / 'c')


def test_repo_root_fixture_points_at_the_repo():
    assert (ROOT / 'train.py').exists() and DATA_ROOT == ROOT / 'data'


# -----------------------------------------------------------------------------
# n-gram floors

def hand_corpus(folder, train, val, vocab_size=256):
    """A corpus folder written by hand (no writer involved): byte strings or token lists."""
    folder.mkdir(parents=True)
    counts = {}
    for split, tokens in (('train', train), ('val', val)):
        arr = np.frombuffer(tokens.encode(), np.uint8) if isinstance(tokens, str) else np.asarray(tokens)
        arr.astype(np.uint16).tofile(folder / f'{split}.bin')
        counts[split] = {'documents': 1, 'tokens': len(arr)}
    (folder / 'meta.json').write_text(json.dumps({'tokenizer': 'byte', 'vocab_size': vocab_size, 'dtype': 'uint16',
                                                  'counts': counts}))
    return Corpus(folder)


def test_ngram_floors_on_a_hand_computed_corpus(tmp_path):
    """train 'ababac', val 'xaba': the scored positions are 2 ('b' after 'xa') and 3 ('a' after 'ab'); V = 256.
    unigram: counts a3 b2 c1, n1 = n2 = 1, D = 1/(1+2); P(w) = (max(c_w - D, 0) + D * 3 types / V) / 6.
    bigram: counts ab2 ba2 ac1, n1 = 1, n2 = 2, D = 1/5. Its unigram level counts distinct predecessors
      (b:{a} a:{b} c:{a}, all 1, so D = 1): P1 = (0 + 1 * 3 / V) / 3 = 1/V.
      P(b|a) = (2 - D + D * 2 * P1) / 3 (a is followed 3 times, by 2 types); P(a|b) = (2 - D + D * 1 * P1) / 2.
    trigram: counts aba2 bab1 bac1, n1 = 2, n2 = 1, D = 1/2. Bigram level, distinct predecessors of each
      bigram (ba:{a} ab:{b} ac:{b}, all 1: D = 1): P2(b|a) = (0 + 1 * 2 * P1) / 2 = 1/V, P2(a|b) = 1/V, with
      P1 = 1/V again (b, c, a each after one type). 'xa' never occurs, so P(b|xa) = P2(b|a) = 1/V;
      P(a|ab) = (2 - D + D * 1 * P2(a|b)) / 2."""
    from data.ngram import ngram_floors
    V = 256
    ce = lambda p, q: -(np.log(p) + np.log(q)) / 2  # noqa: E731
    D1, D2, D3 = 1 / 3, 1 / 5, 1 / 2
    want = {'unigram': ce((2 - D1 + D1 * 3 / V) / 6, (3 - D1 + D1 * 3 / V) / 6),
            'bigram': ce((2 - D2 + D2 * 2 / V) / 3, (2 - D2 + D2 / V) / 2),
            'trigram': ce(1 / V, (2 - D3 + D3 / V) / 2)}
    got = ngram_floors(hand_corpus(tmp_path / 'c', 'ababac', 'xaba'))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-12), name


def test_higher_orders_and_windows_score_the_same_positions_as_a_direct_count(tmp_path):
    """Orders up to 7 all score val from token 6 on; a windows floor averages exactly the targets of the
    loop's eval windows (loader.val_ids), each with only the context its window gives (as the model sees
    it). Checked against kneser_ney_nats on those positions directly, and
    an order-7 model of a periodic stream is near-certain where the unigram one is not."""
    import data.ngram as ngram
    from data.loader import val_ids
    text = 'the cat sat on the mat. ' * 40
    corpus = hand_corpus(tmp_path / 'c', text, text[:300])
    floors = ngram.ngram_floors(corpus, max_order=7)
    assert list(floors) == list(ngram.FLOOR_ORDERS)
    assert floors['7-gram'] < 0.1 < floors['unigram']
    train, val = (np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) for t in (text, text[:300]))
    whole = ngram.kneser_ney_nats(train, val, 5, 256, start=6)
    assert floors['5-gram'] == pytest.approx(whole.mean(), rel=1e-12)
    windows = ngram.ngram_floors(corpus, max_order=7, windows=(16, 4))
    ids = val_ids(val, 16, 4)
    # target j of a window has j + 1 tokens of context: the 5-gram floor uses order min(5, j + 2) there
    per_order = {n: ngram.kneser_ney_nats(train, val, n, 256, start=6) for n in range(2, 6)}
    want = [per_order[min(5, j + 2)][k + 1 + j - 6] for k in ids for j in range(16) if k + 1 + j >= 6]
    assert windows['5-gram'] == pytest.approx(np.mean(want), rel=1e-12)
    assert ngram.ngram_floors(Corpus(tmp_path / 'c'), max_order=7) == floors  # both read back from the cache


def test_ngram_floors_are_finite_sparse_and_cached(tmp_path, monkeypatch):
    """A gpt2-sized vocabulary (sparse counts), val tokens train never saw; the second call reads the cache."""
    import data.ngram as ngram
    rng = np.random.default_rng(0)
    corpus = hand_corpus(tmp_path / 'c', rng.integers(0, 50_000, 20_000), rng.integers(0, 50_257, 3_000), 50_257)
    floors = ngram.ngram_floors(corpus)
    assert all(np.isfinite(v) and 0 < v < 2 * np.log(50_257) for v in floors.values()), floors
    assert floors['unigram'] > np.log(20_000) - 1  # random tokens: about log of the types seen
    monkeypatch.setattr(ngram, 'kneser_ney_nats', lambda *a: pytest.fail('recomputed despite the cache'))
    assert ngram.ngram_floors(Corpus(tmp_path / 'c')) == floors


def test_a_text_file_given_as_dataset_names_the_prepare_command_for_it(tmp_path):
    """--dataset=<a .txt file>: one line naming text/prepare.py with that file as --input and the --dataset to
    give after (it suggested preparing into a folder under the file)."""
    import train
    book = tmp_path / 'my book.txt'
    book.write_text('some text\n' * 100)
    with pytest.raises(DataError) as e:
        train.load_corpus(train.TrainConfig(dataset=str(book)))
    assert str(e.value) == (f'--dataset={book} is a file, not a prepared corpus: prepare it with `python data/text/prepare.py '
                            f"--input='{book}' --name=my_book --tokenizer=byte`, then give --dataset=text/my_book")  # pastes whole
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes(b'PK\x03\x04\x00\xff\xfe weights')
    with pytest.raises(DataError, match=r'ckpt.pt is a file, not a prepared corpus: give a corpus folder \(with meta.json\)'):
        train.load_corpus(train.TrainConfig(dataset=str(ckpt)))  # not told to prepare a checkpoint as text
    pattern = tmp_path / 'notes[1].txt'  # --input would read the name as a glob (matching notes1.txt): not offered
    pattern.write_text('some text\n' * 100)
    with pytest.raises(DataError, match=r'its name has a glob character .* copy it to a plain name, then prepare that'):
        train.load_corpus(train.TrainConfig(dataset=str(pattern)))
