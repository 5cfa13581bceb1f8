"""The synthetic needle-in-a-haystack task of `eval.needle`: prompts of an exact token length
with one random number (the needle) at a chosen depth of filler text, and the same
documents, answered, as a training corpus.

A prompt of context length L, for a tokenizer (BOS included):

    <BOS>Read the text below. The grass is green. The sky is blue. ... The special magic number
    is 45. Say it again: 45, 45, 45, 45, 45, 45, 45, 45. ... Here we go. What is the special
    magic number? The special magic number is

and its answer " 45." then end-of-text: prompt + answer + end-of-text is exactly L tokens, so
a model trained on rows of L tokens has seen every position it is asked about.

- The filler is the passkey test's five sentences ("The grass is green. The sky is blue. The
  sun is yellow. Here we go. There and back again."), repeated and cut to fit: predictable,
  so a small model learns it at once and what is left to learn is the retrieval.
- The value is a random number of 2 or 3 digits among those the tokenizer encodes as one
  token (all of 10-999 for Llama 3's tokenizer; 26 for the project's 2048-token BPE). No
  other digit is in the prompt: the value can only come from the needle.
- The needle says the value nine times (like the passkey test's "The pass key is 71432.
  Remember it. 71432 is the pass key.", only more): a small model trained from scratch first
  learns to copy the value within the needle, and that is what lets it learn, within a few
  hundred steps, to fetch it from anywhere for the question. Two layers at width 64 trained
  for 300 steps learned the retrieval in 2 of 8 runs with the value said once, in 4 of 9 with
  it said twice, and in all 13 with it said nine times (350 steps).
- The needle goes at the sentence boundary of the haystack nearest `depth` x its filler
  tokens (0 = first, 1 = just before the question). The haystack is whole sentences, then
  the words of the next ones that fit, then one-token words up to the exact length.
- Seeded: the same (seed, stream, length, depth, index) gives the same prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import numpy as np

from llama3_jax.config import ConfigError

HEADER = "Read the text below."
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The special magic number is {value}. Say it again: {again}."
AGAIN = 8  # the needle's repeats of the value after the first
QUESTION = "What is the special magic number? The special magic number is"
ANSWER = " {value}."
PADS = ("go", "we", "and", "the", "is")  # one-token words that end a haystack on its exact length
MIN_VALUES = 10
# Streams of random numbers: evaluation trials and training documents never share one.
EVAL_STREAM, DATA_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Trial:
    length: int                # prompt + answer + end-of-text, in tokens
    depth: float               # the requested depth of the needle, 0..1
    value: str                 # the number to retrieve
    prompt: list[int]          # token ids, BOS first
    answer: list[int]          # the answer's ids (" 45.")
    text: str                  # the prompt's text (no BOS)
    needle: tuple[int, int]    # [start, end) of the needle in `prompt`
    haystack: tuple[int, int]  # [start, end) of the filler and the needle in `prompt`

    @property
    def filler_tokens(self) -> int:
        return self.haystack[1] - self.haystack[0] - (self.needle[1] - self.needle[0])

    @property
    def actual_depth(self) -> float:
        """Where the needle went: filler tokens before it / all filler tokens."""
        return (self.needle[0] - self.haystack[0]) / self.filler_tokens

    def document(self) -> str:
        """The training document: prompt and answer (the data pipeline adds BOS and EOS)."""
        return self.text + ANSWER.format(value=self.value)


def needle_text(value: str) -> str:
    return " " + NEEDLE.format(value=value, again=", ".join([value] * AGAIN))


class Task:
    """The task for one tokenizer (a `llama3_jax.Tokenizer`: `encode`, `decode`, `bos_id`)."""

    def __init__(self, tok):
        self.tok = tok
        self._fills: dict[int, tuple] = {}
        self.header = self.encode(HEADER)  # the first piece: no space before it
        self.question = self.encode(" " + QUESTION)
        self.sentences = [self.encode(" " + s) for s in FILLER]
        self.values = [str(v) for v in range(10, 1000) if len(self.encode(str(v))) == 1]
        if len(self.values) < MIN_VALUES:
            raise ConfigError(f"this tokenizer encodes {len(self.values)} numbers of 10-999 as one token; the needle "
                              f"task needs at least {MIN_VALUES} (a Llama 3 style byte-level BPE)")
        answers = {len(self.encode(ANSWER.format(value=v))) for v in self.values}
        needles = {len(self.encode(needle_text(v))) for v in self.values}
        pads = [" " + w for w in PADS if len(self.encode(" " + w)) == 1]
        if len(answers) != 1 or len(needles) != 1 or not pads:
            raise ConfigError("this tokenizer splits the needle's words unlike a Llama 3 style byte-level BPE; the "
                              "needle task cannot build prompts of an exact length with it")
        self.answer_tokens, self.needle_tokens, self.pad = answers.pop(), needles.pop(), pads[0]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, bos=False, eos=False)

    @property
    def min_length(self) -> int:
        """The shortest length that holds the needle, the question and the answer, with the
        longest filler sentence."""
        longest = max(map(len, self.sentences))
        return 1 + len(self.header) + self.needle_tokens + longest + len(self.question) + self.answer_tokens + 1

    def check_length(self, length: int, max_seq_len: int | None = None, what: str = "length") -> None:
        if length < self.min_length:
            raise ConfigError(f"{what} {length} is too short to hold the needle and the question with this "
                              f"tokenizer; give lengths of at least {self.min_length}")
        if max_seq_len is not None and length > max_seq_len:
            raise ConfigError(f"{what} {length} is above the model's max_seq_len={max_seq_len}; give lengths up "
                              f"to {max_seq_len}")

    def trial(self, length: int, depth: float, rng: np.random.Generator) -> Trial:
        """A prompt of exactly `length` - answer - 1 tokens with the needle at `depth`."""
        self.check_length(length)
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"depth {depth} is outside [0, 1]; depths are fractions of the haystack")
        value = self.values[int(rng.integers(len(self.values)))]
        budget = length - self.answer_tokens - 1 - 1 - len(self.header) - self.needle_tokens - len(self.question)
        texts, ids, bounds = self.fill(budget)
        cut = min(range(len(bounds)), key=lambda i: (abs(bounds[i] - depth * budget), i))
        at = bounds[cut]  # the needle goes after the first `cut` pieces of filler
        start = 1 + len(self.header)
        prompt = [self.tok.bos_id, *self.header, *ids[:at], *self.encode(needle_text(value)), *ids[at:],
                  *self.question]
        text = "".join([HEADER, *texts[:cut], needle_text(value), *texts[cut:], " " + QUESTION])
        out = Trial(length, float(depth), value, prompt, self.encode(ANSWER.format(value=value)), text,
                    (start + at, start + at + self.needle_tokens), (start, start + budget + self.needle_tokens))
        if len(prompt) != length - self.answer_tokens - 1 or self.tok.encode(text, bos=True) != prompt:
            raise ConfigError("this tokenizer does not encode the needle prompt piece by piece as it encodes the "
                              "whole; the needle task needs a byte-level BPE with the Llama 3 pre-tokenizer")
        return out

    def fill(self, budget: int) -> tuple[list[str], list[int], list[int]]:
        """Filler of exactly `budget` tokens: (text pieces, ids, the token offsets where a
        piece starts, and the end). Whole sentences, cycled, while they fit; then the words
        of the next ones while they fit; then one-token pad words."""
        if budget in self._fills:
            return self._fills[budget]
        texts, ids, bounds = [], [], [0]
        while len(ids) + len(self.sentences[len(texts) % len(FILLER)]) <= budget:
            ids += self.sentences[len(texts) % len(FILLER)]
            texts.append(" " + FILLER[len(texts) % len(FILLER)])
            bounds.append(len(ids))
        tail = []
        for word in (" " + w for s in FILLER[len(texts) % len(FILLER):] + FILLER for w in s.split()):
            if len(ids) + len(self.encode(word)) > budget:
                break
            tail.append(word)
            ids += self.encode(word)
        tail += [self.pad] * (budget - len(ids))
        ids += self.encode(self.pad) * (budget - len(ids))
        if tail:
            texts.append("".join(tail))
            bounds.append(len(ids))
        self._fills[budget] = texts, ids, bounds
        return texts, ids, bounds

    def document(self, length: int, rng: np.random.Generator) -> str:
        """A training document of exactly `length` tokens with BOS and EOS, depth uniform."""
        return self.trial(length, float(rng.uniform()), rng).document()


@functools.lru_cache(maxsize=8)
def task_for(tok) -> Task:
    return Task(tok)


def trial_rng(seed: int, stream: int, length: int, depth_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, length, depth_index, index])


def write_corpus(tok, length: int, docs: int, out, seed: int = 0) -> pathlib.Path:
    """`docs` training documents of `length` tokens (BOS and EOS included) as JSONL, field "text"."""
    task = task_for(tok)
    task.check_length(length, what="--length")
    if docs < 1:
        raise ConfigError(f"--docs {docs}: give at least one document")
    out = pathlib.Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a .jsonl file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": task.document(length, trial_rng(seed, DATA_STREAM, length, 0, i))}) + "\n")
    return out
