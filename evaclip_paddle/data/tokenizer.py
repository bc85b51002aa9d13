"""CLIP byte-level BPE tokenizer (the one every EVA-CLIP text tower was trained with).

Ids are meant to be identical to open_clip's ``SimpleTokenizer`` / ``open_clip.tokenize``:
49408 tokens (256 byte symbols, their 256 word-final ``</w>`` variants, 48894 merges from
``bpe_simple_vocab_16e6.txt.gz``, then ``<start_of_text>`` = 49406 and ``<end_of_text>`` = 49407),
padding with 0, and truncation that keeps ``<end_of_text>`` as the last id.

This module only needs the standard library and numpy (paddle for :func:`tokenize`).

Text cleaning
-------------
open_clip runs ``ftfy.fix_text`` first, then ``html.unescape`` twice, collapses whitespace and
lower-cases.  ftfy is not a dependency here.  :func:`clean_text` re-implements the parts of
``ftfy.fix_text`` (default settings, ftfy 6.x) that are deterministic rules: the per-line
"auto" HTML entity decoding (disabled from the first line containing ``<`` onwards, repeated
until the text stops changing), C1 control characters read as Windows-1252, Latin ligatures,
half/full-width forms, curly quotes, line breaks, surrogate pairs, ANSI terminal escapes,
control characters and NFC normalisation.

What is NOT re-implemented is ftfy's mojibake repair (``fix_encoding``): text that ftfy's
heuristics judge to be UTF-8 mis-decoded as a legacy code page (for example ``"cafÃ©"``, which
ftfy turns into ``"café"``) is tokenised as written.  Pass ``text_fixer=ftfy.fix_text`` to
:class:`CLIPTokenizer` to get open_clip's behaviour on such text as well.

Pre-tokenisation
----------------
open_clip splits with the third-party ``regex`` module (``\\p{L}`` / ``\\p{N}`` classes,
case-insensitive).  Here the same split is done with the standard ``re`` module and character
classes built from :mod:`unicodedata`, plus a small table of letters and numbers assigned after
Python 3.11's Unicode 14.0 (taken from the Unicode tables of ``regex`` 2026.11.15), so that the
split does not depend on the Python version.  One quirk of ``regex`` is reproduced on purpose:
U+0345 (COMBINING GREEK YPOGEGRAMMENI) matches none of the alternatives under case-insensitive
matching and is therefore dropped.
"""

from __future__ import annotations

import gzip
import html
import html.entities
import os
import re
import unicodedata
from typing import Callable, Iterable, List, Optional, Sequence, Union

import numpy as np

__all__ = [
    "CLIPTokenizer",
    "tokenize",
    "clean_text",
    "default_bpe_path",
    "DEFAULT_CONTEXT_LENGTH",
]

DEFAULT_CONTEXT_LENGTH = 77
_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP (lines 1..48894 of the vocab file)


