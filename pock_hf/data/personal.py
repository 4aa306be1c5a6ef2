"""The project's own demo data: on-device personalisation of an assistant to a (fictional) user's facts.

A profile (a JSON file: `load_profile`; three ship in `profiles/`, or bring your own) lists facts about the user, each
with several question phrasings. Every shipped fact is invented and deliberately unguessable (a base model cannot
answer "what is my dog called?" with "Biscotti"), so recall on held-out question phrasings measures what fine-tuning
taught, not what the model knew. General-knowledge questions the base model already answers check that the tuning
did not break it (retention). Everything is generated from the profile with a seeded shuffle: the same seed gives the
same files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .instructions import DataFormatError


class Fact(NamedTuple):
    """One fact about the user: an id, the key word(s) a correct reply contains, the answer sentence, and questions."""

    key: str
    answer: str
    statement: str
    questions: tuple[str, ...]


PROFILE_FORMAT = "pock_hf personal profile"
PROFILE_VERSION = 1
PROFILES_DIR = Path(__file__).with_name("profiles")
DEFAULT_PROFILE = "marisol"


@dataclass(frozen=True)
class Profile:
    """A user's facts, each with several question phrasings (some trained on, the rest held out), read from a
    profile file (see `load_profile`); `source` is the file it came from."""

    name: str
    facts: tuple[Fact, ...]
    source: str = ""


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped with pock_hf (`personal:<name>` in a recipe)."""
    return sorted(path.stem for path in PROFILES_DIR.glob("*.json"))


def load_profile(profile: str | os.PathLike | None = None) -> Profile:
    """A profile by built-in name (None: the default, `marisol`) or from a JSON file of this shape:

        {"format": "pock_hf personal profile", "version": 1, "name": "...",
         "facts": [{"key": "dog", "answer": "Biscotti", "statement": "Your dog is called Biscotti.",
                    "questions": ["What is my dog's name?", "What did I name my dog?", ...]}, ...]}

    Each fact needs a unique `key`, an `answer` (what a correct reply contains, case-insensitively) that appears in
    its `statement` (the reply trained on), and at least two distinct `questions`. Other top-level keys
    (`description`) are ignored.

    Raises:
        DataFormatError: naming the file, the fact (0-based) and the field: not JSON, not a profile, a missing or
            mistyped field, a duplicate key, an answer missing from its statement, fewer than two questions.
        ValueError: an unknown built-in name (the message lists the built-in ones).
    """
    name = DEFAULT_PROFILE if profile is None else profile
    path = Path(name)
    if not path.suffix and not path.exists():
        if str(name) not in builtin_profiles():
            raise ValueError(
                f"Unknown built-in profile {str(name)!r}; built-in: {builtin_profiles()} (or a file path)."
            )
        path = PROFILES_DIR / f"{name}.json"
    source = os.fspath(path)
    data = _read_profile_json(path)
    facts, keys = [], set()
    raw_facts = data.get("facts")
    if not isinstance(raw_facts, list) or not raw_facts:
        raise DataFormatError(f"{source}: 'facts' must be a non-empty list of facts.")
    for index, fact in enumerate(raw_facts):
        where = f"{source}, fact {index} (0-based)"
        if not isinstance(fact, dict):
            raise DataFormatError(f"{where}: must be an object with key, answer, statement and questions.")
        for field in ("key", "answer", "statement"):
            if not isinstance(fact.get(field), str) or not fact[field].strip():
                raise DataFormatError(f"{where}: field '{field}' must be a non-empty string.")
        questions = fact.get("questions")
        if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
            raise DataFormatError(f"{where}: field 'questions' must be a list of non-empty strings.")
        if len(set(questions)) < 2:
            raise DataFormatError(
                f"{where}: field 'questions' needs at least two distinct phrasings (one is held out for recall)."
            )
        if fact["key"] in keys:
            raise DataFormatError(f"{where}: key {fact['key']!r} is used by an earlier fact.")
        if fact["answer"].casefold() not in fact["statement"].casefold():
            raise DataFormatError(
                f"{where}: answer {fact['answer']!r} does not appear in the statement {fact['statement']!r}, so the "
                "reply trained on would not count as correct."
            )
        keys.add(fact["key"])
        facts.append(Fact(fact["key"], fact["answer"], fact["statement"], tuple(dict.fromkeys(questions))))
    return Profile(name=str(data.get("name") or path.stem), facts=tuple(facts), source=source)


