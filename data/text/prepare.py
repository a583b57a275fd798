"""Your own text as a corpus: one file, or every text file under a folder (sorted by path).

    python data/text/prepare.py --input=book.txt --name=book    # -> data/text/book/byte/
    python train.py --dataset=text/book

Each file is a document; a hash of its path puts about 5% of documents in val. A single file is cut
into documents of `doc_chars` characters so it has a val split too.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import ConfigError, cli, require  # noqa: E402
from data.loader import DATA_ROOT, get_tokenizer, write_corpus  # noqa: E402

TEXT_SUFFIXES = {'.txt', '.md', '.rst', '.py', '.tex', '.html', '.json', '.csv', ''}


@dataclass(frozen=True)
class PrepareConfig:
    input: str = ''          # a text file or a folder of them
    name: str = ''           # corpus name; '' = the input's stem. Used as --dataset=text/<name>
    tokenizer: str = 'byte'  # 'byte' or a tiktoken encoding name
    val_frac: float = 0.05   # fraction of documents (by name hash) in val
    doc_chars: int = 20_000  # a single input file is cut into documents this long

    def __post_init__(self):
        require(self.input, '--input=PATH is required: a text file or a folder of text files')
        require(0 < self.val_frac < 1, f'--val_frac must be in (0, 1), got {self.val_frac}')
        require(self.doc_chars > 0, f'--doc_chars must be positive, got {self.doc_chars}')


def text_documents(path, doc_chars):
    if path.is_file():
        text = path.read_text(encoding='utf-8', errors='replace')
        for i in range(0, len(text), doc_chars):
            yield f'{path.name}:{i}', text[i:i + doc_chars]
        return
    for p in sorted(q for q in path.rglob('*') if q.is_file() and q.suffix in TEXT_SUFFIXES):
        yield p.relative_to(path).as_posix(), p.read_text(encoding='utf-8', errors='replace')


def prepare(cfg):
    path = Path(cfg.input)
    if not path.exists():
        raise ConfigError(f'--input={cfg.input} does not exist')
    name = cfg.name or path.stem
    out_dir = DATA_ROOT / 'text' / name / cfg.tokenizer
    meta = write_corpus(out_dir, text_documents(path, cfg.doc_chars), get_tokenizer(cfg.tokenizer),
                        source=str(path.resolve()), val_frac=cfg.val_frac)
    print(f"wrote {out_dir}: train {meta['counts']['train']['tokens']:,} tokens, "
          f"val {meta['counts']['val']['tokens']:,} tokens; train with --dataset=text/{name}")
    return out_dir


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
