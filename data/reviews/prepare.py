"""Movie reviews for madpo.py's sentiment task, one review per line ('\\n' ends each review).

Offline (the default) the reviews are generated: a neutral opening sentence ("My cousin and I rented
this on Friday.") followed by one or two sentences that carry the review's sentiment. The sentiment
words come from VADER's own lexicon (vaderSentiment, the task's ground-truth scorer), drawn by valence,
with VADER's negations ("was not brilliant") and intensifiers ("deeply awful"); about half the reviews
are positive and half negative, so a model trained on them has a mean reward near 0. Every neutral word
is checked to score 0 in VADER. Prompts are the first bytes of a review: an opening, so neutral.
IMDb's text is kept as it is, except that a lone surrogate (not valid Unicode, so not writable as UTF-8)
becomes U+FFFD, as an undecodable byte does in data/text/prepare.py.

    python data/reviews/prepare.py                      # generated reviews -> data/reviews/byte/
    python data/reviews/prepare.py --source=imdb        # IMDb (needs `datasets` + network)
                                                        #   -> data/reviews/imdb/byte/, then
    python madpo.py --dataset=reviews/imdb --scorer=transformer   # with a transformer sentiment classifier
"""
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from configurator import ConfigError, UserError, cli, require  # noqa: E402
from data.loader import DATA_ROOT, data_dir, get_tokenizer, write_corpus  # noqa: E402
from runs import free_memory  # noqa: E402

NAMES = ('Anna Ben Carla Dmitri Elena Farid Gwen Hiro Ines Jonas Kemal Lena Marco Nadia Oscar Priya Quentin Rosa Sven '
         'Tomas Uma Victor Wen Yusuf Zoe').split()
RELATIVES = 'brother sister cousin mother father aunt uncle neighbour roommate grandmother colleague'.split()
CITIES = 'Lisbon Osaka Denver Cairo Oslo Lima Prague Dublin Austin Quebec Hanoi Porto Tucson Bergen Leeds Turin'.split()
DAYS = 'Monday Tuesday Wednesday Thursday Friday Saturday Sunday'.split()
JOBS = 'nurse baker pilot lawyer sailor miner clerk painter detective chef doctor student boxer writer farmer'.split()
PLACES = 'a small town|an island|a big city|the mountains|a quiet village|the desert|a fishing port'.split('|')
DECADES = 'fifties sixties seventies eighties nineties'.split()
ASPECTS = [a.replace('_', ' ') for a in 'plot acting script cast ending score pacing dialogue camera_work story soundtrack ' \
           'lead_actor music editing lighting costumes screenplay first_act second_half final_scene direction'.split()]
THINGS = 'film movie picture story ride experience watch'.split()

OPENINGS = [  # the fillers come early, so that the first bytes of reviews (the prompts) vary
    '{name} and my {relative} saw this in {city}.',
    'On {day} in {city}, {name} and I saw this.',
    'My {relative} from {city} picked this one.',
    'In {city}, a {job} moves to {place}.',
    '{name} the {job} returns to {city}.',
    'A {job} and a {job2} meet in {city}.',
    'Last {day} {name} and {name2} came over.',
    'I saw this with {name} on a flight to {city}.',
    '{name}, {name2} and I rented this on {day}.',
    'The film opens in {city}, where a {job} lives.',
    'Set in {place}, the film follows a {job}.',
    'This film follows a {job} from {city}.',
]

# one sentence of the review's sentiment: {adj} has the review's valence, {opp} the opposite one
ALIGNED = [
    'The {aspect} was {boost}{adj}.',
    'The {aspect} is {adj} and {adj2}.',
    'It was {boost}{adj}.',
    'What a {adj} {thing}!',
    'I found the {aspect} {boost}{adj}.',
    'The {aspect} was {neg} {opp}.',
    'The {aspect} felt {adj}, the {aspect2} {adj2}.',
    'Overall a {boost}{adj} {thing}.',
    'In the end, the {aspect} was {neg} {opp} at all.',
    'The {aspect} was {opp}, but the {aspect2} was {boost}{adj}.',
]
NEUTRAL = [
    'It runs for about two hours.',
    'The {aspect} was shot in {city}.',
    'It came out in the {decade}.',
    'I watched it on {day}.',
    'The {aspect} is in black and white.',
]
NEGATIONS = ['not', 'never', "wasn't even", 'not very', 'hardly']  # VADER treats each as a negation
BOOSTERS = ['very ', 'really ', 'deeply ', 'so ', 'incredibly ', 'utterly ', 'quite ', 'remarkably ', 'extremely ']
# adjective-like endings, and stems kept out of a movie review (profanity, violence)
ADJ_SUFFIXES = ('able', 'ible', 'ful', 'ous', 'ive', 'ing', 'ic', 'less', 'ent', 'ant', 'ed', 'y', 'al', 'id')
BLOCKED = ('fuck', 'shit', 'bitch', 'cunt', 'dick', 'cock', 'puss', 'bastard', 'asshole', 'damn', 'rape', 'rapi', 'kill',
           'murder', 'slut', 'whore', 'nigg', 'fag', 'suicid', 'terror', 'racis', 'slav', 'abus', 'assault',
           'death', 'dead', 'died', 'dying', 'bomb', 'crim', 'sex', 'porn', 'douche', 'crap', 'tortur', 'molest', 'corpse',
           'retard', 'gay', 'homo', 'bloody', 'hell', 'devil', 'drunk', 'god', 'christ', 'victim', 'piss', 'puk',
           'kiss', 'fuk', 'felon', 'jail', 'prison', 'widow', 'funeral', 'strangl', 'stab', 'smuggl', 'prosecut')


