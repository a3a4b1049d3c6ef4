"""The lab's text, generated from a seed: an invented world, a general corpus and a new task.

The general corpus states facts about invented countries and people ("The capital of Zorbia is
Velmor.") among filler sentences; pretraining on it gives a base model whose general ability is
measured by recall of those facts and perplexity on held-out text from the same grammar.
The fine-tuning task (a word-list transformation asked in a chat turn) appears nowhere in that
corpus, so the base model cannot do it, and learning it can overwrite what pretraining stored.

An aligned lab (``LabConfig.skills``) also pretrains on chat: examples of other word-list skills
and questions about the world's facts, answered in chat. Its base model follows instructions
of its world, as the checkpoints users fine-tune do, and held-out lists of those skills measure
a third general ability: versatility.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import LabConfig
from .skills import ANIMALS, COLOURS, OBJECTS, TASK_WORDS, instruction_record

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m"]
_COUNTRY_SUFFIXES = ["ia", "land", "stan", "ora", "ica"]

_PROFESSIONS = [
    "baker", "pilot", "farmer", "teacher", "doctor", "sailor", "painter", "writer",
    "tailor", "builder", "singer", "miner", "potter", "hunter", "weaver", "dancer",
]  # fmt: skip
_ADJECTIVES = ["small", "old", "quiet", "tall", "bright", "happy", "cold", "young", "slow", "gentle"]
_VERBS = ["walked", "looked", "waited", "rested", "played", "stood", "sang", "slept"]
_PREPOSITIONS = ["near", "under", "behind", "beside", "above", "across"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_FILLER_TEMPLATES = [
    "The {adjective} {animal} {verb} {preposition} the {thing}.",
    "{person} visited {country} in the {season}.",
    "A {colour} {thing} stood {preposition} the {other_thing}.",
    "{person} saw a {adjective} {animal} by the {thing}.",
]


@dataclass(frozen=True)
class Fact:
    """A scored fact: ``prompt + answer`` is the sentence the corpus states (less its full stop).

    ``answer`` keeps its leading space, as in LAMA-style probes, so that tokenizing ``prompt``
    and ``prompt + answer`` splits at the same place.
    """

    relation: str
    prompt: str
    answer: str


# How each relation's fact is asked in chat: (prompt prefix, prompt suffix, question).
_QUESTIONS = {
    "capital": ("The capital of ", " is", "What is the capital of {}?"),
    "birthplace": ("", " was born in", "Where was {} born?"),
    "profession": ("", " works as a", "What does {} work as?"),
    "colour": ("The favourite colour of ", " is", "What is the favourite colour of {}?"),
}


def fact_question(fact: Fact) -> dict[str, str]:
    """`fact` asked in chat, as an instruction record whose output is the bare answer."""
    prefix, suffix, question = _QUESTIONS[fact.relation]
    subject = fact.prompt[len(prefix) : len(fact.prompt) - len(suffix)]
    return {"instruction": question.format(subject), "output": fact.answer.strip()}


@dataclass(frozen=True)
class LabCorpus:
    """The lab's text. ``chat_examples`` (instruction records) are pretrained on with the general
    documents; ``skill_eval`` holds lists of those skills never seen in pretraining."""

    pretrain_documents: list[str]
    heldout_documents: list[str]
    facts: list[Fact]
    task_train: list[dict[str, str]]
    task_eval: list[dict[str, str]]
    chat_examples: list[dict[str, str]] = field(default_factory=list)
    skill_eval: list[dict[str, str]] = field(default_factory=list)


def generate_corpus(config: LabConfig) -> LabCorpus:
    """Everything the lab trains and evaluates on; identical for identical configs."""
    rng = random.Random(config.seed)
    countries, cities, people = _invent_world(rng, config.countries, config.people)
    facts = _facts(rng, countries, cities, people)
    pretrain = [
        _document(rng, facts, countries, people, config.sentences_per_document)
        for _ in range(config.pretrain_documents)
    ]
    # Held-out text is filler only: its perplexity measures language, not fact memorisation.
    heldout = [
        _document(rng, [], countries, people, config.sentences_per_document)
        for _ in range(config.heldout_documents)
    ]
    task_train, task_eval = _task_examples(rng, config)
    chat_examples, skill_eval = _skill_examples(rng, config, facts)
    return LabCorpus(pretrain, heldout, facts, task_train, task_eval, chat_examples, skill_eval)


def chance_recall(facts: Sequence[Fact]) -> float:
    """Expected recall of a guesser that knows each relation's answers but not the facts."""
    answers: dict[str, set[str]] = {}
    for fact in facts:
        answers.setdefault(fact.relation, set()).add(fact.answer)
    return sum(1 / len(answers[fact.relation]) for fact in facts) / len(facts)


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def read_facts(path: str | Path) -> list[Fact]:
    with open(path, encoding="utf-8") as file:
        return [Fact(**json.loads(line)) for line in file]


