"""Regenerate ``embedded.txt`` (``embedded.txt.gz`` above 1 MB): the default corpus that ships with the project.

The text is Python's own documentation, which every Python installation carries: the
language-reference topics behind ``help("TOPIC")`` (``pydoc_data.topics``) and the
docstrings of a fixed list of standard-library modules, cleaned into plain English
paragraphs (code examples, tables and non-ASCII characters are dropped). It needs no
download. The output depends on the Python version that runs this script (the committed
file was made with CPython 3.11.7), so the committed file, not this script, is the
reference.

Format: ASCII text; paragraphs separated by one blank line, documents (one reference
section, one module, or one class with its methods) separated by two blank lines.

Run:  python lit/assets/make_embedded.py
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import re
import warnings
from pathlib import Path

MODULES = [
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "builtins", "bz2",
    "calendar", "cgi", "cmd", "code", "codecs", "codeop", "collections", "collections.abc",
    "compileall", "concurrent.futures", "configparser", "contextlib", "contextvars", "copy",
    "copyreg", "csv", "ctypes", "dataclasses", "datetime", "dbm", "decimal", "difflib", "dis",
    "doctest", "email", "email.message", "email.parser", "email.policy", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http", "http.client", "http.cookiejar", "http.cookies", "http.server",
    "imaplib", "importlib", "importlib.abc", "importlib.metadata", "importlib.resources",
    "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "logging.config", "logging.handlers", "lzma", "mailbox", "math", "mimetypes",
    "modulefinder", "multiprocessing", "multiprocessing.pool", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "py_compile",
    "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib", "rlcompleter",
    "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics",
    "string", "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "token",
    "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing",
    "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "webbrowser", "wsgiref.handlers", "wsgiref.simple_server",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler",
    "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
]

MIN_PARAGRAPH_CHARS = 60
MIN_DOCUMENT_CHARS = 300
ASSET_DIR = Path(__file__).parent
GZIP_ABOVE_BYTES = 1_000_000
HEADING_RULE = re.compile(r"^([*=\-~^])\1{3,}$")


def clean_paragraph(paragraph: str) -> str | None:
    """One paragraph of prose as one line, or None if it is code, a table or a fragment."""
    lines = paragraph.splitlines()
    if any(line[:1].isspace() for line in lines):  # indented: code, tables, nested lists
        return None
    if any(line.startswith((">>>", "...", "$ ", "%", "+-", "|")) for line in lines):
        return None
    text = " ".join(line.strip() for line in lines)
    text = text.encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r":+$", ".", text)  # the code example it introduced is dropped
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if len(text) < MIN_PARAGRAPH_CHARS or letters < 0.85 * len(text) or text[-1] not in ".)":
        return None
    return text


def clean_text(text: str | None) -> list[str]:
    paragraphs = re.split(r"\n\s*\n", text or "")
    return [p for p in map(clean_paragraph, paragraphs) if p]


def reference_documents() -> list[list[str]]:
    """The language-reference topics of ``help()``, one document per section."""
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        lines = topics[name].splitlines()
        section: list[str] = []
        for index, line in enumerate(lines):
            is_title = index + 1 < len(lines) and HEADING_RULE.match(lines[index + 1].strip())
            if is_title and section:
                documents.append(clean_text("\n".join(section)))
                section = []
            if not HEADING_RULE.match(line.strip()):
                section.append(line)
        documents.append(clean_text("\n".join(section)))
    return documents


def public_members(owner) -> list:
    owner_module = getattr(owner, "__name__", None) if inspect.ismodule(owner) else owner.__module__
    members = []
    for name, member in sorted(vars(owner).items()):
        if name.startswith("_") or not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        if getattr(member, "__module__", owner_module) in (owner_module, None):
            members.append(member)
    return members


def module_documents(module) -> list[list[str]]:
    """The module docstring plus module functions as one document, each class as another."""
    head = clean_text(inspect.getdoc(module))
    documents = []
    for member in public_members(module):
        paragraphs = clean_text(inspect.getdoc(member))
        if inspect.isclass(member):
            for method in public_members(member):
                paragraphs += clean_text(method.__doc__ and inspect.cleandoc(method.__doc__))
            documents.append(paragraphs)
        else:
            head += paragraphs
    return [head, *documents]


def library_documents() -> list[list[str]]:
    documents = []
    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        documents += module_documents(module)
    return documents


def build_corpus() -> str:
    seen: set[str] = set()
    documents = []
    for paragraphs in reference_documents() + library_documents():
        unique = [p for p in paragraphs if p not in seen]
        seen.update(unique)
        document = "\n\n".join(unique)
        if len(document) >= MIN_DOCUMENT_CHARS:
            documents.append(document)
    return "\n\n\n".join(documents) + "\n"


def main() -> None:
    text = build_corpus()
    data = text.encode("ascii")
    for stale in ASSET_DIR.glob("embedded.txt*"):
        stale.unlink()
    if len(data) <= GZIP_ABOVE_BYTES:
        out = ASSET_DIR / "embedded.txt"
        out.write_bytes(data)
    else:
        out = ASSET_DIR / "embedded.txt.gz"
        with gzip.GzipFile(out, "wb", mtime=0) as handle:  # mtime=0: byte-identical reruns
            handle.write(data)
    print(f"{out}: {len(text):,} characters, {text.count(chr(10) * 3) + 1} documents")


if __name__ == "__main__":
    main()
