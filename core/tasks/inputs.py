"""Task inputs: one Item per input, read lazily from lines, .txt, .jsonl or .csv files, and cut into batches.

UI-free: warnings go to a callback, errors are typed (errors.py). Reading is lazy so that a reader that
stops early (`| head -1`) does not wait for the whole input. Torch-free, so `llm run` and `llm embed` check
their task and input before a model (and torch) is loaded.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_torch.core.errors import InputError

TASKS = ("text-generation", "text-classification", "token-classification", "question-answering")

Warn = Callable[[str], None]


def no_warn(message: str) -> None:
    pass


@dataclass(frozen=True)
class Item:
    """One input: `text` (the context for question answering) and, for QA, its question."""

    text: str
    question: str | None = None
    where: str = ""  # "line 3", for messages
    id: Any = None  # a .jsonl/.csv record's "id" field, echoed by feature extraction instead of the text


def text_lines(lines: Iterable[str], *, first_line: int = 1, warn: Warn = no_warn) -> Iterator[Item]:
    """`--lines`: each line one input; blank lines are skipped with a warning (they carry no input)."""
    for n, line in enumerate(lines, first_line):
        text = line.rstrip("\r\n")
        if not text.strip():
            warn(f"line {n} is empty; skipped")
            continue
        yield Item(text, where=f"line {n}")


def _from_record(record: Any, column: str | None, question: str | None, where: str) -> Item:
    if isinstance(record, str):
        return Item(record, question, where)
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    return _item_of(record, column, question, where)


def _item_of(record: dict, column: str | None, question: str | None, where: str) -> Item:
    q = record.get("question", question)
    # QA records name their text "context"; everything else "text" unless --column says otherwise.
    key = column or ("context" if "context" in record else "text")
    if key not in record:
        raise InputError(f"{where}: no field '{key}'", hint=f"fields: {', '.join(record) or 'none'}; pick one with --column")
    value = record[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' is not a string")
    return Item(value, None if q is None else str(q), where, record.get("id"))


def jsonl_items(lines: Iterable[str], *, column: str | None, question: str | None, name: str, warn: Warn = no_warn) -> Iterator[Item]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            warn(f"{name}: line {n} is empty; skipped")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # Results for earlier lines are already out; naming the line lets the user fix and resume.
            raise InputError(f"{name}: line {n} is not valid JSON: {e.msg} (column {e.colno})") from None
        yield _from_record(record, column, question, f"{name}: line {n}")


def csv_items(lines: Iterable[str], *, column: str | None, question: str | None, name: str) -> Iterator[Item]:
    reader = csv.DictReader(lines)
    try:
        for row in reader:
            yield _from_record(dict(row), column, question, f"{name}: row {reader.line_num}")
    except csv.Error as e:
        raise InputError(f"{name}: line {reader.line_num} is not valid CSV: {e}") from None


def file_items(path: Path, *, column: str | None, question: str | None, warn: Warn = no_warn) -> Iterator[Item]:
    """`--input FILE`: .txt (one input per line), .jsonl, or .csv (`column` picks the field)."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise InputError(f"cannot read '{path.name}': unknown input format", hint="use a .txt, .jsonl or .csv file")
    try:
        f = path.open(encoding="utf-8", newline="" if suffix == ".csv" else None)
    except OSError as e:
        raise InputError(f"cannot open {path}: {e.strerror or e}") from None
    with f:
        try:
            if suffix == ".txt":
                for item in text_lines(f, warn=warn):
                    yield Item(item.text, question, f"{path.name}: {item.where}")
            elif suffix == ".jsonl":
                yield from jsonl_items(f, column=column, question=question, name=path.name, warn=warn)
            else:
                yield from csv_items(f, column=column, question=question, name=path.name)
        except UnicodeDecodeError:
            raise InputError(f"{path} is not valid UTF-8", hint="convert it to UTF-8, e.g. with iconv") from None


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_file_items(path: Path) -> int | None:
    """How many inputs `--input FILE` holds, read quickly without the model (a progress total); None when
    the file cannot be read (file_items reports why)."""
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8", newline="" if suffix == ".csv" else None) as f:
            if suffix == ".csv":
                return sum(1 for _ in csv.DictReader(f))
            return sum(1 for line in f if line.strip())
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
