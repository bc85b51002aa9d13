"""CLIPTokenizer against open_clip's SimpleTokenizer (the peer; tests may import it)."""
import hashlib
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import ftfy  # peer: installed with open-clip-torch (requirements-test.txt)
import open_clip

from evaclip_paddle.data import tokenizer as tk
from evaclip_paddle.data.tokenizer import CLIPTokenizer, fix_text_lite, tokenize

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# A deterministic, varied test corpus
# ---------------------------------------------------------------------------------------------
WORDS = ("a photo of the cat dog diagram bird car people street sunset mountain river city night "
         "beautiful small large red green blue old new man woman child playing running tree house "
         "food plate coffee cup table window flower sky cloud water beach boat train plane bike").split()
CONTRACTIONS = ["don't", "I'M", "we'll", "they'Re", "it's", "you've", "he'd", "can't", "'s", "'S",
                "rock'n'roll", "o'clock", "'tis", "Y'ALL", "she'LL", "'ve'm'd", "'ſ"]
NUMBERS = ["0", "7", "42", "2024", "3.14159", "1,000,000", "2nd", "10th", "-5", "+1", "1e-3",
           "12:30", "50%", "$9.99", "€20", "№5", "½", "Ⅻ", "٣٤٥", "१२३", "二十", "²", "①"]
PUNCT = ["!", "?", "!!!", "?!", "...", "…", "--", "—", "–", "(", ")", "[x]", "{y}", "<>", "<<>>",
         "(*&^%$#@!)", "#hashtag", "@user", "~", "`", "|", "\\", "/", ";", ":", "::", "\"", "'",
         "''", "'''", "_", "__init__", "+=", "=>", "<=", "©", "®", "™", "°", "§", "¶", "•", "·"]
ENTITIES = ["&amp;", "&#39;", "&lt;", "&gt;", "&quot;", "&nbsp;", "&amp;amp;", "&#x27;", "&EACUTE;",
            "&eacute;", "&eacute", "&copy;", "&#128512;", "&notin;", "&amp;lt;b&amp;gt;", "&AMP;",
            "&#0;", "&#x110000;", "&#65", "&bogus;", "&lt;start_of_text&gt;", "&SZLIG;", "&#150;",
            "&Ntilde; &NTILDE; &nTILDE;", "&amp;amp;amp;amp;quot;", "&#8217;", "&hellip;"]
ACCENTED = ["café", "naïve", "Ångström", "Œuvre", "résumé", "Straße", "ÉCOLE", "cafe\u0301",
            "Ä Ö Ü ä ö ü", "ñandú", "Łódź", "Český", "İstanbul", "ıi", "ØRESUND", "þorn", "ǅemal",
            "ÀÉÎÕÜ", "ḁḃḉ", "ἀρχή", "ᾳ", "α\u0345", "ſtraße", "Kelvin \u212a", "ﬁne ﬂow ﬃ ﬆ ﬅ",
            "Ĳssel", "ŉ", "ǈ"]
SCRIPTS = ["Ελληνικά γλώσσα", "Русский язык", "Українська", "العربية لغة", "עברית", "हिन्दी भाषा",
           "ภาษาไทย", "中文字符测试", "日本語のテキスト", "カタカナ", "ｶﾀｶﾅ", "한국어 텍스트", "ქართული",
           "Հայերեն", "ᚠᚢᚦ", "ⲁⲃⲅ", "𝒥𝒶𝓂𝑒𝓈", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ＡＢＣ１２３！", "Ｈｅｌｌｏ　Ｗｏｒｌｄ",
           "ⓐⓑⓒ", "ᏣᎳᎩ", "ꦧꦱꦗꦮ", "𐌰𐌱𐌲", "𓀀𓀁", "ߒߞߏ", "\U0002b739\U00031350"]
EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "❤️", "🔥🔥🔥", "🤖", "✨", "☕", "🏳️\u200d🌈",
         "🏴\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f", "©️", "1️⃣"]
ODD = ["“quoted”", "‘single’", "„low”", "‹›«»", "\u00a0", "\u200b", "\u200d", "\u00ad", "\ufeff",
       "\x07", "\x1b[31mred\x1b[0m", "\x85", "\x96", "\x80", "\x81", "\x9d", "\r\n", "\r", "\u2028",
       "\u2029", "\x0c", "\x0b", "\x1c", "\x7f", "\u206a", "\ufffc", "\ufffd", "\u0345", "e\u0301\u0301",
       "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<ſtart_of_text>", "<start_of_text",
       "a<end_of_text>b", "</w>", "\ud83d\ude00", "\udc00", "\x1b[١m", "\u3000", "\u2003", "\u202f",
       "\u1680", "\u180e"]
