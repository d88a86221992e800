import json
import os

import pytest

from loralab.cli import main
from loralab.config import DataConfig
from loralab.data.prepare import clean_and_deduplicate, prepare_dataset, question_key, split_records
from loralab.util.errors import LoralabError

from helpers.data import QA_ROWS, write_jsonl

OUTPUTS = ("raw_dataset.json", "processed_dataset.json", "train_split.json", "eval_split.json", "test_split.json")


def _prepare(tmp_path, path, **kw):
    cfg = DataConfig(dataset=str(path), out_dir=str(tmp_path / "out"), **kw)
    card = prepare_dataset(cfg)
    processed = json.loads((tmp_path / "out" / "processed_dataset.json").read_text())
    return card, processed


def test_jsonl(tmp_path):
    card, processed = _prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", QA_ROWS))
    assert card["processed_records"] == 40
    assert processed[0]["messages"][0] == {"role": "user", "content": QA_ROWS[0]["question"]}
    assert processed[0]["messages"][1]["role"] == "assistant"
    for name in OUTPUTS:
        assert (tmp_path / "out" / name).is_file()


def test_a_paraphrase_field_is_kept_for_the_recall_test_and_never_trained_on(tmp_path):
    rows = [{"question": f"Question {i}?", "answer": f"Answer {i}", "reworded": f"Asked  another way {i}?"}
            for i in range(12)]
    _, processed = _prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), paraphrase_field="reworded")
    assert all(row["paraphrase"] == f"Asked another way {row['question'][9:-1]}?" for row in processed)  # cleaned
    assert all("another way" not in m["content"] for row in processed for m in row["messages"])
    _, processed = _prepare(tmp_path, write_jsonl(tmp_path / "plain.jsonl", rows))  # no such field: no recall test
    assert not any("paraphrase" in row for row in processed)


def test_json_array_and_field_mapping(tmp_path):
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}"} for i in range(10)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=1))
    card, processed = _prepare(tmp_path, path, question_field="q", answer_field="a")
    assert card["processed_records"] == 10
    assert processed[3]["answer"].startswith("Answer")


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\n" + "".join(f'"Q{i}, with comma?",A{i}\n' for i in range(8)))
    card, processed = _prepare(tmp_path, path)
    assert card["processed_records"] == 8
    assert processed[0]["question"].endswith("with comma?")