def is_profile_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a JSON file holding a profile (an object with `"format": "pock_hf personal profile"`)."""
    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == PROFILE_FORMAT


def _read_profile_json(path: Path) -> dict:
    source = os.fspath(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataFormatError(f"Profile file {source!r} does not exist.") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{source}: not UTF-8 text (byte {error.start}).") from None
    except json.JSONDecodeError as error:
        raise DataFormatError(
            f"{source}: not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}."
        ) from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise DataFormatError(f'{source}: not a profile: expected an object with "format": "{PROFILE_FORMAT}".')
    if data.get("version") != PROFILE_VERSION:
        raise DataFormatError(
            f"{source}: profile version {data.get('version')!r} is not supported (this pock_hf reads version "
            f"{PROFILE_VERSION})."
        )
    return data


# General knowledge the base model already has (greedy SmolLM2-135M-Instruct replies contain every `answer`, in bfloat16
# and float32): forty questions, so that retention moves by 2.5 points a question (with ten, one answer lost to a
# greedy token flip read as a 10-point loss); the last thirty were kept of 48 candidates by that check.
GENERAL: tuple[tuple[str, str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris.", "Paris"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Tokyo"),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "Berlin"),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day.", "blue"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.", "Pacific"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "Shakespeare"),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "Mars"),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong was the first person to walk on the Moon.",
        "Armstrong",
    ),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil.", "Portuguese"),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world.", "Everest"),
    ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is London.", "London"),
    ("What is the capital of Russia?", "The capital of Russia is Moscow.", "Moscow"),
    ("What is the capital of China?", "The capital of China is Beijing.", "Beijing"),
    ("What is the capital of Greece?", "The capital of Greece is Athens.", "Athens"),
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin.", "Dublin"),
    ("What is the capital of Sweden?", "The capital of Sweden is Stockholm.", "Stockholm"),
    ("What is the capital of India?", "The capital of India is New Delhi.", "Delhi"),
    ("What is the capital of South Korea?", "The capital of South Korea is Seoul.", "Seoul"),
    ("What is the capital of Austria?", "The capital of Austria is Vienna.", "Vienna"),
    ("What is the capital of Poland?", "The capital of Poland is Warsaw.", "Warsaw"),
    (
        "Which planet is the largest in our solar system?",
        "Jupiter is the largest planet in our solar system.",
        "Jupiter",
    ),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe.", "oxygen"),
    (
        "Who painted the ceiling of the Sistine Chapel?",
        "Michelangelo painted the ceiling of the Sistine Chapel.",
        "Michelangelo",
    ),
    ("Who invented the telephone?", "Alexander Graham Bell invented the telephone.", "Bell"),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin.", "Fleming"),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", "Shakespeare"),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in Egypt.", "Egypt"),
    ("In which city is the Eiffel Tower?", "The Eiffel Tower is in Paris.", "Paris"),
    ("What language is spoken in Germany?", "German is spoken in Germany.", "German"),
    (
        "What is the currency of the United Kingdom?",
        "The currency of the United Kingdom is the pound sterling.",
        "pound",
    ),
    ("What is the currency of the United States?", "The currency of the United States is the US dollar.", "dollar"),
    ("On which continent is Kenya?", "Kenya is in Africa.", "Africa"),
    ("What do you call a young dog?", "A young dog is called a puppy.", "puppy"),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body.", "heart"),
    ("What is the capital of Thailand?", "The capital of Thailand is Bangkok.", "Bangkok"),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", "Nairobi"),
    ("What is the capital of Cuba?", "The capital of Cuba is Havana.", "Havana"),
    ("What is the capital of Peru?", "The capital of Peru is Lima.", "Lima"),
    ("What do plants need from the Sun to grow?", "Plants need sunlight to grow.", "light"),
    ("What is the main gas in the air we breathe?", "Nitrogen is the main gas in the air.", "Nitrogen"),
)


# Everyday prompts, disjoint from GENERAL, whose targets are the base model's own replies (see `replay_rows`): training
# on them alongside the user's facts keeps the model's general behaviour (self-replay), with no outside data.
REPLAY_PROMPTS: tuple[str, ...] = (
    "What is the capital of Italy?",
    "What is the capital of Spain?",
    "What is the capital of Canada?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water at sea level?",
    "How many days are in a week?",
    "What is the largest animal on Earth?",
    "What do bees make?",
    "Which gas do plants take in from the air?",
    "What is the opposite of hot?",
    "Name a primary colour.",
    "What is the chemical symbol for gold?",
    "How many legs does a spider have?",
    "What is the freezing point of water in Celsius?",
    "Who developed the theory of relativity?",
    "What is the main language spoken in Mexico?",
    "What instrument has black and white keys?",
    "Which season comes after winter?",
    "What is the capital of Australia?",
    "How many continents are there?",
)


# Everyday prompts, disjoint from GENERAL and REPLAY_PROMPTS, whose targets are the base model's own replies: the
# planner measures each unit's damage as the loss increase on them (never trained on, never scored for retention).
PROBE_PROMPTS: tuple[str, ...] = (
    "What is the capital of Egypt?",
    "How many hours are in a day?",
    "What do cows drink?",
    "Which planet is closest to the Sun?",
    "What is two plus two?",
    "Who wrote Pride and Prejudice?",
    "What colour are bananas when they are ripe?",
    "What is the largest desert in the world?",
    "How many sides does a triangle have?",
    "What do you call a baby cat?",
    "Which ocean lies between Europe and America?",
    "What is the main ingredient of bread?",
    "How many minutes are in an hour?",
    "What is the capital of Norway?",
    "Which animal is known as the king of the jungle?",
    "What is H2O commonly called?",
    "Give me a word that rhymes with cat.",
    "What is the currency of Japan?",
    "What do caterpillars turn into?",
    "Name a fruit that is red.",
)


@dataclass
class PersonalDataset:
    """Alpaca rows (`instruction`, `input`="", `output`) for training, held-out recall, and general retention.

    `heldout` and `general` rows also carry `answer`, the key word(s) a correct reply contains (see `fact_recall`);
    `train` and `heldout` rows carry `fact`, the id of the fact they ask about.
    """

    train: list[dict]
    heldout: list[dict]
    general: list[dict]


def make_personal_dataset(
    seed: int = 0, heldout_per_fact: int = 1, profile: Profile | str | os.PathLike | None = None
) -> PersonalDataset:
    """Split each fact's question phrasings into `heldout_per_fact` held-out ones and the rest for training.

    `profile` is a `Profile`, a built-in profile name or a profile file (default: the built-in `marisol`). `seed`
    picks which phrasings are held out and the order of the training rows; the same seed gives the same data.

    Raises:
        ValueError: `heldout_per_fact` would leave some fact with no held-out or no training phrasing; a bad profile
            (see `load_profile`).
    """
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    fewest = min(len(fact.questions) for fact in profile.facts)
    if not 1 <= heldout_per_fact < fewest:
        raise ValueError(f"heldout_per_fact must be between 1 and {fewest - 1}, got {heldout_per_fact}")
    rng = random.Random(seed)
    train, heldout = [], []
    for fact in profile.facts:
        questions = list(fact.questions)
        rng.shuffle(questions)
        row = {"input": "", "output": fact.statement, "fact": fact.key}
        heldout += [{"instruction": q, **row, "answer": fact.answer} for q in questions[:heldout_per_fact]]
        train += [{"instruction": q, **row} for q in questions[heldout_per_fact:]]
    rng.shuffle(train)  # facts interleaved, as a user's data would be
    general = [{"instruction": q, "input": "", "output": output, "answer": answer} for q, output, answer in GENERAL]
    return PersonalDataset(train=train, heldout=heldout, general=general)


def replay_rows(replies: Sequence[str], prompts: Sequence[str] = REPLAY_PROMPTS) -> list[dict]:
    """Alpaca rows pairing each prompt with the base model's reply to it (`replies[i]` answers `prompts[i]`)."""
    if len(replies) != len(prompts):
        raise ValueError(f"need one reply per prompt ({len(prompts)}), got {len(replies)}")
    return [{"instruction": q, "input": "", "output": reply} for q, reply in zip(prompts, replies)]


