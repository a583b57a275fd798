"""Your own text as a corpus: one file, every text file under a folder, or every text file a glob matches.

    python data/text/prepare.py --input=book.txt --name=book    # -> data/text/book/byte/
    python data/text/prepare.py --input='notes/**/*.md' --name=notes
    python train.py --dataset=text/book

Each file is a document, named by its path under the folder (or under a glob's leading folders without
wildcards), in sorted order; a hash of the name puts about 5% of documents in val. A single file is cut
into documents of `doc_chars` characters so it has a val split too. Text files are those with a suffix
in TEXT_SUFFIXES (or none); they are read as UTF-8 and a byte that is not UTF-8 becomes U+FFFD. Relative
paths are read from the folder the command runs in. A split the hash leaves empty takes the other's last
document (said on stderr); an input of one document is an error before anything is tokenized. --out_dir
writes the corpus anywhere else instead (then train with --dataset=THAT_FOLDER).
Preparing again from the same --input rebuilds the corpus (its files may have changed); a corpus of that name
built from another --input is kept unless --overwrite=True: checkpoints trained on it need it to resume.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import ConfigError, cli, require  # noqa: E402
from data.loader import DATA_ROOT, NAME_RE, DataError, get_tokenizer, write_corpus  # noqa: E402
from data.shards import find_inputs, glob_base, has_wildcards, input_source  # noqa: E402

TEXT_SUFFIXES = {'.txt', '.md', '.rst', '.py', '.tex', '.html', '.json', '.csv', ''}


@dataclass(frozen=True)
class PrepareConfig:
    input: str = ''          # a text file, a folder of them or a quoted glob
    name: str = ''           # corpus name (one folder name); '' = the input's stem. Used as --dataset=text/<name>
    tokenizer: str = 'byte'  # 'byte' or a tiktoken encoding name
    val_frac: float = 0.05   # fraction of documents (by name hash) in val
    doc_chars: int = 20_000  # a single input file is cut into documents this long
    out_dir: str = ''        # '' = data/text/<name>/<tokenizer>; else the corpus folder itself
    overwrite: bool = False  # replace a corpus of that name built from another --input

    def __post_init__(self):
        require(self.input, '--input=PATH is required: a text file or a folder of text files')
        require(0 < self.val_frac < 1, f'--val_frac must be in (0, 1), got {self.val_frac}')
        require(self.doc_chars > 0, f'--doc_chars must be positive, got {self.doc_chars}')
        require(not self.name or NAME_RE.fullmatch(self.name),
                f"--name must be one folder name (letters, digits, _ . -), got '{self.name}': it becomes data/text/<name>")
        require(NAME_RE.fullmatch(self.tokenizer), f"--tokenizer must be 'byte' or an encoding's name, got '{self.tokenizer}'")


def read_text(path):
    try:
        return path.read_text(encoding='utf-8', errors='replace')
    except OSError as e:
        raise DataError(f'cannot read {path} ({e.strerror}): fix its permissions or leave it out of --input') from None


def text_documents(path, doc_chars):
    """(name, text) documents of --input: a single file cut into doc_chars pieces, else one per file."""
    if not has_wildcards(str(path)) and Path(path).expanduser().is_file():
        file = Path(path).expanduser()
        text = read_text(file)
        for i in range(0, len(text), doc_chars):
            yield f'{file.name}:{i}', text[i:i + doc_chars]
        return
    what = f"documents (files ending in {', '.join(sorted(TEXT_SUFFIXES - {''}))} or without a suffix)"
    for name, p in find_inputs(str(path), lambda q: q.suffix in TEXT_SUFFIXES, what):
        yield name, read_text(p)


def prepare(cfg):
    pattern = cfg.input
    if not has_wildcards(pattern) and not Path(pattern).expanduser().exists():
        raise ConfigError(f'--input={pattern} does not exist (a relative path is read from {Path.cwd()})')
    path = glob_base(pattern) if has_wildcards(pattern) else Path(pattern).expanduser()
    name = cfg.name or path.stem
    if not cfg.out_dir and not NAME_RE.fullmatch(name):
        raise ConfigError(f"the corpus name '{name}' (from --input) is not one folder name: give --name")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else DATA_ROOT / 'text' / name / cfg.tokenizer
    more = 'give more text or a smaller --doc_chars' if path.is_file() else 'give more files'
    other = '' if cfg.overwrite else f"give another {'--out_dir' if cfg.out_dir else '--name'}, or --overwrite=True to replace it"
    meta = write_corpus(out_dir, text_documents(pattern, cfg.doc_chars), get_tokenizer(cfg.tokenizer),
                        source=input_source(pattern), val_frac=cfg.val_frac, more=more, other_source=other, fallback=True)
    dataset = (cfg.out_dir or f'text/{name}') + (f' --tokenizer={cfg.tokenizer}' if cfg.tokenizer != 'byte' else '')
    print(f"wrote {out_dir}: train {meta['counts']['train']['tokens']:,} tokens, "
          f"val {meta['counts']['val']['tokens']:,} tokens; train with --dataset={dataset}")
    return out_dir


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