def test_alpaca(tmp_path):
    rows = [
        {"instruction": f"Explain item {i}", "input": "briefly" if i % 2 else "", "output": f"Item {i} explained"}
        for i in range(6)
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    _, processed = _prepare(tmp_path, path)
    with_input = next(p for p in processed if "briefly" in p["question"])
    assert with_input["question"].startswith("Explain item") and with_input["question"].endswith("briefly")


def test_sharegpt_multi_turn(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": f"Hi {i}"},
                {"from": "gpt", "value": f"Hello {i}"},
                {"from": "human", "value": "Again?"},
                {"from": "gpt", "value": "Yes."},
            ]
        }
        for i in range(5)
    ]
    path = write_jsonl(tmp_path / "sg.jsonl", rows)
    _, processed = _prepare(tmp_path, path)
    roles = [m["role"] for m in processed[0]["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, r"missing\.jsonl: file not found"),
        ("bad.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n', r"bad\.jsonl:2: malformed JSON"),
        ("bad.json", '[\n  {"question": "a",\n   "answer": "b"},\n  {"question": }\n]', r"bad\.json:4: malformed JSON"),
        ("nofield.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c"}\n', r"nofield\.jsonl:2: missing answer field"),
        ("noq.jsonl", '{"answer": "b"}\n', r"noq\.jsonl:1: missing question field"),
        (
            "nofield.json",
            '[\n  {"question": "a", "answer": "b"},\n\n  {"question": "c"}\n]',
            r"nofield\.json:4: missing answer field",
        ),
        (
            "empty_answer.jsonl",
            '{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": "  "}\n',
            r"empty_answer\.jsonl:3: empty answer",
        ),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: no usable rows"),
        ("empty_array.json", "[]", r"empty_array\.json: no usable rows"),
        ("row.csv", "question,answer\nq1,a1\nq2,\n", r"row\.csv:3: empty answer"),
        ("notobj.jsonl", '["a", "b"]\n', r"notobj\.jsonl:1: expected an object"),
        (
            "sg.jsonl",
            '{"conversations": [{"from": "human", "value": "hi"}]}\n',
            r"sg\.jsonl:1: conversation has no assistant turn",
        ),
        ("nouser.jsonl", '{"conversations": [{"from": "gpt", "value": "hi"}]}\n',
         r"nouser\.jsonl:1: conversation has no user turn"),
        ("typed.jsonl", '{"question": 5, "answer": ["x"]}\n',
         r"typed\.jsonl:1: answer \(field 'answer'\) is a list, expected text"),
        ("typedq.jsonl", '{"question": {"q": 1}, "answer": "x"}\n',
         r"typedq\.jsonl:1: question \(field 'question'\) is an object"),
        ("typedsg.jsonl", '{"conversations": [{"from": "human", "value": true}, {"from": "gpt", "value": "x"}]}\n',
         r"typedsg\.jsonl:1: content of turn 0 \(human\) is a boolean, expected text"),
        ("typedalpaca.json", '[{"instruction": "do", "input": ["a"], "output": "x"}]', r"typedalpaca\.json:1: input is a list"),
        ("typedpara.jsonl", '{"question": "q", "answer": "x", "paraphrase": ["q2"]}\n',
         r"typedpara\.jsonl:1: paraphrase \(field 'paraphrase'\) is a list, expected text"),
        ("two.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n',
         r"two\.jsonl: the (eval|test) split would be empty: 2 usable rows with 2 distinct questions; a split needs at least 3"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(LoralabError, match=message):
        prepare_dataset(DataConfig(dataset=str(path), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(LoralabError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        prepare_dataset(DataConfig(dataset=str(path), out_dir=str(tmp_path / "out")))


def test_cli_bad_input_exits_nonzero_and_keeps_existing_outputs(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", QA_ROWS)
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", str(good), "--out-dir", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{oops}\n')
    capsys.readouterr()
    assert main(["prepare", "--dataset", str(bad), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:2: malformed JSON" in err and len(err.splitlines()) == 1
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary files left behind


def test_skip_invalid_drops_bad_rows_only(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": ""}\n{"question": "q3", "answer": "a3"}\n')
    card, _ = _prepare(tmp_path, path, skip_invalid=True, eval_fraction=0.0, test_fraction=0.0)
    assert card["processed_records"] == 2
    assert "mixed.jsonl:2: empty answer" in capsys.readouterr().err


def test_cleaning_dedup_and_conflicts():
    def rec(q, a):
        return {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "task": "t",
            "source": "s",
            "license": "l",
            "id": q,
        }

    records = [
        rec("What is  X?", "x"),
        rec("what is x?", "x"),
        rec("What is Y?", "y1"),
        rec("What is Y", "y2"),
        rec("Z?\r\n\n\n\nmore", " z\u0007 "),
    ]
    kept, stats = clean_and_deduplicate(records)
    assert [r["messages"][0]["content"] for r in kept] == ["What is X?", "Z?\n\nmore"]
    assert kept[1]["messages"][1]["content"] == "z"
    assert stats == {"dropped_conflicting_answers": 2, "dropped_duplicates": 1, "dropped_empty_after_cleaning": 0}


def test_splits_are_group_disjoint_stratified_and_seeded():
    records = [
        {"id": i, "task": f"t{i % 3}", "group": f"g{i // 2}", "messages": [{"role": "user", "content": f"q{i}"}]}
        for i in range(300)
    ]
    splits = split_records(records, 0.1, 0.1, seed=1)
    groups = {name: {r["group"] for r in rows} for name, rows in splits.items()}
    assert (
        not (groups["train"] & groups["eval"])
        and not (groups["train"] & groups["test"])
        and not (groups["eval"] & groups["test"])
    )
    assert sum(len(v) for v in splits.values()) == 300
    assert {r["task"] for r in splits["test"]} == {"t0", "t1", "t2"}
    again = split_records(records, 0.1, 0.1, seed=1)
    assert [r["id"] for r in again["test"]] == [r["id"] for r in splits["test"]]
    other = split_records(records, 0.1, 0.1, seed=2)
    assert [r["id"] for r in other["test"]] != [r["id"] for r in splits["test"]]


def test_user_dataset_questions_never_cross_splits(tmp_path):
    _prepare(tmp_path, write_jsonl(tmp_path / "d.jsonl", QA_ROWS * 2))  # every row twice
    seen = {}
    for split in ("train", "eval", "test"):
        for row in json.loads((tmp_path / "out" / f"{split}_split.json").read_text()):
            key = question_key(row)
            assert seen.setdefault(key, split) == split
