"""Write data/sample/chat.jsonl and data/sample/preference.jsonl: small instruction and preference sets.

Every record is generated here from a few templates over facts (capitals, Jane Austen's novels, word lists)
and small arithmetic, so the answers follow patterns a tiny model can learn: its validation loss falls within
a few hundred steps. Deterministic (seeded): running it again writes the same bytes.

    python data/sample/make_instructions.py        # from the repository root

Licence: CC0-1.0 (see SOURCE.md); the facts are common knowledge, the novels are in the public domain.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Japan": "Tokyo", "China": "Beijing",
    "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasília", "Argentina": "Buenos Aires",
    "Australia": "Canberra", "Hungary": "Budapest", "Turkey": "Ankara", "Iceland": "Reykjavík",
    "Vietnam": "Hanoi", "Thailand": "Bangkok",
}  # fmt: skip
NOVELS = {
    "Sense and Sensibility": (1811, ["Elinor Dashwood", "Marianne Dashwood", "Colonel Brandon"]),
    "Pride and Prejudice": (1813, ["Elizabeth Bennet", "Mr. Darcy", "Jane Bennet"]),
    "Mansfield Park": (1814, ["Fanny Price", "Edmund Bertram", "Mary Crawford"]),
    "Emma": (1815, ["Emma Woodhouse", "Mr. Knightley", "Harriet Smith"]),
    "Northanger Abbey": (1817, ["Catherine Morland", "Henry Tilney"]),
    "Persuasion": (1817, ["Anne Elliot", "Captain Wentworth"]),
}
OPPOSITES = {"hot": "cold", "big": "small", "early": "late", "light": "dark", "happy": "sad", "fast": "slow",
             "open": "closed", "full": "empty", "old": "young", "high": "low", "wet": "dry", "loud": "quiet"}  # fmt: skip
WORDS = ["cat", "house", "garden", "letter", "river", "window", "pride", "carriage", "ball", "music", "tea",
         "sister", "morning", "novel", "bonnet"]  # fmt: skip
TRANSLATIONS = [
    ("thank you", "French", "merci"), ("good morning", "German", "Guten Morgen"), ("cat", "Japanese", "猫 (neko)"),
    ("water", "Spanish", "agua"), ("coffee", "Greek", "καφές (kafés)"), ("house", "Russian", "дом (dom)"),
    ("book", "French", "livre"), ("friend", "Spanish", "amigo"), ("tea", "Chinese", "茶 (chá)"),
    ("summer", "German", "Sommer"), ("goodbye", "Italian", "arrivederci"), ("beautiful", "French", "beau, belle"),
]  # fmt: skip
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a patient teacher."]


def _qa(rng: random.Random) -> tuple[str, str, str]:
    """(question, good answer, a wrong but plausible answer)."""
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randrange(0, 21), rng.randrange(0, 21)
        return (
            f"What is {a} plus {b}?",
            f"{a} plus {b} is {a + b}.",
            f"{a} plus {b} is {a + b + rng.choice([-2, -1, 1, 2])}.",
        )
    if kind == 1:
        a, b = rng.randrange(2, 10), rng.randrange(2, 10)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", f"{a} times {b} is {a * b + a}."
    if kind == 2:
        country = rng.choice(list(CAPITALS))
        other = rng.choice([c for c in CAPITALS.values() if c != CAPITALS[country]])
        return (f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}.",
                f"The capital of {country} is {other}.")  # fmt: skip
    if kind == 3:
        novel = rng.choice(list(NOVELS))
        person = rng.choice(NOVELS[novel][1])
        other = rng.choice([n for n in NOVELS if n != novel])
        return (f"In which Jane Austen novel does {person} appear?", f"{person} appears in {novel}.",
                f"{person} appears in {other}.")  # fmt: skip
    if kind == 4:
        novel = rng.choice(list(NOVELS))
        year = NOVELS[novel][0]
        return (
            f"When was {novel} first published?",
            f"{novel} was first published in {year}.",
            f"{novel} was first published in {year + rng.choice([-3, 2, 5])}.",
        )
    if kind == 5:
        word = rng.choice(WORDS)
        return (
            f"Spell '{word}' backwards.",
            f"'{word}' backwards is '{word[::-1]}'.",
            f"'{word}' backwards is '{word}'.",
        )
    word = rng.choice(list(OPPOSITES))
    return (
        f"What is the opposite of '{word}'?",
        f"The opposite of '{word}' is '{OPPOSITES[word]}'.",
        f"The opposite of '{word}' is '{word}'.",
    )


def _chat(rng: random.Random, i: int) -> dict:
    if i % 10 == 9:  # a translation, with some non-ASCII text
        en, lang, out = rng.choice(TRANSLATIONS)
        return {"prompt": f"Translate '{en}' into {lang}.", "response": f"In {lang}, '{en}' is {out}."}
    q, a, _ = _qa(rng)
    if i % 7 == 3:  # two turns
        q2, a2, _ = _qa(rng)
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                             {"role": "user", "content": f"And: {q2[0].lower()}{q2[1:]}"},
                             {"role": "assistant", "content": a2}]}  # fmt: skip
    if i % 5 == 1:
        return {"messages": [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]}  # fmt: skip
    if i % 2:
        return {"prompt": q, "response": a}
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _preference(rng: random.Random, i: int) -> dict:
    q, good, wrong = _qa(rng)
    terse = good.rstrip(".").split(" is ")[-1].split(" in ")[-1] if " is " in good or " in " in good else good
    if i % 3 == 2:  # a ranking of four answers; the list is shuffled, the ranking says best first
        answers = [good, terse, "I do not know.", wrong]  # a wrong answer is worse than an honest one
        perm = rng.sample(range(4), 4)
        responses = [answers[p] for p in perm]
        return {"prompt": q, "responses": responses, "ranking": [perm.index(k) for k in range(4)]}
    if i % 3 == 1:
        return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": wrong}]}  # fmt: skip
    return {"prompt": q, "chosen": good, "rejected": rng.choice([wrong, "I do not know."])}


def main() -> None:
    rng = random.Random(20240601)
    for name, make, n in (("chat.jsonl", _chat, 320), ("preference.jsonl", _preference, 150)):
        lines = [json.dumps(make(rng, i), ensure_ascii=False) for i in range(n)]
        (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {HERE / name}: {n} records")


if __name__ == "__main__":
    main()