def default_bpe_path() -> str:
    """Path of the BPE merges file shipped with this package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


# ---------------------------------------------------------------------------------------------
# Text cleaning (ftfy-compatible subset + open_clip's 'lower' cleaning)
# ---------------------------------------------------------------------------------------------

_SEGMENT_LIMIT = 1_000_000  # ftfy's max_decode_length: very long lines are processed in chunks

_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_ESCAPE_RE = re.compile("\x1b\\[[\\d;]*[a-zA-Z]")  # \d: any Unicode digit, as in ftfy
_C1_RE = re.compile("[\x80-\x9f]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SINGLE_QUOTES_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES_RE = re.compile("[\u201c-\u201f]")


def _build_entity_table() -> dict:
    table = {}
    for name, char in html.entities.html5.items():
        if not name.endswith(";"):
            continue  # only unambiguous, semicolon-terminated names
        table["&" + name] = char
        # all-lowercase names are also accepted in upper case (e.g. "&EACUTE;" -> "É"),
        # unless the upper-case spelling already is a different, standard entity
        if name == name.lower():
            upper = "&" + name.upper()
            if html.unescape(upper) == upper:
                table[upper] = char.upper()
    return table


_ENTITY_TABLE = _build_entity_table()


def _decode_entity(match: "re.Match") -> str:
    ent = match.group(0)
    found = _ENTITY_TABLE.get(ent)
    if found is not None:
        return found
    if ent.startswith("&#"):
        decoded = html.unescape(ent)
        # keep the reference when it was only partly decoded
        return ent if ";" in decoded else decoded
    return ent


def _decode_c1(match: "re.Match") -> str:
    ch = match.group(0)
    try:
        return bytes([ord(ch)]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D have no cp1252 meaning
        return ch


def _join_surrogates(match: "re.Match") -> str:
    hi, lo = match.group(0)
    return chr(0x10000 + ((ord(hi) - 0xD800) << 10) + (ord(lo) - 0xDC00))


_LIGATURES = str.maketrans({
    "\u0132": "IJ", "\u0133": "ij", "\u0149": "\u02bcn",
    "\u01f1": "DZ", "\u01f2": "Dz", "\u01f3": "dz",
    "\u01c4": "D\u017d", "\u01c5": "D\u017e", "\u01c6": "d\u017e",
    "\u01c7": "LJ", "\u01c8": "Lj", "\u01c9": "lj",
    "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj",
    "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
    "\ufb05": "\u017ft", "\ufb06": "st",
})


def _build_width_table() -> dict:
    table = {0x3000: " "}  # ideographic space
    for cp in range(0xFF01, 0xFFF0):
        narrow = unicodedata.normalize("NFKC", chr(cp))
        if narrow != chr(cp):
            table[cp] = narrow
    return table


_WIDTH = _build_width_table()

_CONTROL = dict.fromkeys(
    list(range(0x00, 0x09)) + [0x0B] + list(range(0x0E, 0x20)) + [0x7F]
    + list(range(0x206A, 0x2070)) + [0xFEFF] + list(range(0xFFF9, 0xFFFD))
)


def _fix_segment(seg: str, unescape: bool) -> str:
    while True:
        before = seg
        if unescape:
            seg = _ENTITY_RE.sub(_decode_entity, seg)
        seg = _C1_RE.sub(_decode_c1, seg)
        seg = seg.translate(_LIGATURES)
        seg = seg.translate(_WIDTH)
        seg = _SINGLE_QUOTES_RE.sub("'", _DOUBLE_QUOTES_RE.sub('"', seg))
        seg = (seg.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
               .replace("\u2029", "\n").replace("\x85", "\n"))
        if _SURROGATE_RE.search(seg):
            seg = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(_join_surrogates, seg))
        seg = _ANSI_ESCAPE_RE.sub("", seg)
        seg = seg.translate(_CONTROL)
        seg = unicodedata.normalize("NFC", seg)
        if seg == before:
            return seg


def fix_text_lite(text: str) -> str:
    """The rule-based part of ``ftfy.fix_text`` (see the module docstring for what is left out)."""
    pieces = []
    pos, n = 0, len(text)
    unescape = True
    while pos < n:
        end = text.find("\n", pos) + 1
        if end == 0:
            end = n
        end = min(end, pos + _SEGMENT_LIMIT)
        seg = text[pos:end]
        if unescape and "<" in seg:
            unescape = False  # stays off for the rest of the text, as in ftfy
        pieces.append(_fix_segment(seg, unescape))
        pos = end
    return "".join(pieces)


def clean_text(text: str, text_fixer: Optional[Callable[[str], str]] = None) -> str:
    """open_clip's default ('lower') cleaning: fix text, unescape HTML twice, collapse
    whitespace, lower-case.  ``text_fixer`` replaces :func:`fix_text_lite` (e.g. ``ftfy.fix_text``)."""
    text = (text_fixer or fix_text_lite)(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


# ---------------------------------------------------------------------------------------------
# Pre-tokenisation with the standard `re` module
# ---------------------------------------------------------------------------------------------

# Letters (L*) and numbers (N*) assigned after Unicode 14.0, per the `regex` package's tables.
_LATER_LETTERS = (
    (0x558, 0x558), (0x58B, 0x58C), (0x88F, 0x88F), (0xC5C, 0xC5C), (0xCDC, 0xCDC),
    (0x1C89, 0x1C8A), (0x208F, 0x208F), (0x209D, 0x209F), (0xA7CB, 0xA7CF), (0xA7D2, 0xA7D2),
    (0xA7D4, 0xA7D4), (0xA7DA, 0xA7DD), (0xA7E2, 0xA7E2), (0xA7F1, 0xA7F1), (0xAB6C, 0xAB6D),
    (0x105C0, 0x105F3), (0x107BB, 0x107BF), (0x10940, 0x10959), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC7), (0x10ED9, 0x10EEE), (0x1123F, 0x11240),
    (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5),
    (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11B0A, 0x11B0A),
    (0x11BC0, 0x11BE0), (0x11DB0, 0x11DDB), (0x11DF1, 0x11DF1), (0x11F02, 0x11F02),
    (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F), (0x13441, 0x13446),
    (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x16EA0, 0x16EB8),
    (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF3), (0x187F8, 0x187FF), (0x18CD6, 0x18CDA),
    (0x18CFF, 0x18CFF), (0x18D09, 0x18D20), (0x18D80, 0x18DF2), (0x18E00, 0x19191),
    (0x191A0, 0x191D2), (0x1B123, 0x1B128), (0x1B132, 0x1B132), (0x1B155, 0x1B155),
    (0x1B168, 0x1B168), (0x1D6A6, 0x1D6A6), (0x1DF1F, 0x1DF81), (0x1DF90, 0x1DF96),
    (0x1DFCD, 0x1DFFF), (0x1E030, 0x1E06D), (0x1E4D0, 0x1E4EB), (0x1E5D0, 0x1E5ED),
    (0x1E5F0, 0x1E5F0), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6E2), (0x1E6E4, 0x1E6E5),
    (0x1E6E7, 0x1E6ED), (0x1E6F0, 0x1E6F4), (0x1E6FE, 0x1E6FF), (0x2B739, 0x2B73F),
    (0x2B81E, 0x2B81E), (0x2CEA2, 0x2CEAD), (0x2EBF0, 0x2EE5D), (0x31350, 0x33479),
    (0x3D000, 0x3FC3F),
)
_LATER_NUMBERS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11DE0, 0x11DE9),
    (0x11F50, 0x11F59), (0x1246F, 0x1246F), (0x12475, 0x1247F), (0x12550, 0x12686),
    (0x16130, 0x16139), (0x16D70, 0x16D79), (0x16FF4, 0x16FF6), (0x1CCF0, 0x1CCF9),
    (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)
_DROPPED = (0x345,)  # matched by no alternative of open_clip's case-insensitive pattern


def _code_point_classes():
    """Per code point: 1 = letter, 2 = number, 3 = dropped, 0 = anything else."""
    kinds = bytearray(0x110000)
    category = unicodedata.category
    for cp in range(0x110000):
        c = category(chr(cp))[0]
        if c == "L":
            kinds[cp] = 1
        elif c == "N":
            kinds[cp] = 2
    for table, kind in ((_LATER_LETTERS, 1), (_LATER_NUMBERS, 2)):
        for lo, hi in table:
            for cp in range(lo, hi + 1):
                if category(chr(cp)) == "Cn":
                    kinds[cp] = kind
    for cp in _DROPPED:
        kinds[cp] = 3
    return kinds


def _ranges_of(kinds: bytearray, kind: int) -> str:
    parts = []
    start = None
    for cp in range(0x110001):
        hit = cp < 0x110000 and kinds[cp] == kind
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            last = cp - 1
            parts.append("\\U%08x" % start if start == last else "\\U%08x-\\U%08x" % (start, last))
            start = None
    return "".join(parts)


_SPLIT_RE_CACHE: dict = {}


def _split_pattern(special_tokens: Sequence[str]) -> "re.Pattern":
    key = tuple(special_tokens)
    pat = _SPLIT_RE_CACHE.get(key)
    if pat is None:
        if "classes" not in _SPLIT_RE_CACHE:
            kinds = _code_point_classes()
            _SPLIT_RE_CACHE["classes"] = (_ranges_of(kinds, 1), _ranges_of(kinds, 2),
                                          _ranges_of(kinds, 3))
        letters, numbers, dropped = _SPLIT_RE_CACHE["classes"]
        # Unicode White_Space, i.e. what `regex` calls \s (stdlib `re` adds U+001C..U+001F)
        spaces = "".join("\\U%08x" % cp for cp in range(0x3100)
                         if chr(cp).isspace() and not 0x1C <= cp <= 0x1F)
        specials = "|".join(re.escape(t) for t in special_tokens)
        # Only the literal alternatives are case-insensitive; the classes are already complete.
        pat = re.compile(
            "(?i:" + specials + "|'s|'t|'re|'ve|'m|'ll|'d)"
            "|[" + letters + "]+"
            "|[" + numbers + "]"
            "|[^" + spaces + letters + numbers + dropped + "]+"
        )
        _SPLIT_RE_CACHE[key] = pat
    return pat


# ---------------------------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------------------------

def _byte_symbols() -> List[str]:
    """The printable stand-in character of every byte value 0..255 (GPT-2 / CLIP convention):
    printable Latin-1 bytes stand for themselves, the other 68 get code points from 256 up."""
    symbols = []
    extra = 0
    for b in range(256):
        if b in _PRINTABLE_BYTES:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


_PRINTABLE_BYTES = frozenset(range(0x21, 0x7F)) | frozenset(range(0xA1, 0xAD)) | frozenset(range(0xAE, 0x100))


def _vocab_byte_order() -> List[int]:
    """Byte values in vocabulary order: the printable ones ascending, then the rest ascending."""
    return sorted(_PRINTABLE_BYTES) + [b for b in range(256) if b not in _PRINTABLE_BYTES]


def _load_merges(path: str) -> List[tuple]:
    with gzip.open(path, "rb") as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE merges file")
    return merges


TextInput = Union[str, Sequence[str]]


class CLIPTokenizer:
    """CLIP BPE tokenizer.

    Args:
        bpe_path: merges file (defaults to the shipped ``bpe_simple_vocab_16e6.txt.gz``).
        context_length: default sequence length of :meth:`__call__` (77).
        text_fixer: optional replacement for :func:`fix_text_lite` (e.g. ``ftfy.fix_text``).
        cache_size: how many pre-tokens keep their BPE result cached.
    """

    def __init__(self, bpe_path: Optional[str] = None, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 text_fixer: Optional[Callable[[str], str]] = None, cache_size: int = 100_000):
        self.context_length = self._check_context_length(context_length)
        self.text_fixer = text_fixer
        self.byte_symbols = _byte_symbols()
        self.symbol_to_byte = {s: b for b, s in enumerate(self.byte_symbols)}
        merges = _load_merges(bpe_path or default_bpe_path())
        base = [self.byte_symbols[b] for b in _vocab_byte_order()]
        vocab = base + [s + "</w>" for s in base]
        vocab += ["".join(m) for m in merges]
        vocab += [_SOT, _EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = vocab
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.special_tokens = (_SOT, _EOT)
        self.split_re = _split_pattern(self.special_tokens)
        self._cache_size = int(cache_size)
        self._cache: dict = {}

    # -- properties ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    @property
    def sot_token_id(self) -> int:
        return self.encoder[_SOT]

    @property
    def eot_token_id(self) -> int:
        return self.encoder[_EOT]

    @property
    def pad_token_id(self) -> int:
        return 0

    # -- core ---------------------------------------------------------------------------------
    def _bpe(self, token: str) -> List[str]:
        """Split one byte-symbol string into vocabulary entries."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        if token in self.special_tokens:
            parts = [token]
        else:
            parts = list(token[:-1]) + [token[-1] + "</w>"]
            rank = self.merge_rank
            while len(parts) > 1:
                best, best_rank = None, None
                for pair in zip(parts, parts[1:]):
                    r = rank.get(pair)
                    if r is not None and (best_rank is None or r < best_rank):
                        best, best_rank = pair, r
                if best is None:
                    break
                first, second = best
                merged = []
                i, n = 0, len(parts)
                while i < n:
                    if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                        merged.append(first + second)
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[token] = parts
        return parts

    def pre_tokenize(self, text: str) -> List[str]:
        """Cleaned text split into the pieces that BPE works on (for inspection and tests)."""
        return self.split_re.findall(clean_text(text, self.text_fixer))

    def encode(self, text: str) -> List[int]:
        """Token ids of one text, without start/end tokens, not truncated."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: List[int] = []
        enc = self.encoder
        symbols = self.byte_symbols
        for piece in self.split_re.findall(clean_text(text, self.text_fixer)):
            mapped = "".join(symbols[b] for b in piece.encode("utf-8"))
            ids.extend(enc[p] for p in self._bpe(mapped))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids.  Word ends become spaces, as in CLIP's decoder.

        With ``skip_special_tokens`` the start token is dropped and decoding stops at the first
        end token (so padding after it is ignored)."""
        out = []
        sot, eot = self.sot_token_id, self.eot_token_id
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if skip_special_tokens:
                if i == eot:
                    break
                if i == sot:
                    continue
            out.append(self.decoder[i])
        # every character of every vocabulary entry (special tokens included) is a byte symbol
        data = bytes(self.symbol_to_byte[ch] for ch in "".join(out))
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    # -- batch --------------------------------------------------------------------------------
    @staticmethod
    def _check_context_length(context_length) -> int:
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for start and end tokens), "
                             f"got {context_length}")
        return int(context_length)

    @staticmethod
    def _as_list(texts: TextInput) -> List[str]:
        if isinstance(texts, str):
            return [texts]
        if isinstance(texts, (bytes, bytearray)):
            raise TypeError("texts must be str or a list of str, got bytes")
        try:
            items = list(texts)
        except TypeError:
            raise TypeError(f"texts must be str or a list of str, got {type(texts).__name__}") from None
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
        return items

    def __call__(self, texts: TextInput, context_length: Optional[int] = None) -> np.ndarray:
        """Ids of one or more texts as an int64 array ``[N, context_length]``.

        Each row is ``<start_of_text> ids... <end_of_text>`` padded with 0; a row that does not
        fit is cut to ``context_length`` and its last id replaced by ``<end_of_text>``."""
        items = self._as_list(texts)
        ctx = self.context_length if context_length is None else self._check_context_length(context_length)
        out = np.zeros((len(items), ctx), dtype=np.int64)
        sot, eot = self.sot_token_id, self.eot_token_id
        for row, text in enumerate(items):
            ids = [sot] + self.encode(text) + [eot]
            if len(ids) > ctx:
                ids = ids[:ctx]
                ids[-1] = eot
            out[row, :len(ids)] = ids
        return out


_DEFAULT_TOKENIZER: Optional[CLIPTokenizer] = None


def get_default_tokenizer() -> CLIPTokenizer:
    """Process-wide tokenizer with the shipped vocabulary (built on first use)."""
    global _DEFAULT_TOKENIZER
    if _DEFAULT_TOKENIZER is None:
        _DEFAULT_TOKENIZER = CLIPTokenizer()
    return _DEFAULT_TOKENIZER


def tokenize(texts: TextInput, context_length: int = DEFAULT_CONTEXT_LENGTH):
    """Like ``open_clip.tokenize``: a paddle int64 tensor ``[N, context_length]``."""
    import paddle  # imported here so that the tokenizer itself works without paddle

    ids = get_default_tokenizer()(texts, context_length=context_length)
    return paddle.to_tensor(ids, dtype="int64")