@dataclass(frozen=True)
class PrepareConfig:
    source: str = 'generated'  # 'generated' (offline) or 'imdb' (Hugging Face datasets, needs network)
    n_reviews: int = 60_000     # generated reviews
    min_valence: float = 1.5    # |VADER valence| of the sentiment words drawn from the lexicon
    n_words: int = 30           # sentiment words per polarity (a seeded draw: few enough for a tiny byte-level GPT)
    seed: int = 0
    tokenizer: str = 'byte'     # madpo.py needs 'byte' ('\n' ends a review)
    val_frac: float = 0.05      # fraction of reviews (by name hash) in val
    out_dir: str = ''           # '' = data/reviews/<tokenizer> (generated) or data/reviews/imdb/<tokenizer>

    def __post_init__(self):
        require(self.source in ('generated', 'imdb'), f"--source must be 'generated' or 'imdb', got '{self.source}'")
        require(self.n_reviews >= 100, f'--n_reviews must be >= 100, got {self.n_reviews}')
        require(0 < self.min_valence < 3, f'--min_valence must be in (0, 3), got {self.min_valence}')
        require(self.n_words >= 1, f'--n_words must be >= 1, got {self.n_words}')
        require(0 < self.val_frac < 1, f'--val_frac must be in (0, 1), got {self.val_frac}')
        self.check_sizes()

    def check_sizes(self):
        """n_reviews against the memory the build holds, val_frac against the reviews it puts in each split
        (is_val splits by a hash in steps of 1/10,000, so a smaller share than that puts none in val)."""
        fits = free_memory(torch.device('cpu')) // REVIEW_BYTES
        require(self.source != 'generated' or self.n_reviews <= fits,
                f'--n_reviews={self.n_reviews:,} needs about {self.n_reviews * REVIEW_BYTES / 2**30:,.1f} GiB of memory '
                f'({REVIEW_BYTES:,} bytes a review while the corpus is built), more than is free: give at most {fits:,}')
        n = self.n_reviews if self.source == 'generated' else IMDB_REVIEWS
        least = max(1e-4, 1 / n)
        require(least <= self.val_frac <= 1 - least, f'--val_frac={self.val_frac:g} of {n:,} reviews leaves a split '
                f'without any (is_val also rounds it to 1/10,000): give a fraction in [{least:.4g}, {1 - least:.4g}]')


REVIEW_BYTES = 2048  # a ~100-byte generated review while the corpus is built (~1.8 KiB measured: text, int64 tokens)
IMDB_REVIEWS = 50_000  # IMDb's train + test


def vader():
    """VADER's analyzer; vaderSentiment is the one extra dependency of the sentiment task."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise UserError('the sentiment task needs vaderSentiment (its ground-truth scorer, pure Python, ships '
                        'its lexicon): pip install vaderSentiment') from None
    return SentimentIntensityAnalyzer()


def lexicon_words(analyzer, min_valence):
    """(positive, negative) adjective-like words of VADER's lexicon with |valence| in [min_valence, 3.2]."""
    def usable(word):
        return re.fullmatch('[a-z]{4,13}', word) and word.endswith(ADJ_SUFFIXES) and not word.endswith('ly') \
            and not any(b in word for b in BLOCKED)
    lex = analyzer.lexicon
    pos = sorted(w for w, v in lex.items() if min_valence <= v <= 3.2 and usable(w))
    neg = sorted(w for w, v in lex.items() if -3.2 <= v <= -min_valence and usable(w))
    return pos, neg


def check_neutral(analyzer):
    """Every filler word must be invisible to the scorer, so that prompts and openings score 0."""
    fillers = NAMES + RELATIVES + CITIES + DAYS + JOBS + PLACES + DECADES + ASPECTS + THINGS
    texts = fillers + [t.format(name='Anna', name2='Ben', relative='cousin', city='Oslo', city2='Lima', day='Monday', job='nurse',
                                job2='baker', place='an island', decade='sixties', aspect='plot') for t in OPENINGS + NEUTRAL]
    texts += [t.format(aspect='plot', aspect2='cast', adj='xyz', adj2='xyz', opp='xyz', neg=neg, boost=boost, thing='film')
              for t in ALIGNED for neg in NEGATIONS for boost in BOOSTERS]
    scored = [t for t in texts if analyzer.polarity_scores(t)['compound'] != 0]
    if scored:
        raise ConfigError(f'neutral fillers that VADER scores: {scored[:5]}')


