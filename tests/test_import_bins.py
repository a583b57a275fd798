"""data/import_bins.py: nanoGPT's train.bin/val.bin (written here as nanoGPT writes them: an np.memmap of
uint16 gpt2 ids, each document followed by 50256) become a corpus the loader and train.py read; a bad
file is one line and leaves the corpus already at --out_dir as it was."""
import errno
import json
import os

import numpy as np
import pytest

import configurator
import train
from conftest import run_script
from data import import_bins
from data.loader import DATA_ROOT, Batches, Corpus, get_tokenizer, write_corpus

EOT = 50256


def nanogpt_bin(path, docs, dtype=np.uint16):
    """A split as nanoGPT's prepare.py writes it: every document's ids then the end-of-text token, into
    an np.memmap of the whole length. Returns the ids written."""
    ids = np.concatenate([np.append(d, EOT) for d in docs]).astype(dtype)
    out = np.memmap(path, dtype=dtype, mode='w+', shape=(len(ids),))
    out[:] = ids
    out.flush()
    del out
    return ids


def random_docs(seed, n, high=EOT):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, int(rng.integers(5, 60))) for _ in range(n)]


@pytest.fixture
def bins(tmp_path):
    """A nanoGPT data folder (train.bin, val.bin, its prepare.py) and the ids of each split."""
    folder = tmp_path / 'nanogpt' / 'openwebtext'
    folder.mkdir(parents=True)
    (folder / 'prepare.py').write_text('# nanoGPT wrote the bins')
    ids = {'train': nanogpt_bin(folder / 'train.bin', random_docs(0, 40)),
           'val': nanogpt_bin(folder / 'val.bin', random_docs(1, 3))}
    return folder, ids


def test_nanogpt_bins_import_as_a_checked_corpus(bins, tmp_path):
    folder, ids = bins
    out = run_script('data/import_bins.py', f'--input={folder}', f'--out_dir={tmp_path / "owt"}')
    assert out.returncode == 0, out.stderr
    assert f'train with --dataset={tmp_path / "owt"}' in out.stdout
    corpus = Corpus(tmp_path / 'owt')
    for split in ('train', 'val'):
        assert corpus.splits[split].dtype == np.uint16 and np.array_equal(corpus.splits[split], ids[split])
    meta = corpus.meta
    assert (meta['tokenizer'], meta['vocab_size'], meta['dtype']) == ('gpt2', 50257, 'uint16')
    assert meta['counts'] == {'train': {'tokens': len(ids['train']), 'documents': 40},
                              'val': {'tokens': len(ids['val']), 'documents': 3}}
    assert meta['source'] == str(folder.resolve()) and len(corpus.fingerprint()) == 16
    x, y, _ = Batches(corpus.splits['train'], 32, seed=0).next(4)
    assert x.shape == (4, 32) and int(x.max()) < 50257 and not list(tmp_path.glob('.owt.*'))


def test_a_corpus_under_data_is_named_by_its_dataset(tmp_path):
    assert import_bins.dataset_arg(DATA_ROOT / 'openwebtext' / 'gpt2', 'gpt2') == '--dataset=openwebtext --tokenizer=gpt2'
    assert import_bins.dataset_arg(tmp_path / 'x', 'gpt2') == f'--dataset={tmp_path / "x"} --tokenizer=gpt2'


def test_imported_byte_bins_train(tmp_path, tiny_cfg):
    """train.py reads an imported corpus through --dataset=FOLDER (byte ids here: gpt2's files need network)."""
    folder = tmp_path / 'bytes'
    folder.mkdir()
    for split, n in (('train', 20_000), ('val', 2_000)):
        np.random.default_rng(len(split)).integers(0, 256, n).astype(np.uint16).tofile(folder / f'{split}.bin')
    configurator.cli(import_bins.import_bins, import_bins.ImportConfig,
                     [f'--input={folder}', f'--out_dir={tmp_path / "corpus"}', '--tokenizer=byte'])
    result = train.train(tiny_cfg(dataset=str(tmp_path / 'corpus'), budget=3))
    assert result['steps'] == 3 and np.isfinite(result['val_loss'])


def test_link_shares_the_files_and_another_filesystem_is_one_line(bins, tmp_path, monkeypatch, capsys):
    folder, _ = bins
    import_bins.import_bins(import_bins.ImportConfig(input=str(folder), out_dir=str(tmp_path / 'linked'), link=True))
    assert os.stat(tmp_path / 'linked' / 'train.bin').st_ino == os.stat(folder / 'train.bin').st_ino

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    monkeypatch.setattr(os, 'link', cross_device)
    err = one_line_exit(capsys, [f'--input={folder}', f'--out_dir={tmp_path / "other"}', '--link=True'])
    assert '--link needs --out_dir on the same filesystem' in err and not (tmp_path / 'other').exists()


def one_line_exit(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        configurator.cli(import_bins.import_bins, import_bins.ImportConfig, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    return err


def damage(folder, case):
    """Make the bins in folder bad in one way; returns the import's arguments that differ from the good ones."""
    if case == 'odd size':
        with open(folder / 'train.bin', 'ab') as f:
            f.write(b'\x01')
    elif case == 'token past the vocabulary':
        ids = np.fromfile(folder / 'val.bin', dtype=np.uint16)
        ids[7] = 50300
        ids.tofile(folder / 'val.bin')
    elif case == 'empty val':
        (folder / 'val.bin').write_bytes(b'')
    elif case == 'no val':
        (folder / 'val.bin').unlink()
    elif case == 'char level':
        (folder / 'meta.pkl').write_bytes(b'\x80\x04 a pickle')
    elif case == 'vocab too big for the dtype':
        return {'vocab_size': 100000}
    elif case == 'not a folder':
        return {'input': folder / 'train.bin'}
    return {}


@pytest.mark.parametrize('case, message', [
    ('odd size', 'train.bin holds {size} bytes, not a whole number of uint16 tokens (2 bytes each)'),
    ('token past the vocabulary', 'val.bin holds token id 50300 at token 7, but the vocabulary has 50257 ids'),
    ('empty val', "val.bin is empty: nanoGPT's prepare.py writes tokens to both splits"),
    ('no val', "val.bin is missing: nanoGPT's prepare.py writes train.bin and val.bin"),
    ('char level', 'meta.pkl says these bins hold nanoGPT character ids'),
    ('vocab too big for the dtype', '--vocab_size=100000 does not fit --dtype=uint16: give --dtype=uint32'),
    ('not a folder', 'train.bin is not a folder'),
])
def test_bad_bins_are_one_line_and_keep_the_old_corpus(bins, tmp_path, capsys, case, message):
    folder, _ = bins
    target = tmp_path / 'owt'
    write_corpus(target, [(f'd{i}', 'old text ' * 20) for i in range(40)], get_tokenizer('byte'), 'old', val_frac=0.2)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    args = {'input': folder, 'out_dir': target, **damage(folder, case)}
    size = (folder / 'train.bin').stat().st_size
    err = one_line_exit(capsys, [f'--{k}={v}' for k, v in args.items()])
    assert message.format(size=f'{size:,}') in err, err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before and not list(tmp_path.glob('.owt.*'))
    assert json.loads((target / 'meta.json').read_text())['source'] == 'old'
