"""Training text and tokenizer for the demo models.

The text is harvested from docstrings of a fixed list of standard-library
modules, so it ships with every Python install and needs no download.  The
result is deterministic for a given Python version (the corpus hash is part
of the model cache key, so a different Python simply retrains).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib
import inspect
import random
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator, Sequence

# Modules with plenty of English prose in their docstrings.  Order matters for
# determinism; modules that are missing on a given build are skipped.
CORPUS_MODULES: tuple[str, ...] = (
    "argparse", "collections", "json", "textwrap", "string", "functools",
    "os", "pathlib", "subprocess", "threading", "logging", "inspect",
    "typing", "dataclasses", "datetime", "difflib", "email.message",
    "http.client", "urllib.parse", "unittest.case", "random", "statistics",
    "fractions", "heapq", "bisect", "shutil", "tempfile", "zipfile",
    "tarfile", "configparser", "csv", "calendar", "pprint", "enum",
    "contextlib", "ast", "decimal", "itertools", "re", "socket", "io",
    "codecs", "pickle", "copy", "glob", "locale", "optparse", "queue",
    "uuid", "base64", "struct", "math", "operator", "weakref", "types",
    "warnings", "traceback", "tokenize", "doctest", "timeit", "shlex",
)

MIN_DOC_CHARS = 40


class CharTokenizer:
    """Character-level tokenizer over newline + printable ASCII, plus EOS.

    id 0 is EOS (ends a document); ids 1.. are '\\n' and chr(32)..chr(126).
    Tabs become 4 spaces and any other character becomes '?', so encoding is
    total and the vocabulary stays small (97), which keeps the LM head cheap.
    """

    EOS = "<eos>"

    def __init__(self) -> None:
        self.chars: list[str] = ["\n"] + [chr(c) for c in range(32, 127)]
        self.eos_id: int = 0
        self._stoi = {ch: i + 1 for i, ch in enumerate(self.chars)}
        self._unk = self._stoi["?"]

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        text = text.replace("\t", "    ")
        ids = [self._stoi.get(ch, self._unk) for ch in text]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            out.append(self.EOS if i == self.eos_id else self.chars[i - 1])
        return "".join(out)


def _iter_doc_objects(mod: object) -> Iterator[object]:
    yield mod
    for name in sorted(dir(mod)):
        obj = getattr(mod, name, None)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            yield obj
            if inspect.isclass(obj):
                members = vars(obj)
                for attr in sorted(members):
                    sub = members[attr]
                    if inspect.isroutine(sub) or isinstance(
                        sub, (property, classmethod, staticmethod)
                    ):
                        yield sub


def _source_docstrings(path: str) -> Iterator[str | None]:
    """Docstrings of a module's source file: the module, its top-level classes and functions
    (by name), and their methods (by name). Read from the file, not the live objects, so
    the text does not depend on what else the process imported: transformers adds methods
    to logging.Logger, torch replaces inspect.getfile."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    yield ast.get_docstring(tree)
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in sorted((n for n in tree.body if isinstance(n, defs)), key=lambda n: n.name):
        yield ast.get_docstring(node)  # type: ignore[arg-type]
        if isinstance(node, ast.ClassDef):
            for sub in sorted((n for n in node.body if isinstance(n, defs)),
                              key=lambda n: n.name):
                yield ast.get_docstring(sub)  # type: ignore[arg-type]