def generate_review(rng, positive, pos_words, neg_words):
    """One review: a neutral opening, then one or two sentences (each 85% of the review's sentiment)."""
    fill = dict(name=rng.choice(NAMES), name2=rng.choice(NAMES), relative=rng.choice(RELATIVES), city=rng.choice(CITIES),
                city2=rng.choice(CITIES), day=rng.choice(DAYS), job=rng.choice(JOBS), job2=rng.choice(JOBS),
                place=rng.choice(PLACES), decade=rng.choice(DECADES))
    sentences = [rng.choice(OPENINGS).format(**fill)]
    for _ in range(rng.choice((1, 1, 2))):
        if rng.random() < 0.15:
            sentences.append(rng.choice(NEUTRAL).format(aspect=rng.choice(ASPECTS), **fill))
            continue
        same, other = (pos_words, neg_words) if positive else (neg_words, pos_words)
        aspect, aspect2 = rng.sample(ASPECTS, 2)
        sentence = rng.choice(ALIGNED).format(
            aspect=aspect, aspect2=aspect2, adj=rng.choice(same), adj2=rng.choice(same), opp=rng.choice(other),
            boost=rng.choice(BOOSTERS) if rng.random() < 0.4 else '', neg=rng.choice(NEGATIONS), thing=rng.choice(THINGS))
        sentences.append(sentence[0].upper() + sentence[1:])
    return re.sub(r'\b([Aa]) ([aeiou])', r'\1n \2', ' '.join(sentences))  # 'a awful' -> 'an awful'


def generated_documents(cfg):
    """The reviews, lazily; the checks that need VADER's lexicon run now, before the corpus is built."""
    analyzer = vader()
    check_neutral(analyzer)
    pos, neg = lexicon_words(analyzer, cfg.min_valence)
    require(cfg.n_words <= min(len(pos), len(neg)), f'--n_words={cfg.n_words:,}: VADER\'s lexicon has {len(pos)} positive '
            f'and {len(neg)} negative usable words at --min_valence={cfg.min_valence:g}: give at most {min(len(pos), len(neg))}')
    rng = random.Random(cfg.seed)
    pos_words, neg_words = (rng.sample(words, cfg.n_words) for words in (pos, neg))
    return ((f'review{i}', generate_review(rng, i % 2 == 0, pos_words, neg_words) + '\n') for i in range(cfg.n_reviews))


def imdb_documents():
    """IMDb's 50k labelled reviews (train + test), one per line, HTML line breaks removed. Needs network."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError('--source=imdb needs the datasets package and network: pip install datasets') from None
    for split in ('train', 'test'):
        for i, row in enumerate(load_dataset('stanfordnlp/imdb', split=split)):
            text = re.sub(r'\s+', ' ', row['text'].replace('<br />', ' ')).strip()
            yield f'imdb-{split}-{i}', valid_unicode(text) + '\n'


def valid_unicode(text):
    """A lone surrogate (half of a UTF-16 pair, which no UTF-8 byte string can hold) becomes U+FFFD, the character
    an undecodable byte becomes elsewhere (data/text reads its files with errors='replace')."""
    return re.sub('[\ud800-\udfff]', '\ufffd', text)


def prepare(cfg):
    require(cfg.tokenizer == 'byte', "the review corpus is for madpo.py, which needs --tokenizer=byte")
    sub = '' if cfg.source == 'generated' else 'imdb'
    out_dir = Path(cfg.out_dir) if cfg.out_dir else DATA_ROOT / 'reviews' / sub / cfg.tokenizer
    docs = generated_documents(cfg) if cfg.source == 'generated' else imdb_documents()
    source = 'stanfordnlp/imdb train+test' if cfg.source == 'imdb' else \
        f'generated movie reviews (seed {cfg.seed}, {cfg.n_words} words per polarity, min_valence {cfg.min_valence})'
    meta = write_corpus(out_dir, docs, get_tokenizer(cfg.tokenizer), source=source, val_frac=cfg.val_frac)
    print(f"wrote {out_dir}: train {meta['counts']['train']['documents']:,} reviews "
          f"({meta['counts']['train']['tokens']:,} bytes), val {meta['counts']['val']['documents']:,} reviews")
    return out_dir


def ensure_prepared(dataset):
    """madpo.py's corpus: the generated reviews are prepared on first use; IMDb needs its own command."""
    if (data_dir(dataset, 'byte') / 'meta.json').exists():
        return
    if dataset == 'reviews/imdb':
        raise UserError('no prepared IMDb reviews: run `python data/reviews/prepare.py --source=imdb` (needs network)')
    if dataset == 'reviews':
        print('preparing the generated review corpus in data/reviews/byte (once)')
        prepare(PrepareConfig())


if __name__ == '__main__':
    cli(prepare, PrepareConfig)
