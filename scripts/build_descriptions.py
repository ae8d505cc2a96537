"""Build a CoPrompt class-description file (``TRAINER.CoPrompt.DESCRIPTIONS_FILE``) from plain text.

Input: UTF-8 text, one description per line as ``classname: sentence``; a class may (and usually does) have several
lines. Blank lines and lines starting with ``#`` are skipped. The class name is everything before the first ``:``
(raw split-file names such as ``golden_retriever`` or spaced names both work), the sentence everything after it;
both are stripped and must be non-empty. Example::

    # digits
    zero: a handwritten digit zero, a closed oval loop.
    zero: the number 0 written as a round ring.
    one: a handwritten digit one, a single vertical stroke.

Output: a JSON object ``{classname: [sentence, ...]}`` (upstream CoPrompt's ``gpt_file/<dataset>_prompt.json``
format), classes in first-seen order, duplicate sentences of a class dropped, written atomically. With
``--classes`` every listed class must have at least one sentence.

Usage: ``python scripts/build_descriptions.py descriptions.txt -o descriptions.json [--classes zero one ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vltune.fileio import atomic_write  # noqa: E402


def parse_descriptions(text: str, source: str = "<input>") -> dict[str, list[str]]:
    """``{classname: [sentence, ...]}`` from ``classname: sentence`` lines; ``ValueError`` names the bad line."""
    out: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, sentence = line.partition(":")
        name, sentence = name.strip(), sentence.strip()
        if not sep or not name or not sentence:
            raise ValueError(f"{source}:{number}: expected 'classname: sentence', got {line!r}")
        sentences = out.setdefault(name, [])
        if sentence not in sentences:
            sentences.append(sentence)
    if not out:
        raise ValueError(f"{source}: no 'classname: sentence' lines found")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="text file with 'classname: sentence' lines")
    parser.add_argument("-o", "--output", required=True, help="JSON file to write ({classname: [sentence, ...]})")
    parser.add_argument("--classes", nargs="*", default=None, help="class names that must all be present")
    args = parser.parse_args(argv)
    with open(args.input, encoding="utf-8") as f:
        try:
            data = parse_descriptions(f.read(), args.input)
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
    missing = [c for c in args.classes or [] if c not in data and c.replace("_", " ") not in data]
    if missing:
        parser.exit(2, f"error: {args.input} has no sentences for class(es) {missing}\n")
    atomic_write(args.output, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"wrote {sum(map(len, data.values()))} descriptions for {len(data)} classes to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
