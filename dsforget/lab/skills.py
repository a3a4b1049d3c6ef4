"""Word-list transformations: the lab's chat skills and its fine-tuning speciality.

Each is an instruction and a function of a word list. An aligned lab pretrains its base model
on chat examples of some of them (the skills it can do, whose held-out lists measure how much
of that versatility survives fine-tuning) and fine-tunes on another (the speciality).
``encode`` replaces every word by its code word, a fixed permutation of the task words without
fixed points: it needs thirty new associations, not only a new way of copying, so it is learned
by changing weights that other abilities also use.
"""

from __future__ import annotations

from collections.abc import Callable

# The task's words are common corpus words: the base model knows them; only the task is new.
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "brown"]
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "goat", "fox", "owl", "bear", "wolf"]
OBJECTS = ["house", "river", "tree", "road", "boat", "bridge", "garden", "market", "hill", "door"]
TASK_WORDS = COLOURS + ANIMALS + OBJECTS

# i -> 7i + 3 (mod 30) is a permutation (7 is prime to 30) and has no fixed point (6i = 27 has
# no solution mod 30): no word is its own code word.
CODE_WORDS = {word: TASK_WORDS[(7 * index + 3) % len(TASK_WORDS)] for index, word in enumerate(TASK_WORDS)}

TRANSFORMS: dict[str, tuple[str, Callable[[list[str]], list[str]]]] = {
    "reverse": ("Reverse the order of the words.", lambda words: words[::-1]),
    "sort": ("Sort the words alphabetically.", sorted),
    "rotate": ("Move the first word to the end.", lambda words: words[1:] + words[:1]),
    "double": ("Repeat every word twice.", lambda words: [w for word in words for w in (word, word)]),
    "encode": ("Write every word in the code.", lambda words: [CODE_WORDS[word] for word in words]),
}
LAB_TASKS = tuple(TRANSFORMS)


def instruction_record(task: str, words: list[str]) -> dict[str, str]:
    """The instruction record of `task` on `words` (``dsforget.data``'s instruction format)."""
    instruction, transform = TRANSFORMS[task]
    return {"instruction": instruction, "input": " ".join(words), "output": " ".join(transform(words))}
