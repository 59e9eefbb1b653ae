"""Rebuild data/sample/austen.jsonl.gz from Debian's r-cran-janeaustenr package (see SOURCE.md).

The novels sit in the package's lazy-load database (data/Rdata.rdx + Rdata.rdb) as R character
vectors, one element per line. R is not needed: the few R serialization types involved are read
here. Each chapter becomes one JSONL document; the output is byte-reproducible (gzip mtime 0).

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb /tmp/jar
    python data/sample/make_sample.py /tmp/jar/usr/lib/R/site-library/janeaustenr/data
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import sys
import zlib
from pathlib import Path

TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
CHAPTER = re.compile(r"^chapter\s+([0-9]+|[ivxlc]+)\b", re.IGNORECASE)


class _RReader:
    """Minimal reader of R's XDR serialization (format 2/3): vectors, strings, pairlists, symbols."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.b, self.p, self.refs = data, 2, []
        version = self.int()
        self.p += 8  # writer R version, minimal reader version
        if version == 3:
            n = self.int()  # length of the native encoding name, skipped
            self.p += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def obj(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NULL
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol
            self.refs.append(self.obj())
            return self.refs[-1]
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            self.p += n
            return self.b[self.p - n : self.p].decode("utf-8")
        if kind == 2:  # pairlist -> dict
            out = {}
            while kind == 2:
                if has_attr:
                    self.obj()
                tag = self.obj() if has_tag else len(out)
                out[tag] = self.obj()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            return out
        n = self.int()
        if kind in (16, 19):  # character vector, list
            value = [self.obj() for _ in range(n)]
        elif kind in (10, 13):  # logical, integer
            value = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif kind == 14:  # double
            value = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        else:
            raise ValueError(f"R type {kind} not supported")
        if has_attr:
            names = self.obj().get("names")
            if names is not None:
                value = dict(zip(names, value))
        return value


def read_lazyload_db(data_dir: Path) -> dict[str, list[str]]:
    """The objects of an R lazy-load database: the .rdx index (gzip) points into the .rdb (zlib blobs)."""
    index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).obj()
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        out[name] = _RReader(zlib.decompress(blob[4:])).obj()
    return out


def chapters(lines: list[str]) -> list[str]:
    """Split a novel at its chapter headings; front matter stays with the first chapter."""
    starts = [i for i, line in enumerate(lines) if CHAPTER.match(line.strip())]
    bounds = [0, *starts[1:], len(lines)]
    return ["\n".join(lines[a:b]).strip() + "\n" for a, b in zip(bounds, bounds[1:])]


def main(data_dir: str, out: str = str(Path(__file__).with_name("austen.jsonl.gz"))) -> None:
    novels = read_lazyload_db(Path(data_dir))
    n = 0
    with (
        open(out, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as f,
    ):
        for key, title in TITLES.items():
            lines = [line or "" for line in novels[key]]
            for i, text in enumerate(chapters(lines), 1):
                f.write(
                    json.dumps({"title": title, "chapter": i, "text": text}, ensure_ascii=False).encode()
                    + b"\n"
                )
                n += 1
    print(f"wrote {n} chapters of {len(TITLES)} novels to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