SEPARATORS = [" ", " ", " ", "", "  ", "   ", "\t", "\n", "\n\n", " \t ", "\u3000", "\u2028"]
GROUPS = [WORDS, CONTRACTIONS, NUMBERS, PUNCT, ENTITIES, ACCENTED, SCRIPTS, EMOJI, ODD]
BLOCKS = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
          (0xE00, 0xE7F), (0x1E00, 0x1FFF), (0x2000, 0x206F), (0x2100, 0x23FF), (0x3040, 0x30FF),
          (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF), (0x1D400, 0x1D7FF)]
# UTF-8 read as cp1252/latin-1: ftfy repairs these, the built-in cleaning does not (documented).
MOJIBAKE = ["cafÃ©", "Ã©tÃ© â€™", "voilÃ le travail", "Ã¼ber alles",
            "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "sÃ³"]


def _piece(rng):
    if rng.random() < 0.35:
        word = rng.choice(WORDS)
        r = rng.random()
        return word.upper() if r < 0.15 else word.capitalize() if r < 0.35 else word
    return rng.choice(rng.choice(GROUPS))


def _random_chars(rng, n):
    out = []
    for _ in range(n):
        lo, hi = rng.choice(BLOCKS)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def make_corpus(n=2500, seed=1234):
    rng = random.Random(seed)
    texts = ["", " ", "\n\t ", "a diagram", "a dog", "A DIAGRAM", "a photo of a cat."]
    for group in GROUPS:
        texts.extend(group)
    while len(texts) < n:
        kind = rng.random()
        if kind < 0.1:
            texts.append(_random_chars(rng, rng.randint(1, 40)))
        elif kind < 0.15:
            texts.append("".join(chr(rng.randint(0x80, 0x2FF)) for _ in range(rng.randint(1, 12))))
        else:
            k = rng.randint(60, 140) if kind < 0.25 else rng.randint(1, 25)
            texts.append("".join(_piece(rng) + rng.choice(SEPARATORS) for _ in range(k)))
    return texts


CORPUS = make_corpus()


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def ref():
    t = open_clip.get_tokenizer("EVA02-B-16")
    assert isinstance(t, open_clip.tokenizer.SimpleTokenizer) and t.context_length == 77
    return t


@pytest.fixture(scope="module")
def ref_ids(ref):
    return ref(CORPUS).numpy()


def _encoding_repaired(text):
    """True where ftfy's mojibake repair (the part not re-implemented) changes the text."""
    return ftfy.fix_text(text) != ftfy.fix_text(text, fix_encoding=False)


# ---------------------------------------------------------------------------------------------


def test_vocab_file_and_vocabulary(ours, ref):
    path = os.path.join(REPO_ROOT, "evaclip_paddle", "data", "bpe_simple_vocab_16e6.txt.gz")
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    assert digest.startswith("924691ac") and digest.endswith("d6804a")
    assert ours.vocab_size == 49408 == len(ref.encoder)
    assert ours.encoder == ref.encoder
    assert (ours.sot_token_id, ours.eot_token_id) == (49406, 49407)


def test_facts_examples(ours):
    ids = ours(["a diagram", "a dog"])
    assert ids.dtype == np.int64 and ids.shape == (2, 77)
    assert ids[0, :5].tolist() == [49406, 320, 22697, 49407, 0]
    assert ids[1, :4].tolist() == [49406, 320, 1929, 49407]
    assert not ids[:, 4:].any()
    assert ours.encode("a diagram") == [320, 22697]


def test_corpus_matches_open_clip_without_ftfy(ours, ref_ids):
    """Built-in cleaning (no ftfy): identical ids on every corpus string that ftfy's mojibake
    repair leaves alone.  On this seed that is all of them; the repair cases are counted so a
    new corpus cannot silently hide a regression behind them."""
    assert len(CORPUS) >= 2000
    got = ours(CORPUS)
    repaired = np.array([_encoding_repaired(t) for t in CORPUS])
    assert repaired.mean() < 0.02, f"{repaired.sum()} corpus strings hit ftfy's mojibake repair"
    mismatch = np.nonzero((got != ref_ids).any(axis=1) & ~repaired)[0]
    assert mismatch.size == 0, [CORPUS[i] for i in mismatch[:5]]
    assert (~repaired).sum() >= 2000
    # the corpus really exercises truncation and multi-script text
    lengths = np.array([len(ours.encode(t)) for t in CORPUS])
    assert (lengths > 75).sum() >= 100
    assert (lengths == 0).sum() >= 3
    assert (got[:, -1] == ours.eot_token_id).sum() >= 100


def test_corpus_matches_open_clip_with_ftfy_fixer(ref):
    texts = CORPUS + MOJIBAKE
    ours_ftfy = CLIPTokenizer(text_fixer=ftfy.fix_text)
    np.testing.assert_array_equal(ours_ftfy(texts), ref(texts).numpy())


def test_mojibake_is_the_documented_difference(ours, ref):
    for text in MOJIBAKE:
        assert _encoding_repaired(text)
        assert ours.encode(text) != ref.encode(text), text
    # "cafÃ©" stays as written (lower-cased) instead of becoming "café"
    assert ours.pre_tokenize("cafÃ©") == ["cafã", "©"]
    assert CLIPTokenizer(text_fixer=ftfy.fix_text).pre_tokenize("cafÃ©") == ["café"]


def test_fix_text_lite_is_ftfy_minus_encoding_repair():
    texts = list(CORPUS)
    # every BMP code point, in runs of 16 consecutive ones
    texts += ["".join(chr(c) for c in range(s, s + 16)) for s in range(0, 0x10000, 16)]
    bad = [t for t in texts if fix_text_lite(t) != ftfy.fix_text(t, fix_encoding=False)]
    assert not bad, [ascii(t[:60]) for t in bad[:5]]


def test_split_matches_regex_on_every_code_point(ours, ref):
    """Stdlib-`re` pre-tokenisation vs open_clip's `regex` pattern, each code point in four
    contexts (after a letter, after punctuation, doubled, before a digit)."""
    # planes 0-3 (everything assigned outside plane 14 lives here) and plane 14 in full
    starts = list(range(0, 0x40000, 8192)) + list(range(0xE0000, 0xF0000, 8192))
    for start in starts:
        cps = [c for c in range(start, start + 8192) if not 0xD800 <= c <= 0xDFFF]
        text = " ".join("a{0}!{0}{0}1{0}".format(chr(c)) for c in cps)
        assert ours.split_re.findall(text) == ref.pat.findall(text), hex(start)
    # planes 4-13 (unassigned) and 15-16 (private use): a sparse sample
    sparse = [c for c in range(0x40000, 0x110000, 97) if not 0xE0000 <= c < 0xF0000]
    text = " ".join("a{0}!{0}1".format(chr(c)) for c in sparse)
    assert ours.split_re.findall(text) == ref.pat.findall(text)


@pytest.mark.parametrize("ctx", [2, 3, 5, 16, 77, 100])
def test_truncation_matches(ours, ref, ctx):
    texts = [t for t in CORPUS[:400] if not _encoding_repaired(t)] + [" ".join(WORDS) * 3, "x"]
    got = ours(texts, context_length=ctx)
    np.testing.assert_array_equal(got, ref(texts, context_length=ctx).numpy())
    assert got.shape == (len(texts), ctx)
    long_rows = [i for i, t in enumerate(texts) if len(ours.encode(t)) + 2 > ctx]
    assert long_rows and (got[long_rows, -1] == 49407).all()


def test_decode(ours, ref):
    rng = random.Random(5)
    for _ in range(200):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        text = " ".join(w.upper() if rng.random() < 0.2 else w for w in words)
        ids = ours(text)[0]
        assert ours.decode(ids, skip_special_tokens=True) == text.lower() + " "
        assert ours.decode(ours.encode(text)).strip() == text.lower()
    assert ours.decode(ours.encode("hello, world!")) == "hello , world ! "
    # same text as open_clip's decoder, special tokens and multi-byte characters included
    for text in CORPUS[:600]:
        ids = [49406] + ours.encode(text) + [49407]
        assert ours.decode(ids) == ref.decode(ids)
    with pytest.raises(ValueError):
        ours.decode([49408])


def test_input_validation(ours):
    with pytest.raises(TypeError, match=r"texts\[2\]"):
        ours(["a", "b", 3])
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        ours([None])
    with pytest.raises(TypeError):
        ours(b"bytes")
    with pytest.raises(TypeError):
        ours(42)
    with pytest.raises(TypeError):
        ours.encode(["not", "a", "str"])
    for bad in (1, 0, -3):
        with pytest.raises(ValueError):
            ours("a", context_length=bad)
        with pytest.raises(ValueError):
            CLIPTokenizer(context_length=bad)
    with pytest.raises(TypeError):
        ours("a", context_length=7.5)
    assert ours([]).shape == (0, 77)
    assert ours(("a", "b"), context_length=2).tolist() == [[49406, 49407]] * 2


def test_tokenize_returns_paddle_int64(ref):
    import paddle

    out = tokenize(["a diagram", "a dog"])
    assert isinstance(out, paddle.Tensor)
    assert out.dtype == paddle.int64 and list(out.shape) == [2, 77]
    np.testing.assert_array_equal(out.numpy(), ref(["a diagram", "a dog"]).numpy())
    assert list(tokenize("x", context_length=8).shape) == [1, 8]


def test_bpe_cache_is_bounded_and_consistent():
    small = CLIPTokenizer(cache_size=10)
    full = CLIPTokenizer()
    texts = CORPUS[:300]
    np.testing.assert_array_equal(small(texts), full(texts))
    assert len(small._cache) <= 10


def test_library_does_not_import_peers():
    code = ("import sys; import evaclip_paddle.data.tokenizer as t, evaclip_paddle.data.transforms; "
            "t.CLIPTokenizer()('a photo'); "
            "print(sorted(m for m in ('torch', 'open_clip', 'ftfy', 'regex', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert tk.default_bpe_path().endswith("bpe_simple_vocab_16e6.txt.gz")
