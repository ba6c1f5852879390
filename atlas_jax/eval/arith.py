"""A seeded synthetic arithmetic task: word problems with a worked answer and a final `#### N` line.

    train, heldout = make_split(n_train=20000, n_heldout=1000, seed=0)
    train[0] -> Problem(question="Ava has 47 shells and finds 38 more. How many shells does Ava have now?",
                        working="47 + 38 = 85", answer=85)
    train[0].completion -> "47 + 38 = 85\\n#### 85"

Operations: addition and subtraction of 1-3 digit numbers (a difference is never negative) and
multiplication of a 1-2 digit number by a 1 digit one. Each problem is the triple (op, a, b) told in
one of several word templates. Train and held-out sets are disjoint by construction: a triple belongs
to the held-out side when the SHA-256 of "op:a:b" falls in the first `HELDOUT_BUCKETS` of 100 buckets,
whatever the seed, so no held-out triple (in any wording) is ever trained on.

The calculator that rechecks a completion's working is `atlas_jax.eval.metrics.check_working`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
HELDOUT_BUCKETS = 20  # of 100: ~20% of all triples are reserved for held-out problems

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Ema", "Finn", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Mo", "Nia")
ITEMS = ("apples", "shells", "stamps", "coins", "books", "marbles", "cards", "pens", "beads", "eggs")
TEMPLATES = {
    "+": ("{n} has {a} {i} and finds {b} more. How many {i} does {n} have now?",
          "A box holds {a} {i}. {n} puts in {b} more. How many {i} are in the box?",
          "What is {a} plus {b}?"),
    "-": ("{n} has {a} {i} and gives away {b}. How many {i} does {n} have left?",
          "A shelf holds {a} {i}. {n} takes {b} of them. How many {i} are still on the shelf?",
          "What is {a} minus {b}?"),
    "*": ("{n} buys {a} bags with {b} {i} in each. How many {i} does {n} buy?",
          "There are {b} rows of {a} {i}. How many {i} are there in all?",
          "What is {a} times {b}?"),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    op: str
    a: int
    b: int

    @property
    def answer(self) -> int:
        return OPS[self.op](self.a, self.b)

    @property
    def working(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.answer}"

    @property
    def completion(self) -> str:
        return f"{self.working}\n#### {self.answer}"


def is_heldout(op: str, a: int, b: int) -> bool:
    h = hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()
    return int.from_bytes(h[:4], "big") % 100 < HELDOUT_BUCKETS


def _triple(rng: random.Random) -> tuple[str, int, int]:
    op = rng.choice("++--*")  # addition and subtraction twice as often as multiplication
    if op == "*":
        return op, rng.randint(2, 99), rng.randint(2, 9)
    a, b = (rng.randint(1, 10 ** rng.randint(1, 3) - 1) for _ in range(2))
    return (op, a, b) if op == "+" else (op, max(a, b), min(a, b))


def _problem(op: str, a: int, b: int, rng: random.Random) -> Problem:
    text = rng.choice(TEMPLATES[op]).format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b)
    return Problem(text, op, a, b)


def make_split(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """n_train training problems and n_heldout held-out ones, each side without repeated triples."""
    rng = random.Random(seed)
    sides: dict[bool, dict[tuple, Problem]] = {False: {}, True: {}}
    want = {False: n_train, True: n_heldout}
    tries = 0
    while any(len(sides[s]) < want[s] for s in sides):
        tries += 1
        if tries > 100 * (n_train + n_heldout) + 10_000:
            raise ValueError(f"cannot draw {n_train} + {n_heldout} distinct problems; ask for fewer")
        t = _triple(rng)
        side = is_heldout(*t)
        if len(sides[side]) < want[side] and t not in sides[side]:
            sides[side][t] = _problem(*t, rng)
    return list(sides[False].values()), list(sides[True].values())

