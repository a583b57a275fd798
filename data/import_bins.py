"""Import nanoGPT's train.bin / val.bin as a corpus of this project, checked, with the meta.json it needs.

nanoGPT's data/*/prepare.py writes each split as raw token ids with no header: uint16, tiktoken's gpt2
(50257 ids), every document followed by the end-of-text token 50256. That is already this project's
stream format (data/loader.py), so importing is a check and a copy: each file's size a whole number of
tokens, both splits non-empty, every id below the vocabulary; then the files go into a corpus folder
beside a meta.json (tokenizer, vocab_size, dtype, counts), built beside its target and swapped in whole
(CorpusBuild), so a failed import changes nothing. Nothing is downloaded: gpt2's sizes are known here.

    python data/import_bins.py --input=~/nanoGPT/data/openwebtext --out_dir=data/openwebtext/gpt2
    python train.py config/gpt2_124m.py --dataset=openwebtext

--link hard-links the files instead of copying them (same filesystem only; the corpus then shares the
originals, so do not rewrite them in place, e.g. by running nanoGPT's prepare.py in that folder again).
"""
import errno
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from configurator import cli, require  # noqa: E402
from data.loader import DATA_ROOT, NAME_RE, TOKEN_DTYPES, CorpusBuild, DataError, get_tokenizer  # noqa: E402

KNOWN = {'gpt2': (50257, 50256), 'byte': (256, None)}  # tokenizer -> (vocab_size, end-of-text id)
CHUNK = 1 << 24  # tokens scanned at a time: bounded memory on a 9B-token train.bin


@dataclass(frozen=True)
class ImportConfig:
    input: str = ''          # the folder holding nanoGPT's train.bin and val.bin
    out_dir: str = ''        # the corpus folder to write; train with --dataset=OUT_DIR
    tokenizer: str = 'gpt2'  # the tokenizer the bins were written with
    vocab_size: int = 0      # its number of ids (0 = the tokenizer's own: gpt2 50257)
    dtype: str = 'uint16'    # the token type of the files (nanoGPT writes uint16)
    link: bool = False       # hard-link the files instead of copying them (same filesystem only)

    def __post_init__(self):
        require(self.input, '--input=FOLDER is required: the folder holding nanoGPT\'s train.bin and val.bin')
        require(self.out_dir, '--out_dir=FOLDER is required: where the corpus goes (then train with --dataset=FOLDER)')
        require(NAME_RE.fullmatch(self.tokenizer), f"--tokenizer must be an encoding's name, got '{self.tokenizer}'")
        require(self.dtype in TOKEN_DTYPES, f"--dtype must be one of {', '.join(TOKEN_DTYPES)}, got '{self.dtype}'")
        require(self.vocab_size >= 0, f'--vocab_size must be >= 0 (0 = the tokenizer\'s own), got {self.vocab_size}')
        require(self.vocab_size <= np.iinfo(self.dtype).max + 1,
                f'--vocab_size={self.vocab_size} does not fit --dtype={self.dtype}: give --dtype=uint32')


def vocabulary(cfg):
    """(vocab_size, end-of-text id or None): gpt2's known here; another tokenizer's loaded through tiktoken."""
    if cfg.tokenizer in KNOWN:
        vocab_size, eot = KNOWN[cfg.tokenizer]
    else:
        tokenizer = get_tokenizer(cfg.tokenizer)
        vocab_size, eot = tokenizer.vocab_size, tokenizer.eot
    vocab_size = cfg.vocab_size or vocab_size
    require(vocab_size <= np.iinfo(cfg.dtype).max + 1, f'{cfg.tokenizer} has {vocab_size} ids, more than '
            f'--dtype={cfg.dtype} holds: give --dtype=uint32')
    return vocab_size, (eot if eot is not None and eot < vocab_size else None)


