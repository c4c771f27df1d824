"""Reading a downstream task's delimited text files row by row (GLUE's TSVs, a task's .csv or .tsv), with every
row that cannot be read whole set aside with its line and why, never read into shifted columns.

Python's csv module, not pandas (datasets' csv builder): pandas fills a row with too few fields with missing
values and cannot say which rows were short. GLUE's TSVs and a task's .tsv are read with quoting off
(``csv.QUOTE_NONE``), as GLUE's own readers do: a quote character is text (QQP's, MNLI's and SST-2's sentences hold
unbalanced ones). A .csv is read with CSV's quoting (RFC 4180), strictly: a stray quote is an error naming its line,
not the rows after it swallowed into one field. What happens to the rows set aside is pipeline/evaluate/loaders.py's.
"""

from __future__ import annotations

import csv
import io
import math

from pipeline import storage


def records(path: str, *, delimiter: str, quoting: int, task: str):
    """(line, fields) of each record of a delimited text file, local or s3://, blank lines left out; ``line`` is
    the record's first line, from 1. ``quoting``: ``csv.QUOTE_NONE`` (GLUE's TSVs, a task's .tsv) or
    ``csv.QUOTE_MINIMAL`` (a .csv, read strictly). A file that is not UTF-8, or under CSV quoting a stray quote, is
    a ValueError naming the task, the file and the line."""
    with storage.open_input(path) as raw:
        # utf-8-sig: MRPC's files start with a byte-order mark (GLUE's script copies msr_paraphrase_*.txt's header)
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), delimiter=delimiter,
                            quoting=quoting, strict=True)
        line = 1
        try:
            for fields in reader:
                if fields:
                    yield line, fields
                line = reader.line_num + 1
        except csv.Error as e:  # CSV quoting only: a stray quote, or one that swallows the lines after it
            fix = ("a quote inside a CSV field must be doubled (\"\") and the field quoted, as CSV writers do; or save "
                   "the file as .tsv, read with quoting off") if quoting != csv.QUOTE_NONE else "fix that line"
            raise ValueError(f"task {task}: {path} line {line}: {e}: {fix}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"task {task}: {path} is not UTF-8 text (near line {line}: {e.reason}): save it as "
                             "UTF-8") from None


def columns(rows, index: dict[str, int], width: int, what: str, *,
            required: tuple[str, ...]) -> tuple[dict[str, list[str]], list[str]]:
    """The cells of (line, fields) records by ``index`` (field name: position), and the records set aside, one
    description each ("line 4: 7 fields, the header has 6"): a record of another ``width`` (``what``: "the header
    has"), or one with an empty cell in a ``required`` field. A record of the wrong width is never read into
    shifted columns."""
    values = {f: [] for f in index}
    bad = []
    for line, fields in rows:
        if len(fields) != width:
            bad.append(f"line {line}: {len(fields)} field{'s' * (len(fields) != 1)}, {what} {width}")
        elif empty := [f for f in required if not fields[index[f]]]:
            bad.append(f"line {line}: no {empty[0]}")
        else:
            for f in values:
                values[f].append(fields[index[f]])
    return values, bad


def number_or_text(value: str):
    """A label cell typed as pandas types a numeric column: "1" → 1, "1.0" → 1 (a class id written as a float),
    "0.5" → 0.5; other text ("pos", and "nan" or "inf", which pandas would make numbers) stays text."""
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):
        return value
    return int(number) if number.is_integer() else number
