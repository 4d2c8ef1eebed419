"""Build the English training corpus for the default model from the Python documentation.

Source: the reStructuredText sources of the Python 3.11 documentation, shipped by the
Debian bookworm package ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources``).
The package is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``, so no
root and no network beyond the Debian mirror are needed.

License: the Python documentation is distributed under the Python Software Foundation
License Version 2 (see ``/usr/share/doc/python3.11-doc/copyright`` in the package and
https://docs.python.org/3/license.html). Derived text may be redistributed under the
same license, with the PSF copyright notice; the held-out sample committed to this
repository (``tests/fixtures/corpus/heldout.txt``) carries that notice in its header.

Cleaning keeps English prose only: reST directives, comments, literal (code) blocks,
tables and heading underlines are dropped, inline markup (``:role:`x` ``, ````x````,
`` `t <url>`_ ``, ``*x*``) is reduced to its text, and each paragraph becomes one line.
Paragraphs that are mostly not words (option lists, signatures) are dropped. Documents
are split, not paragraphs: whole files go to the held-out set in a fixed hash order until
``--heldout-fraction`` of the characters is reached, so the split is reproducible and no
held-out paragraph has a near-copy in training.

    python scripts/prepare_corpus.py --out .cache/corpus
    # -> .cache/corpus/{train.txt, heldout.txt, SOURCE.md}
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile

logger = logging.getLogger("prepare_corpus")

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
COPYRIGHT = "usr/share/doc/python3.11-doc/copyright"
# a changelog of issue numbers, and the license texts themselves, are not prose to learn from
SKIP_FILES = ("whatsnew/changelog.rst.txt", "license.rst.txt", "copyright.rst.txt")

HEADER = ("# Derived from the Python 3.11 documentation (Debian package {pkg}).\n"
          "# Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.\n"
          "# Licensed under the PSF License Version 2; see scripts/prepare_corpus.py.\n")

_UNDERLINE = re.compile(r"^([=\-~^*+#\"'`.:_])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>`]*>`_{1,2}")
_REF = re.compile(r"`([^`]+)`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``")
_INTERP = re.compile(r"`([^`]+)`")
_EMPH = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_WORD = re.compile(r"[A-Za-z]{2,}")


def _inline(text: str) -> str:
    def role(m):
        inner = m.group(1).lstrip("!~")
        target = re.match(r"(.*?)\s*<[^>]*>$", inner)
        return target.group(1) if target else inner
    text = _ROLE.sub(role, text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _INTERP.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("|", "")
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(par: str) -> bool:
    words = par.split()
    if len(words) < 6:
        return False
    letters = sum(len(w) for w in _WORD.findall(par))
    return letters >= 0.6 * len(par) and par[0].isupper() and par[-1] in ".:?!)"


def clean_rst(text: str) -> list:
    """reST source -> list of prose paragraphs, one line each."""
    out, para = [], []
    skip_indent = None  # inside a directive/comment/literal block: skip lines indented deeper than this
    literal_next = False

    def flush():
        nonlocal literal_next
        if para:
            joined = " ".join(para)
            literal_next = joined.endswith("::")
            if literal_next:  # "For example::" introduces a code block; the prose keeps one colon
                joined = joined.rstrip(":").rstrip() + ":"
            cleaned = _inline(joined)
            if _is_prose(cleaned):
                out.append(cleaned)
            para.clear()

    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if not stripped:
            flush()
            continue
        if literal_next and indent > 0:
            skip_indent = indent - 1
            literal_next = False
            continue
        literal_next = False
        if stripped.startswith(".. ") or stripped == "..":
            flush()
            skip_indent = indent
            continue
        if _UNDERLINE.match(stripped) or stripped.startswith(("+-", "+=", "| ", ">>>", "...")):
            flush()
            continue
        para.append(stripped)
    flush()
    return out


def fetch_sources(workdir: str) -> str:
    """apt-get download + dpkg-deb -x; returns the unpack root."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    debs = glob.glob(os.path.join(workdir, f"{PACKAGE}_*.deb"))
    if not debs:
        raise FileNotFoundError(f"apt-get download {PACKAGE} produced no .deb in {workdir}")
    root = os.path.join(workdir, "root")
    subprocess.run(["dpkg-deb", "-x", debs[0], root], check=True)
    return root


def build(root: str, heldout_fraction: float):
    src = os.path.join(root, SOURCES)
    files = sorted(os.path.relpath(p, src) for p in glob.glob(os.path.join(src, "**", "*.rst.txt"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.rst.txt under {src}")
    docs = {}
    for rel in files:
        if rel in SKIP_FILES:
            continue
        with open(os.path.join(src, rel), encoding="utf-8") as f:
            paras = clean_rst(f.read())
        if paras:
            docs[rel] = paras
    total = sum(len(p) + 1 for paras in docs.values() for p in paras)
    order = sorted(docs, key=lambda rel: hashlib.sha1(rel.encode()).hexdigest())
    heldout, size = [], 0
    for rel in order:
        if size >= heldout_fraction * total:
            break
        heldout.append(rel)
        size += sum(len(p) + 1 for p in docs[rel])
    held = set(heldout)
    train = [p for rel in sorted(docs) if rel not in held for p in docs[rel]]
    test = [p for rel in sorted(held) for p in docs[rel]]
    return train, test, sorted(held)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".cache/corpus", help="output folder")
    ap.add_argument("--heldout-fraction", type=float, default=0.02)
    ap.add_argument("--sample-out", default=None,
                    help="also write the held-out text (with the license header) here, e.g. "
                         "tests/fixtures/corpus/heldout.txt")
    ap.add_argument("--unpacked", default=None, help="an already unpacked python3.11-doc root (skips apt-get)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0.01 <= args.heldout_fraction <= 0.05:
        raise SystemExit("--heldout-fraction must be within [0.01, 0.05]")
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="corpus_")
    os.chmod(tmp, 0o755)  # apt-get download runs as the _apt user when it can write there
    try:
        root = args.unpacked or fetch_sources(tmp)
        train, test, held = build(root, args.heldout_fraction)
        header = HEADER.format(pkg=PACKAGE)
        for name, paras in (("train.txt", train), ("heldout.txt", test)):
            with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
                f.write(header)
                f.write("\n".join(paras) + "\n")
        if args.sample_out:
            os.makedirs(os.path.dirname(os.path.abspath(args.sample_out)), exist_ok=True)
            shutil.copyfile(os.path.join(args.out, "heldout.txt"), args.sample_out)
        with open(os.path.join(args.out, "SOURCE.md"), "w", encoding="utf-8") as f:
            f.write(f"Source: Debian package {PACKAGE}, {SOURCES}\n"
                    f"License: PSF License Version 2 (copyright file: {COPYRIGHT})\n"
                    f"Held-out documents ({len(held)}):\n" + "".join(f"- {h}\n" for h in held))
        n_train = sum(len(p) for p in train)
        n_test = sum(len(p) for p in test)
        logger.info("train: %d paragraphs, %d chars; held out: %d documents, %d paragraphs, %d chars (%.1f%%)",
                    len(train), n_train, len(held), len(test), n_test, 100 * n_test / (n_train + n_test))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