def find_bins(folder):
    """{split: path} of the input folder's train.bin and val.bin, refused when it is nanoGPT's char level."""
    if not folder.is_dir():
        raise DataError(f'--input={folder} is not a folder: give the folder holding train.bin and val.bin')
    if (folder / 'meta.pkl').exists():  # nanoGPT's shakespeare_char: ids into its own character table
        raise DataError(f'{folder}/meta.pkl says these bins hold nanoGPT character ids, not tiktoken tokens: '
                        f'prepare the text with data/text/prepare.py instead')
    bins = {split: folder / f'{split}.bin' for split in ('train', 'val')}
    for path in bins.values():
        if not path.is_file():
            raise DataError(f'{path} is missing: nanoGPT\'s prepare.py writes train.bin and val.bin; run it first')
    return bins


def check_bin(path, dtype, vocab_size, eot):
    """{'documents', 'tokens'} of one token file, or one error line naming what is wrong with it."""
    size, itemsize = path.stat().st_size, np.dtype(dtype).itemsize
    if size % itemsize:
        raise DataError(f'{path} holds {size:,} bytes, not a whole number of {dtype} tokens ({itemsize} bytes '
                        f'each): it is truncated or not a token file; write it again (or give the right --dtype)')
    if size == 0:
        raise DataError(f'{path} is empty: nanoGPT\'s prepare.py writes tokens to both splits; run it again')
    tokens, ends = np.memmap(path, dtype=dtype, mode='r'), 0
    for start in range(0, len(tokens), CHUNK):
        chunk = tokens[start:start + CHUNK]
        if int(chunk.max()) >= vocab_size:
            at = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(f'{path} holds token id {int(tokens[at])} at token {at:,}, but the vocabulary has '
                            f'{vocab_size} ids: give the --tokenizer, --vocab_size or --dtype it was written with')
        ends += 0 if eot is None else int(np.count_nonzero(chunk == eot))
    counts = {'tokens': len(tokens)}
    if eot is not None:  # every document ends with the end-of-text token; a last one without it counts too
        counts['documents'] = ends + int(tokens[-1] != eot)
    return counts


def place(src, dst, link):
    if not link:
        shutil.copyfile(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        raise DataError(f'--link needs --out_dir on the same filesystem as {src}: leave out --link to copy') from None


def dataset_arg(out_dir, tokenizer):
    """How train.py names the corpus: --dataset=NAME when it sits at data/NAME/<tokenizer>, else its folder."""
    where = out_dir.resolve()
    if where.parent.parent == DATA_ROOT and where.name == tokenizer:
        return f'--dataset={where.parent.name} --tokenizer={tokenizer}'
    return f'--dataset={out_dir}' + (f' --tokenizer={tokenizer}' if tokenizer != 'byte' else '')  # train checks it


def import_bins(cfg):
    folder, out_dir = Path(cfg.input).expanduser(), Path(cfg.out_dir).expanduser()
    vocab_size, eot = vocabulary(cfg)
    bins = find_bins(folder)
    counts = {split: check_bin(path, cfg.dtype, vocab_size, eot) for split, path in bins.items()}
    meta = {'tokenizer': cfg.tokenizer, 'vocab_size': vocab_size, 'dtype': cfg.dtype, 'counts': counts,
            'source': str(folder.resolve()), 'imported_from': 'nanoGPT train.bin/val.bin', 'config': asdict(cfg),
            'python': sys.version.split()[0]}
    with CorpusBuild(out_dir) as build:
        for split, path in bins.items():
            place(path, build.folder / f'{split}.bin', cfg.link)
        build.commit(meta)  # checks the placed files as any reader would
    print(f"wrote {out_dir}: train {counts['train']['tokens']:,} tokens, val {counts['val']['tokens']:,} tokens "
          f'({cfg.tokenizer}); train with {dataset_arg(out_dir, cfg.tokenizer)}')
    return out_dir


if __name__ == '__main__':
    cli(import_bins, ImportConfig)
