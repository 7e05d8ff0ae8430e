"""``streamloader filter``: select rows of a LAION-style labels.tsv by caption keywords, regex and score."""
from __future__ import annotations

import argparse
import math
import re
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional

from streamloader.commands._remote import UsageError, add_remote_arguments, int_at_least, is_remote, remote_argument

if TYPE_CHECKING:
    from streamloader.data.filters import LabelFilter

EPILOG = """\
output:
  with --out FILE  the matching rows are written to FILE in the same 4-column TSV format (caption tabs kept)
                   and the summary line is printed to stdout;
  without --out    the matching file names are printed to stdout, one per line, and the summary line goes to
                   stderr (so `streamloader filter labels.tsv -k squirrel > files.txt` gives a clean list,
                   which `streamloader prefetch --base dagshub://owner/repo/data files.txt` downloads).

examples:
  streamloader filter data/labels.tsv --keyword squirrel
      115 of 540,000 rows matched (0 malformed skipped)
  streamloader filter dagshub://owner/repo/data/labels.tsv -k squirrel -k cat --all --min-score 7 -o subset.tsv
  streamloader filter https://dagshub.com/owner/repo/data/labels.tsv -k squirrel \
      | streamloader prefetch --base https://dagshub.com/owner/repo/data -
  streamloader filter labels.tsv --regex 'red (fox|squirrel)' --sample 0.1 --seed 1 --on-error warn

Keywords match like the DagsHub guide's `'squirrel' in caption.lower()` (so "squirrel" also matches
"Squirrels"); --whole-word requires word boundaries. Exit codes: 0 ok, 1 runtime error (e.g. a malformed row with
--on-error raise), 2 bad usage."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction with 0 < F <= 1, got {text}")
    return value


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("must be a number, not nan")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None
    return text


def _keyword(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("keywords cannot be empty")
    return text


def register(subparsers: Any) -> None:
    """Add the ``filter`` sub-command."""
    parser = subparsers.add_parser(
        "filter",
        help="select rows of a labels.tsv by caption keywords, regex or score",
        description="Select rows of a LAION-Aesthetics style labels.tsv (a local path, a repo URL "
        "dagshub://owner/repo/data/labels.tsv or https://HOST/owner/repo/data/labels.tsv, or any fsspec URL) by "
        "caption keywords, regex and aesthetic score. All given conditions must hold.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("labels", metavar="LABELS", help="labels.tsv path or URL")
    add_remote_arguments(parser)
    parser.add_argument(
        "-k", "--keyword", action="append", default=[], type=_keyword,
        help="caption must contain this (case-insensitive substring); repeat for several (any of them matches)",
    )
    parser.add_argument("--all", dest="match_all", action="store_true", help="require ALL keywords instead of any")
    parser.add_argument(
        "--exclude", action="append", default=[], type=_keyword, metavar="KEYWORD",
        help="drop rows whose caption contains this; repeatable",
    )
    parser.add_argument("--whole-word", action="store_true", help="keywords and exclusions match whole words only")
    parser.add_argument("--regex", type=_regex, help="caption must match this Python regex (case-insensitive)")
    parser.add_argument("--min-score", type=_score, metavar="S", help="keep rows with score >= S")
    parser.add_argument("--max-score", type=_score, metavar="S", help="keep rows with score <= S")
    parser.add_argument("--limit", type=int_at_least(0), metavar="N", help="stop after N kept rows")
    parser.add_argument(
        "--sample", type=_fraction, metavar="F", help="keep a deterministic fraction F (0 < F <= 1) of the matches"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    parser.add_argument(
        "--on-error", choices=("raise", "skip", "warn"), default="raise",
        help="malformed rows: stop with an error (default), skip and count, or skip, count and log them",
    )
    parser.add_argument("-o", "--out", metavar="FILE", help="write the kept rows here as TSV (see 'output' below)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Filter, write or print the kept rows, print the summary line."""
    from streamloader.data.filters import filter_labels
    from streamloader.data.labels import write_labels

    label_filter = _label_filter(args)
    labels, opts = remote_argument(args.labels, args) if is_remote(args.labels) else (args.labels, None)
    _refuse_binary(labels, opts)
    result = filter_labels(labels, label_filter=label_filter, on_error=args.on_error, storage_options=opts)
    summary = result.summary()
    if args.sample is not None:
        summary += f"; kept {len(result.rows):,} (sample {args.sample:g}, seed {args.seed})"
    if result.stopped_early:
        summary += f"; stopped at --limit {args.limit:,}"
    if args.out:
        written = write_labels(result.rows, args.out)
        print(summary)
        print(f"wrote {written:,} rows to {args.out}")
    else:
        for row in result.rows:
            print(row.file)
        print(summary, file=sys.stderr)
    return 0


def _label_filter(args: argparse.Namespace) -> "LabelFilter":
    """The LabelFilter the flags describe; a value it refuses (e.g. --min-score above --max-score) is a
    UsageError naming the flags."""
    from streamloader.data.filters import LabelFilter  # noqa: F811 - imported here, not at CLI start-up

    try:
        return LabelFilter(
            args.keyword or None, match="all" if args.match_all else "any", exclude=args.exclude or None,
            whole_word=args.whole_word, regex=args.regex, min_score=args.min_score, max_score=args.max_score,
            limit=args.limit, sample=args.sample, seed=args.seed,
        )
    except ValueError as exc:
        message = str(exc)
        for field_name, flag in _FLAGS.items():
            message = message.replace(field_name, flag)
        raise UsageError(message) from None


# LabelFilter field -> the flag that sets it (for its error messages)
_FLAGS = {"min_score": "--min-score", "max_score": "--max-score", "exclude keywords": "--exclude values",
          "keywords": "--keyword values"}


def _refuse_binary(labels: str, opts: Optional[Dict[str, Any]]) -> None:
    """DataFormatError (one short line) when the file starts with bytes no labels.tsv has (NUL, not UTF-8)."""
    from streamloader.errors import DataFormatError

    if "://" in labels:
        import fsspec

        with fsspec.open(labels, "rb", **(opts or {})) as f:
            head = f.read(8192)
    else:
        with open(labels, "rb") as f:
            head = f.read(8192)
    problem = None
    nul = head.find(b"\x00")
    first_line_end = head.find(b"\n")
    controls = sum(head.count(bytes([c])) for c in range(32) if c not in (9, 10, 13))
    # one odd row is a malformed row (the --on-error policy's business); a file that is not text is refused
    if nul >= 0 and (first_line_end < 0 or nul < first_line_end or controls > len(head) // 10):
        problem = f"a NUL byte at offset {nul}"
    else:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 3:  # not merely a character cut in two by the 8 KB read
                problem = f"bytes that are not UTF-8 at offset {exc.start}"
    if problem:
        raise DataFormatError(f"{labels} is not a labels.tsv: binary data ({problem})")
