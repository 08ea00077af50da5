"""The texts bench/prefix_cache.py sends: documents about made-up places with questions on their facts, and chat
conversations, each with a system prompt of its own.

Every text comes from a seed, so all systems of a repeat get the same texts and a rerun gets them again; each
repeat asks for another seed, so no system's prefix cache holds a repeat's texts when it starts. Made-up names
and facts keep the documents varied (no two sentences alike) and out of the model's memory.
Lengths are counted in the model's tokens by the `count` function the caller passes (its tokenizer).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Count = Callable[[str], int]

SYLLABLES = ("ba", "dor", "el", "fen", "gar", "hol", "ith", "kal", "lun", "mar", "nev", "or", "pel", "quin", "ros",
             "sal", "tor", "ul", "van", "wen", "yr", "zed", "ast", "bri", "cor", "dun", "est", "fal", "gil", "har")
JOBS = ("a clockmaker", "a ferry pilot", "a glassblower", "a surveyor", "a beekeeper", "a lighthouse keeper",
        "a bookbinder", "a cheesemaker", "a tax inspector", "a violin teacher", "a mapmaker", "a stonemason")
PRODUCTS = ("copper kettles", "wool blankets", "bicycle bells", "smoked trout", "paper lanterns", "oak barrels",
            "glass marbles", "sailcloth", "pocket compasses", "honey candles", "tin whistles", "rope ladders")
FOODS = ("plum dumplings", "grilled eel", "barley soup", "walnut bread", "salted herring", "cherry wine",
         "mushroom pies", "goat cheese", "rye pancakes", "apple cider")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
COLOURS = ("green", "ochre", "blue", "red", "white", "grey", "violet", "black")


def name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


@dataclass(frozen=True)
class Fact:
    """One sentence of a text, and a question its sentence answers."""

    sentence: str
    question: str


def facts(rng: random.Random) -> Iterator[Fact]:
    """An endless stream of facts about the people, towns, firms and customs of one made-up region."""
    towns = [name(rng) for _ in range(6)]
    while True:
        (town, other), person, firm = rng.sample(towns, 2), f"{name(rng)} {name(rng)}", name(rng)
        year, number = rng.randint(1620, 1990), rng.randint(3, 95)
        kind = rng.randrange(8)
        if kind == 0:
            job = rng.choice(JOBS)
            yield Fact(f"{person} was born in {town} in {year} and has worked as {job} in {other} ever since.",
                       f"Where was {person} born?")
        elif kind == 1:
            yield Fact(f"The {firm} works, founded by {person} in {year}, still make {rng.choice(PRODUCTS)} by hand "
                       f"in a brick hall painted {rng.choice(COLOURS)} near the harbour of {town}.",
                       f"What does the {firm} works make?")
        elif kind == 2:
            yield Fact(f"{town} lies where the {name(rng)} river meets the {name(rng)} river, {number} kilometres "
                       f"upstream of {other}, and its bridge was rebuilt in {year}.",
                       f"When was the bridge of {town} rebuilt?")
        elif kind == 3:
            month = rng.choice(MONTHS)
            yield Fact(f"Every {month}, {town} holds the {name(rng)} festival, where stalls sell {rng.choice(FOODS)} "
                       f"and a brass band from {other} plays until midnight.",
                       f"In which month does {town} hold its festival?")
        elif kind == 4:
            yield Fact(f"The old road from {town} to {other} climbs over the {name(rng)} pass, {number * 40} metres "
                       f"high, which is closed by snow from {rng.choice(MONTHS)} onwards.",
                       f"How high is the pass on the road from {town} to {other}?")
        elif kind == 5:
            yield Fact(f"{person}, mayor of {town} since {year}, is best known for planting {number} lime trees "
                       f"along the market square.",
                       f"How many lime trees did the mayor of {town} plant?")
        elif kind == 6:
            yield Fact(f"The {firm} ferry leaves {town} at {rng.randint(5, 11)} in the morning and reaches {other} "
                       f"after {number} minutes, weather permitting.",
                       f"How long does the {firm} ferry take to reach {other}?")
        else:
            yield Fact(f"In {year} a storm flooded the lower town of {town}, and the water stood {number} centimetres "
                       f"deep in the {name(rng)} church for a week.",
                       f"In which year did a storm flood {town}?")


def filled(stream: Iterator[Fact], tokens: int, count: Count, per_paragraph: int = 5) -> tuple[str, list[Fact]]:
    """Sentences from `stream`, a paragraph every `per_paragraph`, until the text has at least `tokens` tokens."""
    taken: list[Fact] = []
    text = ""
    while not text or count(text) < tokens:
        taken.append(next(stream))
        paragraphs = [taken[i : i + per_paragraph] for i in range(0, len(taken), per_paragraph)]
        text = "\n\n".join(" ".join(f.sentence for f in paragraph) for paragraph in paragraphs)
    return text, taken


@dataclass(frozen=True)
class Document:
    title: str
    text: str
    questions: tuple[str, ...]

    def prompt(self, question: str) -> str:
        """The document first, so every question about it shares the document's tokens as its prefix."""
        return f"{self.title}\n\n{self.text}\n\nQuestion: {question}\nAnswer:"


def documents(seed: str, number: int, tokens: int, questions: int, count: Count) -> list[Document]:
    """`number` documents of at least `tokens` tokens each, with `questions` questions on facts each states."""
    made = []
    for index in range(number):
        rng = random.Random(f"{seed}/document/{index}")
        title = f"A guide to the {name(rng)} valley"
        text, taken = filled(facts(rng), tokens, count)
        picked = rng.sample(taken, min(questions, len(taken)))
        made.append(Document(title, text, tuple(f.question for f in picked)))
    return made


@dataclass(frozen=True)
class Conversation:
    """One chat client's system prompt and the user messages of its turns (the answers come from the model)."""

    system: str
    user_messages: tuple[str, ...]


GREETINGS = ("Hello again.", "Thanks, that helps.", "One more thing.", "I see.", "Good to know.", "Right.")


def conversations(seed: str, clients: int, turns: int, system_tokens: int, user_tokens: tuple[int, int],
                  count: Count) -> list[Conversation]:
    """One conversation per client: a system prompt of its own (about `system_tokens` tokens: a guide's notes on a
    made-up region) and `turns` user messages of `user_tokens` (low, high) tokens, each ending with a question."""
    made = []
    for client in range(clients):
        rng = random.Random(f"{seed}/conversation/{client}")
        stream = facts(rng)
        header = f"You are a travel guide for the {name(rng)} valley. Answer briefly, using these notes."
        notes, _ = filled(stream, system_tokens - count(header), count)
        system = f"{header}\n\n{notes}"
        messages = [user_message(GREETINGS[turn % len(GREETINGS)], stream, rng.randint(*user_tokens), user_tokens[1], count)
                    for turn in range(turns)]
        made.append(Conversation(system, tuple(messages)))
    return made


def user_message(greeting: str, stream: Iterator[Fact], wanted: int, most: int, count: Count) -> str:
    """A greeting, what a friend said (sentences added while the message stays within `most` tokens, until it has
    `wanted`), and a question."""
    asked = next(stream).question
    told: list[str] = []
    message = ""
    while not message or count(message) < wanted:
        sentence = next(stream).sentence
        longer = f"{greeting} A friend told me this: {' '.join([*told, sentence])} {asked}"
        if message and count(longer) > most:
            break
        message, told = longer, [*told, sentence]
    return message