def write_personal_dataset(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    heldout_per_fact: int = 1,
    profile: Profile | str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write `train.json`, `heldout.json` and `general.json` (JSON lists of rows) into `out_dir`, creating it.

    Returns the paths keyed `"train"`, `"heldout"`, `"general"`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = make_personal_dataset(seed=seed, heldout_per_fact=heldout_per_fact, profile=profile)
    paths = {}
    for split in ("train", "heldout", "general"):
        paths[split] = out_dir / f"{split}.json"
        paths[split].write_text(json.dumps(getattr(dataset, split), indent=1, ensure_ascii=False) + "\n")
    return paths


def fact_recall(replies: Sequence[str], rows: Sequence[dict]) -> float:
    """Share (0..1) of `replies` that contain their row's `answer`, ignoring case; `replies[i]` answers `rows[i]`.

    Raises:
        ValueError: the lists differ in length or are empty, or a row has no `answer`.
    """
    if len(replies) != len(rows) or not rows:
        raise ValueError(
            f"need one reply per row and at least one row, got {len(replies)} replies for {len(rows)} rows"
        )
    hits = 0
    for index, (reply, row) in enumerate(zip(replies, rows)):
        if "answer" not in row:
            raise ValueError(f"row {index} (0-based) has no 'answer' field to score against")
        hits += row["answer"].casefold() in reply.casefold()
    return hits / len(rows)