def _docstrings(modules: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. deprecated typing.io access
        for name in modules:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            path = getattr(mod, "__file__", None)
            if path and path.endswith(".py"):
                found: Iterable[str | None] = _source_docstrings(path)
            else:  # a C module (math, itertools): its objects, nothing patches them
                found = (getattr(obj, "__doc__", None) for obj in _iter_doc_objects(mod))
            for doc in found:
                if not isinstance(doc, str):
                    continue
                doc = inspect.cleandoc(doc)
                if len(doc) >= MIN_DOC_CHARS and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def _sources(modules: Sequence[str]) -> list[str]:
    """Fallback when docstrings are stripped (python -OO): split sources."""
    docs: list[str] = []
    for name in modules:
        try:
            src = inspect.getsource(importlib.import_module(name))
        except (ImportError, OSError, TypeError):
            continue
        docs.extend(p for p in src.split("\n\n\n") if len(p) >= MIN_DOC_CHARS)
    return docs


# Runs of one character longer than 3 (ReST underlines "-----", indentation,
# "0000") are squeezed to 3: a tiny model trained on them happily decodes
# "------..." forever under greedy decoding, which makes a dull demo.
_LONG_RUN = re.compile(r"(.)\1{3,}", re.DOTALL)


@lru_cache(maxsize=1)
def load_documents() -> tuple[str, ...]:
    """All corpus documents, in a deterministic order."""
    docs = _docstrings(CORPUS_MODULES)
    if sum(map(len, docs)) < 100_000:
        docs += _sources(CORPUS_MODULES)
    if not docs:
        raise RuntimeError("could not harvest any text from the stdlib")
    return tuple(_LONG_RUN.sub(r"\1\1\1", d.replace("\t", "    ")) for d in docs)


@dataclass(frozen=True)
class Corpus:
    """Tokenized corpus: one flat id stream (documents separated by EOS)."""

    tokenizer: CharTokenizer
    documents: tuple[list[int], ...]
    stream: tuple[int, ...]
    digest: str  # sha256 of the text; part of the model cache key

    def sample_prompt(self, rng: random.Random, min_len: int, max_len: int) -> list[int]:
        """A window of a random document, length uniform in [min_len, max_len].

        Windows start at a line start when possible, so prompts look like
        natural beginnings of text rather than mid-word fragments.
        """
        length = rng.randint(min_len, max_len)
        for _ in range(100):
            doc = self.documents[rng.randrange(len(self.documents))]
            if len(doc) - 1 < length:  # exclude the trailing EOS
                continue
            nl = self.tokenizer.encode("\n")[0]
            starts = [0] + [i + 1 for i, t in enumerate(doc[: len(doc) - 1 - length]) if t == nl]
            start = rng.choice(starts)
            return list(doc[start : start + length])
        # Extremely unlikely: fall back to the flat stream.
        start = rng.randrange(len(self.stream) - length)
        return list(self.stream[start : start + length])


@lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    tok = CharTokenizer()
    docs = load_documents()
    encoded = tuple(tok.encode(d, add_eos=True) for d in docs)
    stream = tuple(t for d in encoded for t in d)
    digest = hashlib.sha256("\x00".join(docs).encode("utf-8", "replace")).hexdigest()
    return Corpus(tokenizer=tok, documents=encoded, stream=stream, digest=digest)


def base64_prompt(corpus: Corpus, rng: random.Random, min_len: int, max_len: int) -> list[int]:
    """High-entropy text (base64 of random bytes, as in logs, tokens and keys): no model
    predicts it, so drafts of its continuation are accepted far less often than on prose."""
    length = rng.randint(min_len, max_len)
    raw = bytes(rng.randrange(256) for _ in range(length))
    return corpus.tokenizer.encode(base64.b64encode(raw).decode()[:length])


def prose_prompt(corpus: Corpus, rng: random.Random, min_len: int, max_len: int) -> list[int]:
    return corpus.sample_prompt(rng, min_len, max_len)


def hex_prompt(corpus: Corpus, rng: random.Random, min_len: int, max_len: int) -> list[int]:
    """Hexadecimal digests and ids, as in logs: a model trained on prose predicts them
    poorly, so drafts of their continuation are accepted far less often."""
    length = rng.randint(min_len, max_len)
    return corpus.tokenizer.encode("".join(rng.choice("0123456789abcdef") for _ in range(length)))


# Workload classes of the demo's requests, by name: prompt generators with visibly different
# acceptance (greedy, default drafter; see demo/run.py for measured values).
WORKLOADS = {"prose": prose_prompt, "base64": base64_prompt, "hex": hex_prompt}
