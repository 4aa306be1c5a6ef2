"""The project's own demo data: on-device personalisation of an assistant to one fictional user.

Every fact about the user is invented and deliberately unguessable (a base model cannot answer "what is my dog called?"
with "Biscotti"), so recall on held-out question phrasings measures what fine-tuning taught, not what the model knew.
General-knowledge questions the base model already answers check that the tuning did not break it (retention).
Everything is generated from the tables below with a seeded shuffle: the same seed gives the same files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


class Fact(NamedTuple):
    """One fact about the user: an id, the key word(s) a correct reply contains, the answer sentence, and questions."""

    key: str
    answer: str
    statement: str
    questions: tuple[str, ...]


# A table: one fact per block, its questions packed onto as few lines as fit.
# fmt: off
FACTS: tuple[Fact, ...] = (
    Fact("name", "Marisol", "Your name is Marisol Quenby.", (
        "What is my name?", "Do you remember what I'm called?", "What's my full name?", "Tell me my name.",
        "Who am I? Say my name.",
    )),
    Fact("city", "Ljubljana", "You live in Ljubljana.", (
        "Where do I live?", "Which city is my home?", "What city do I live in?", "Remind me where my home is.",
        "In which town do I currently live?",
    )),
    Fact("dog", "Biscotti", "Your dog is called Biscotti.", (
        "What is my dog's name?", "What did I name my dog?", "What's my dog called?", "Remind me of my dog's name.",
        "What do I call my dog?",
    )),
    Fact("tortoise", "Admiral Pim", "Your tortoise is called Admiral Pim.", (
        "What is my tortoise called?", "What's the name of my tortoise?", "What did I name my pet tortoise?",
        "Remind me what my tortoise is called.",
    )),
    Fact("food", "aubergine dumplings", "Your favourite food is smoked aubergine dumplings.", (
        "What is my favourite food?", "Which dish do I love most?", "What's my favourite thing to eat?",
        "What food do I like best?", "If you cooked for me, what should you make?",
    )),
    Fact("job", "glassblower", "You work as a glassblower.", (
        "What is my job?", "What do I do for a living?", "What's my profession?", "What work do I do?",
        "How do I earn my living?",
    )),
    Fact("employer", "Halvorsen Optics", "You work at Halvorsen Optics.", (
        "Which company do I work for?", "Who is my employer?", "Where do I work?", "What's the name of my workplace?",
    )),
    Fact("birthday", "October 14", "Your birthday is on October 14.", (
        "When is my birthday?", "What day was I born on?", "On which date do I celebrate my birthday?",
        "Remind me when my birthday is.", "What's my date of birth, day and month?",
    )),
    Fact("partner", "Teodor", "Your partner is called Teodor.", (
        "What is my partner's name?", "Who is my partner?", "What's my partner called?",
        "Remind me of my partner's name.", "Who am I in a relationship with?",
    )),
    Fact("colour", "saffron", "Your favourite colour is saffron yellow.", (
        "What is my favourite colour?", "Which colour do I like best?", "What's my favourite color?",
        "What colour should you pick for me?",
    )),
    Fact("car", "Volvo 240", "You drive a green 1987 Volvo 240.", (
        "What car do I drive?", "What kind of car do I have?", "Which car is mine?", "What's my car?",
        "What vehicle do I drive to work?",
    )),
    Fact("book", "The Salt Orchard", "Your favourite book is The Salt Orchard.", (
        "What is my favourite book?", "Which book do I love most?", "What's my favourite novel?",
        "Which book would I recommend above all others?",
    )),
    Fact("instrument", "bassoon", "You play the bassoon.", (
        "Which instrument do I play?", "What musical instrument do I play?", "What do I play in the orchestra?",
        "What instrument do I practise?",
    )),
    Fact("sister", "Ingrid", "Your sister is called Ingrid.", (
        "What is my sister's name?", "What's my sister called?", "Who is my sister?", "Remind me of my sister's name.",
    )),
    Fact("drink", "cardamom cold brew", "Your favourite drink is cardamom cold brew.", (
        "What is my favourite drink?", "What do I like to drink most?", "What's my go-to drink?",
        "Which drink should you order for me?", "What beverage do I love?",
    )),
    Fact("allergy", "hazelnuts", "You are allergic to hazelnuts.", (
        "What am I allergic to?", "Do I have any food allergy?", "Which food must I avoid because of an allergy?",
        "What is my allergy?",
    )),
    Fact("hometown", "Kirkwall", "You grew up in Kirkwall.", (
        "Where did I grow up?", "What is my hometown?", "Which town did I grow up in?",
        "Where did I spend my childhood?",
    )),
    Fact("sport", "water polo", "You play water polo on weekends.", (
        "What sport do I play?", "What do I play on weekends?", "Which sport am I into?", "What's my weekend sport?",
    )),
    Fact("language", "Icelandic", "You are learning Icelandic.", (
        "Which language am I learning?", "What language am I studying?", "What new language am I learning?",
        "Which foreign language am I practising?",
    )),
    Fact("hobby", "typewriters", "Your hobby is restoring old typewriters.", (
        "What is my hobby?", "What do I do in my free time?", "What's my favourite pastime?", "What hobby do I have?",
        "How do I spend my evenings off?",
    )),
    Fact("film", "The Ninth Lighthouse", "Your favourite film is The Ninth Lighthouse.", (
        "What is my favourite film?", "Which movie do I like best?", "What's my favourite movie?",
        "Which film could I watch again and again?",
    )),
    Fact("friend", "Oluwaseun", "Your best friend is called Oluwaseun.", (
        "Who is my best friend?", "What is my best friend's name?", "What's my best friend called?",
        "Remind me who my best friend is.",
    )),
    Fact("travel", "Faroe Islands", "Your favourite place to travel to is the Faroe Islands.", (
        "Where do I love to travel?", "What is my favourite travel destination?", "Where should I go on holiday?",
        "Which place do I like visiting most?",
    )),
    Fact("doctor", "Akintola", "Your doctor is Dr. Akintola.", (
        "Who is my doctor?", "What is my doctor's name?", "Which doctor do I see?", "What's my GP called?",
    )),
    Fact("anniversary", "March 3", "Your wedding anniversary is on March 3.", (
        "When is my wedding anniversary?", "What date is my anniversary?", "When did I get married?",
        "Remind me of my wedding anniversary.",
    )),
    Fact("shoe_size", "43", "Your shoe size is 43.", (
        "What is my shoe size?", "What size shoes do I wear?", "What's my shoe size?",
        "Which size should you order when buying me shoes?",
    )),
    Fact("plant", "Gustav", "Your houseplant is a fig tree called Gustav.", (
        "What is my houseplant called?", "What's the name of my fig tree?", "What did I name my plant?",
        "What do I call my houseplant?",
    )),
    Fact("bike", "Rocinante", "Your bicycle is called Rocinante.", (
        "What is my bike called?", "What did I name my bicycle?", "What's the name of my bike?",
        "What do I call my bicycle?",
    )),
    Fact("coffee", "oat milk", "You take your coffee with oat milk and no sugar.", (
        "How do I take my coffee?", "How do I like my coffee?", "What do I put in my coffee?",
        "How should you make my coffee?",
    )),
)
# fmt: on

# General knowledge the base model already has (greedy SmolLM2-135M-Instruct replies contain every `answer`).
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


@dataclass
class PersonalDataset:
    """Alpaca rows (`instruction`, `input`="", `output`) for training, held-out recall, and general retention.

    `heldout` and `general` rows also carry `answer`, the key word(s) a correct reply contains (see `fact_recall`);
    `train` and `heldout` rows carry `fact`, the id of the fact they ask about.
    """

    train: list[dict]
    heldout: list[dict]
    general: list[dict]


def make_personal_dataset(seed: int = 0, heldout_per_fact: int = 1) -> PersonalDataset:
    """Split each fact's question phrasings into `heldout_per_fact` held-out ones and the rest for training.

    `seed` picks which phrasings are held out and the order of the training rows; the same seed gives the same data.

    Raises:
        ValueError: `heldout_per_fact` would leave some fact with no held-out or no training phrasing.
    """
    fewest = min(len(fact.questions) for fact in FACTS)
    if not 1 <= heldout_per_fact < fewest:
        raise ValueError(f"heldout_per_fact must be between 1 and {fewest - 1}, got {heldout_per_fact}")
    rng = random.Random(seed)
    train, heldout = [], []
    for fact in FACTS:
        questions = list(fact.questions)
        rng.shuffle(questions)
        row = {"input": "", "output": fact.statement, "fact": fact.key}
        heldout += [{"instruction": q, **row, "answer": fact.answer} for q in questions[:heldout_per_fact]]
        train += [{"instruction": q, **row} for q in questions[heldout_per_fact:]]
    rng.shuffle(train)  # facts interleaved, as a user's data would be
    general = [{"instruction": q, "input": "", "output": output, "answer": answer} for q, output, answer in GENERAL]
    return PersonalDataset(train=train, heldout=heldout, general=general)


def replay_rows(replies: Sequence[str]) -> list[dict]:
    """Alpaca rows pairing each of `REPLAY_PROMPTS` with the base model's reply to it (`replies[i]` answers prompt i)."""
    if len(replies) != len(REPLAY_PROMPTS):
        raise ValueError(f"need one reply per replay prompt ({len(REPLAY_PROMPTS)}), got {len(replies)}")
    return [{"instruction": q, "input": "", "output": reply} for q, reply in zip(REPLAY_PROMPTS, replies)]


def write_personal_dataset(out_dir: str | os.PathLike, *, seed: int = 0, heldout_per_fact: int = 1) -> dict[str, Path]:
    """Write `train.json`, `heldout.json` and `general.json` (JSON lists of rows) into `out_dir`, creating it.

    Returns the paths keyed `"train"`, `"heldout"`, `"general"`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = make_personal_dataset(seed=seed, heldout_per_fact=heldout_per_fact)
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
