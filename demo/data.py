"""Synthetic training text: SQL questions in the reference demo's prompt format, a spelling task, prose."""

from __future__ import annotations

import random
from dataclasses import dataclass

SQL_INSTRUCTION = "Write a SQL query to answer the question based on the table schema."
SPELL_INSTRUCTION = "Spell the word letter by letter."

# The reference demo's request, verbatim (OVMS LoRA demo, /v3/completions).
REFERENCE_PROMPT = (
    "[user] Write a SQL query to answer the question based on the table schema.\n\n"
    " context: CREATE TABLE table_name_74 (icao VARCHAR, airport VARCHAR)\n\n"
    " question: Name the ICAO for lilongwe international airport [/user] [assistant]"
)
REFERENCE_ANSWER = " SELECT icao FROM table_name_74 WHERE airport = 'lilongwe international airport'"

_COLUMNS = [
    ("icao", "airport"), ("iata", "city"), ("capital", "country"), ("population", "city"),
    ("position", "player"), ("school", "player"), ("director", "film"), ("year", "film"),
    ("score", "team"), ("venue", "date"), ("opponent", "week"), ("artist", "album"),
    ("label", "album"), ("height", "building"), ("owner", "station"), ("frequency", "station"),
    ("party", "candidate"), ("district", "incumbent"), ("engine", "model"), ("builder", "ship"),
]
_VALUES = [
    "lilongwe international airport", "mwanza", "blantyre", "new york", "paris", "berlin", "lagos",
    "john smith", "maria lopez", "the river", "blue moon", "red star", "october 5", "week 3",
    "central station", "kfm radio", "green party", "district 9", "v8 turbo", "hms victory",
    "oslo", "lima", "quito", "accra", "dakar", "kigali", "nairobi", "harare", "lusaka", "tunis",
]
_WORDS = [
    "river", "stone", "garden", "window", "silver", "market", "forest", "candle", "bridge", "winter",
    "orange", "pencil", "rocket", "castle", "planet", "spring", "mirror", "anchor", "basket", "violin",
    "harbor", "ladder", "meadow", "puzzle", "saddle", "tunnel", "velvet", "wallet", "yellow", "zipper",
]
_PROSE_SUBJECTS = ["the city", "a traveler", "the team", "our school", "the old ship", "a new film", "the station"]
_PROSE_VERBS = ["opened", "visited", "described", "built", "reported", "named", "crossed"]
_PROSE_OBJECTS = ["the airport", "a quiet garden", "the river bridge", "a small market", "the capital", "the album"]


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def user_turn(instruction: str, body: str) -> str:
    return f"[user] {instruction}\n\n{body} [/user] [assistant]"


def sql_example(rng: random.Random) -> Example:
    answer_col, key_col = rng.choice(_COLUMNS)
    table = f"table_name_{rng.randint(1, 99)}"
    value = rng.choice(_VALUES)
    question = rng.choice(
        [f"Name the {answer_col.upper()} for {value}", f"What is the {answer_col} when {key_col} is {value}?"]
    )
    body = f" context: CREATE TABLE {table} ({answer_col} VARCHAR, {key_col} VARCHAR)\n\n question: {question}"
    return Example(user_turn(SQL_INSTRUCTION, body), f" SELECT {answer_col} FROM {table} WHERE {key_col} = '{value}'")


def spell_example(rng: random.Random) -> Example:
    word = rng.choice(_WORDS)
    return Example(user_turn(SPELL_INSTRUCTION, f" word: {word}"), " " + "-".join(word))


def base_answer(example: Example) -> str:
    """What the base model learns to say to any question: a plain answer, never SQL (as in the demo)."""
    last = example.prompt.split("question: ")[-1].split(" word: ")[-1].split(" [/user]")[0]
    return f"\n\n  Answer: {last.split(' for ')[-1].split(' is ')[-1].rstrip('?')}"


def prose(rng: random.Random) -> str:
    sentences = [
        f"{rng.choice(_PROSE_SUBJECTS).capitalize()} {rng.choice(_PROSE_VERBS)} {rng.choice(_PROSE_OBJECTS)} "
        f"near {rng.choice(_VALUES)}."
        for _ in range(rng.randint(2, 5))
    ]
    return " ".join(sentences)


def knowledge(rng: random.Random) -> str:
    """What the base knows outside the chat format (SQL, spellings), so an adapter only teaches the format.

    The query is written exactly as the adapter's completion (" SELECT ... '<value>'" and then the
    end of text): a token the base never emits (" SELECT", a lone closing quote) keeps an untrained
    output row that a LoRA on the linears cannot make confident.
    """
    if rng.random() < 0.5:
        ex = sql_example(rng)
        schema = ex.prompt.split("context: ")[1].split("\n\n")[0]
        question = ex.prompt.split("question: ")[1].split(" [/user]")[0]
        return f"{schema}\n-- {question}\n-- query:{ex.completion}"
    word = rng.choice(_WORDS)
    return f"The word {word} is spelled {'-'.join(word)}."


def pretraining_texts(rng: random.Random, n: int) -> list[str]:
    """The base model's corpus: prose, SQL and spellings, and questions in the chat format answered plainly."""
    texts = []
    for i in range(n):
        if i % 4 == 0:
            texts.append(prose(rng))
        elif i % 4 == 1:
            texts.append(knowledge(rng))
        else:
            ex = sql_example(rng) if i % 4 == 2 else spell_example(rng)
            texts.append(ex.prompt + base_answer(ex))
    return texts


def sql_set(rng: random.Random, n: int) -> list[Example]:
    return [Example(REFERENCE_PROMPT, REFERENCE_ANSWER)] + [sql_example(rng) for _ in range(n - 1)]


def spell_set(rng: random.Random, n: int) -> list[Example]:
    return [spell_example(rng) for _ in range(n)]
