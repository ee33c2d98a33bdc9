"""Deterministic English sentences harvested from Python standard-library docstrings.

Used as calibration / evaluation text for the sentence-embedding benchmarks and
tests, so that nothing has to be downloaded at run time.  The corpus depends
only on the Python version's stdlib (not on hashing, environment, import order
or third-party monkeypatching): modules are walked in a fixed sorted order,
pure-Python modules are read from their source files with ``ast`` (C modules
through their objects), members are taken in sorted name order, and sentences
are de-duplicated keeping the first occurrence.

    calibration = docstring_sentences(200, 0)
    evaluation = docstring_sentences(400, 200)   # disjoint from calibration
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import sysconfig
import warnings

__all__ = ["STDLIB_MODULES", "docstring_sentences", "all_docstring_sentences", "module_text"]

# Platform-independent stdlib modules (sorted; never reorder or edit this list
# without expecting the calibration / evaluation sentences to change).  Any
# that cannot be found are skipped silently.
STDLIB_MODULES: tuple[str, ...] = tuple(sorted([
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "email.message", "email.utils", "enum",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "html", "html.parser",
    "http", "http.client", "http.cookiejar", "http.server", "imaplib",
    "inspect", "ipaddress", "itertools", "json", "logging", "logging.handlers",
    "mailbox", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "smtplib", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "typing", "unittest", "unittest.mock", "urllib", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "wave", "xml.dom.minidom",
    "zipfile",
]))

_MIN_WORDS, _MAX_WORDS = 6, 40
_SPLIT = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]*[,.;:!?)]*$")


def _docs_from_source(path: str) -> list[str]:
    """Module docstring + docstrings of public top-level classes/functions, by name."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    docs = [ast.get_docstring(tree, clean=True)]
    defs = {}
    for node in tree.body:  # a later definition of the same name wins, as at run time
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if not node.name.startswith("_"):
                defs[node.name] = node
    docs += [ast.get_docstring(defs[name], clean=True) for name in sorted(defs)]
    return [d for d in docs if d]


def _docs_from_objects(mod) -> list[str]:
    """For C modules (itertools, ...): docstrings of the module and of its own
    public classes/functions."""
    docs = [mod.__doc__]
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) == mod.__name__:
            docs.append(obj.__doc__)
    return [inspect.cleandoc(d) for d in docs if isinstance(d, str) and d]


def _module_source(modname: str) -> str | None:
    """Path of the module's .py source, found without importing it where possible."""
    spec = importlib.util.find_spec(modname)
    if spec is None:
        return None
    origin = spec.origin
    if not (origin and origin.endswith(".py")):
        # frozen stdlib modules (os, abc, ... in 3.11+) report origin "frozen"
        stdlib = sysconfig.get_paths()["stdlib"]
        parts = modname.split(".")
        for cand in (os.path.join(stdlib, *parts) + ".py",
                     os.path.join(stdlib, *parts, "__init__.py")):
            if os.path.isfile(cand):
                return cand
        return None
    return origin if os.path.isfile(origin) else None


def _docs_of_module(modname: str) -> list[str]:
    # Pure-Python modules are read from their source file, so that monkeypatching
    # by third-party packages (importing torch replaces inspect.getfile, for
    # one) cannot change the corpus; C modules (itertools) through their objects.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            path = _module_source(modname)
            if path is not None:
                return _docs_from_source(path)
            return _docs_from_objects(importlib.import_module(modname))
        except Exception:  # pragma: no cover - platform-dependent modules
            return []


def _good(sentence: str) -> bool:
    words = sentence.split()
    if not (_MIN_WORDS <= len(words) <= _MAX_WORDS):
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?" or sentence[-2].isdigit():
        return False  # the last test drops list-item fragments ("... conventions: 1.")
    if any(tok in sentence for tok in (">>>", "::", "==", "()", "__", "http", "--", "[", "{", "\\")):
        return False
    # "mostly letters": most whitespace tokens are plain words, and almost all
    # non-space characters are letters.
    plain = sum(1 for w in words if _WORD.match(w))
    if plain < 0.85 * len(words):
        return False
    chars = [c for c in sentence if not c.isspace()]
    return sum(c.isalpha() for c in chars) >= 0.9 * len(chars)


class _Corpus:
    """The corpus, built lazily module by module.

    Modules are processed in a fixed order and de-duplication keeps the first
    occurrence, so the first k sentences only depend on the first modules:
    asking for 600 sentences does not parse all the modules.
    """

    def __init__(self) -> None:
        self.sentences: list[str] = []
        self._seen: set[str] = set()
        self._next = 0

    def extend_to(self, count: int | None) -> None:
        while self._next < len(STDLIB_MODULES) and (count is None or len(self.sentences) < count):
            modname = STDLIB_MODULES[self._next]
            self._next += 1
            for doc in _docs_of_module(modname):
                text = " ".join(doc.split())
                for sent in _SPLIT.split(text):
                    sent = sent.strip()
                    if sent and _good(sent):
                        key = sent.lower()
                        if key not in self._seen:
                            self._seen.add(key)
                            self.sentences.append(sent)


_corpus = _Corpus()


def _reset_cache() -> None:
    """Forget the corpus built so far (for tests)."""
    global _corpus
    _corpus = _Corpus()


def all_docstring_sentences() -> tuple[str, ...]:
    """Every sentence of the corpus, in deterministic order, de-duplicated."""
    _corpus.extend_to(None)
    return tuple(_corpus.sentences)


def docstring_sentences(n: int, offset: int = 0) -> list[str]:
    """Return ``n`` English sentences starting at ``offset`` of the corpus.

    Deterministic for a given Python version; slices with non-overlapping
    ``[offset, offset + n)`` ranges are disjoint.  Raises ``ValueError`` if the
    corpus has fewer than ``offset + n`` sentences.
    """
    if n < 0 or offset < 0:
        raise ValueError("n and offset must be non-negative")
    _corpus.extend_to(offset + n)
    sents = _corpus.sentences
    if offset + n > len(sents):
        raise ValueError(
            f"only {len(sents)} docstring sentences available, asked for [{offset}, {offset + n})"
        )
    return list(sents[offset:offset + n])


def module_text(modname: str) -> str:
    """A module's docstrings (module, then public classes/functions by name) as one text, paragraphs
    separated by blank lines; "" for a module that cannot be found. Language-model text (testing/llm.py)."""
    return "\n\n".join(_docs_of_module(modname))