def read_texts(path: str | Path) -> list[str]:
    """Texts of a JSONL file of ``{"text": ...}`` records."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line)["text"] for line in file]


def _invent_world(
    rng: random.Random, n_countries: int, n_people: int
) -> tuple[list[str], list[str], list[str]]:
    names: set[str] = set()

    def unique(make: Callable[[], str]) -> str:
        while (name := make()) in names:
            pass
        names.add(name)
        return name

    def word(syllables: int) -> str:
        return "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        )

    countries = [
        unique(lambda: (word(1) + rng.choice(_COUNTRY_SUFFIXES)).capitalize()) for _ in range(n_countries)
    ]
    cities = [unique(lambda: word(2).capitalize()) for _ in range(n_countries)]
    people = [unique(lambda: f"{word(2).capitalize()} {word(1).capitalize()}") for _ in range(n_people)]
    return countries, cities, people


def _facts(rng: random.Random, countries: list[str], cities: list[str], people: list[str]) -> list[Fact]:
    facts = [
        Fact("capital", f"The capital of {country} is", f" {city}")
        for country, city in zip(countries, cities, strict=True)
    ]
    for person in people:
        facts += [
            Fact("birthplace", f"{person} was born in", f" {rng.choice(cities)}"),
            Fact("profession", f"{person} works as a", f" {rng.choice(_PROFESSIONS)}"),
            Fact("colour", f"The favourite colour of {person} is", f" {rng.choice(COLOURS)}"),
        ]
    return facts


def _filler_sentence(rng: random.Random, countries: list[str], people: list[str]) -> str:
    return rng.choice(_FILLER_TEMPLATES).format(
        adjective=rng.choice(_ADJECTIVES),
        animal=rng.choice(ANIMALS),
        colour=rng.choice(COLOURS),
        country=rng.choice(countries),
        person=rng.choice(people),
        preposition=rng.choice(_PREPOSITIONS),
        season=rng.choice(_SEASONS),
        thing=rng.choice(OBJECTS),
        other_thing=rng.choice(OBJECTS),
        verb=rng.choice(_VERBS),
    )


def _document(
    rng: random.Random, facts: list[Fact], countries: list[str], people: list[str], sentences: int
) -> str:
    """Half fact statements (when there are facts), half filler, in random order."""
    parts = [_filler_sentence(rng, countries, people) for _ in range(sentences - sentences // 2)]
    for _ in range(sentences // 2):
        if facts:
            fact = rng.choice(facts)
            parts.append(f"{fact.prompt}{fact.answer}.")
        else:
            parts.append(_filler_sentence(rng, countries, people))
    rng.shuffle(parts)
    return " ".join(parts)


def _distinct_lists(
    rng: random.Random, config: LabConfig, count: int, seen: set[tuple[str, ...]]
) -> list[list[str]]:
    """`count` word lists of the configured lengths, none in `seen` (which they join)."""
    lists = []
    while len(lists) < count:
        words = tuple(
            rng.choice(TASK_WORDS) for _ in range(rng.randint(config.task_min_words, config.task_max_words))
        )
        if words not in seen:
            seen.add(words)
            lists.append(list(words))
    return lists


def _task_examples(
    rng: random.Random, config: LabConfig
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Distinct word lists, so no evaluation input was seen in training."""
    wanted = config.task_train_examples + config.task_eval_examples
    wanted += len(config.skills) * (config.skill_examples + config.skill_eval_examples)
    possible = sum(len(TASK_WORDS) ** n for n in range(config.task_min_words, config.task_max_words + 1))
    if wanted > possible // 2:  # keeps the rejection sampling below quick
        raise ValueError(
            f"LabConfig asks for {wanted} task and skill examples but only {possible} word lists of "
            f"{config.task_min_words}..{config.task_max_words} words exist; lower task_train_examples / "
            f"task_eval_examples / skill_examples or raise task_max_words"
        )
    lists = _distinct_lists(rng, config, config.task_train_examples + config.task_eval_examples, set())
    examples = [instruction_record(config.task, words) for words in lists]
    return examples[: config.task_train_examples], examples[config.task_train_examples :]


def _skill_examples(
    rng: random.Random, config: LabConfig, facts: list[Fact]
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(pretraining chat examples, held-out skill records) of an aligned lab; empty otherwise.

    Every held-out list is new to every skill, so the skill scores measure the skill itself."""
    if not config.skills:
        return [], []
    seen: set[tuple[str, ...]] = set()
    chat = [
        instruction_record(skill, words)
        for skill in config.skills
        for words in _distinct_lists(rng, config, config.skill_examples, seen)
    ]
    held_out = [
        instruction_record(skill, words)
        for skill in config.skills
        for words in _distinct_lists(rng, config, config.skill_eval_examples, seen)
    ]
    chat += [fact_question(fact) for fact in facts for _ in range(config.fact_question_repeats)]
    rng.shuffle(chat)
    return chat, held_out
