"""Subject-verb agreement minimal pairs: a synthetic generator and a loader for the LGD TSV format.

Generator (in the style of Marvin & Linzen 2018): sentences of a small English grammar whose main
verb is masked, with the two candidate verb forms (the correct and the wrong number)::

    simple     the (adj) N [MASK] ...
    pp         the (adj) N P the (adj) N2 (P the (adj) N3 ...) [MASK] ...
    subj_rc    the (adj) N that Vt(N) the (adj) N2 (P the (adj) N3) [MASK] ...
    obj_rc     the (adj) N that the (adj) N2 (P the (adj) N3) Vt(N2) [MASK] ...

N is the subject; every noun between it and the masked verb is *intervening*; an intervening noun
whose number differs from the subject's is an *attractor* (Linzen et al. 2016). The masked verb is
one of is/are, was/were, has/have or a regular verb (laughs/laugh, ...), followed by a short
continuation. Subjects alternate singular / plural, so the classes are balanced.

Loader: the TSV of Goldberg (2019), built from Linzen et al. (2016)'s data, one pair per line::

    n_attractors <TAB> original sentence <TAB> masked sentence (***mask***) <TAB> good verb <TAB> bad verb

Its sentences are real text: subject and attractor positions are not annotated (no parser here),
so the analyses that need them use only what the file provides.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..errors import GradGraphError

__all__ = ["AgreementPair", "make_pairs", "load_lgd_tsv", "sentence_words", "NOUNS", "VERB_PAIRS",
           "STRUCTURES", "MASK", "SvaDataError", "corpus_words"]

MASK = "[MASK]"

NOUNS = [("author", "authors"), ("pilot", "pilots"), ("surgeon", "surgeons"), ("farmer", "farmers"),
         ("manager", "managers"), ("customer", "customers"), ("officer", "officers"),
         ("teacher", "teachers"), ("senator", "senators"), ("dancer", "dancers"), ("guard", "guards"),
         ("doctor", "doctors"), ("lawyer", "lawyers"), ("painter", "painters"),
         ("student", "students"), ("minister", "ministers")]
ADJECTIVES = ["old", "young", "tall", "famous", "rich", "quiet", "new", "brave"]
PREPOSITIONS = ["near", "behind", "beside", "with", "above", "from"]
#: transitive verbs of the relative clauses: (3rd person singular, plural)
TRANSITIVE = [("likes", "like"), ("admires", "admire"), ("hates", "hate"), ("knows", "know"),
              ("loves", "love"), ("meets", "meet")]
#: masked main verbs: (singular, plural) -> continuations that may follow
VERB_PAIRS = {
    ("is", "are"): [["happy"], ["tired"], ["here"], ["late"], ["very", "happy"]],
    ("was", "were"): [["happy"], ["tired"], ["here"], ["late"], ["very", "tired"]],
    ("has", "have"): [["left"], ["arrived"], ["won"], ["left", "early"]],
    ("laughs", "laugh"): [[], ["often"], ["loudly"]],
    ("smiles", "smile"): [[], ["often"], ["a", "lot"]],
    ("swims", "swim"): [[], ["often"], ["well"]],
    ("sleeps", "sleep"): [[], ["late"], ["well"]],
    ("waits", "wait"): [[], ["here"], ["outside"]],
}
STRUCTURES = ("simple", "pp", "subj_rc", "obj_rc")
#: the fewest and most intervening nouns each structure can have
INTERVENING = {"simple": (0, 0), "pp": (1, 3), "subj_rc": (1, 2), "obj_rc": (1, 2)}


class SvaDataError(GradGraphError):
    """Bad agreement data (an unreadable TSV line, an impossible request)."""


@dataclasses.dataclass(frozen=True)
class AgreementPair:
    """One minimal pair: a sentence with its main verb masked and the two verb forms.

    ``words`` holds the masked sentence, :data:`MASK` at ``verb_index``; ``good`` agrees with the
    subject, ``bad`` does not. ``subject_index`` and ``attractor_indices`` are word positions
    (None / () when unknown, as for loaded text). ``plural``: the subject's number.
    """

    words: tuple
    verb_index: int
    good: str
    bad: str
    plural: bool | None
    structure: str
    n_intervening: int
    n_attractors: int
    subject_index: int | None = None
    attractor_indices: tuple = ()
    intervening_indices: tuple = ()

    @property
    def sentence(self):
        """The masked sentence as text."""
        return " ".join(self.words)

    def with_verb(self, verb):
        """The sentence's words with ``verb`` in place of the mask."""
        w = list(self.words)
        w[self.verb_index] = verb
        return w


def _noun_phrase(rng, plural, adj_prob):
    """["the", (adj), noun]; the noun's position is the last."""
    words = ["the"]
    if rng.random() < adj_prob:
        words.append(ADJECTIVES[rng.integers(len(ADJECTIVES))])
    words.append(NOUNS[rng.integers(len(NOUNS))][int(plural)])
    return words


def _one(rng, structure, plural, n_intervening, verbs, adj_prob):
    """Build one pair; intervening nouns' numbers are drawn at random (attractor or not)."""
    words, intervening, attractors = [], [], []

    def add_np(is_plural, role):
        words.extend(_noun_phrase(rng, is_plural, adj_prob))
        if role == "intervening":
            intervening.append(len(words) - 1)
            if is_plural != plural:
                attractors.append(len(words) - 1)
        return len(words) - 1

    subject = add_np(plural, "subject")
    numbers = [bool(rng.integers(2)) for _ in range(n_intervening)]
    if structure == "pp":
        for num in numbers:
            words.append(PREPOSITIONS[rng.integers(len(PREPOSITIONS))])
            add_np(num, "intervening")
    elif structure == "subj_rc":
        words.extend(["that", TRANSITIVE[rng.integers(len(TRANSITIVE))][int(plural)]])
        add_np(numbers[0], "intervening")
        for num in numbers[1:]:
            words.append(PREPOSITIONS[rng.integers(len(PREPOSITIONS))])
            add_np(num, "intervening")
    elif structure == "obj_rc":
        words.append("that")
        add_np(numbers[0], "intervening")
        for num in numbers[1:]:
            words.append(PREPOSITIONS[rng.integers(len(PREPOSITIONS))])
            add_np(num, "intervening")
        # the embedded verb agrees with the embedded subject, not with the main one
        words.append(TRANSITIVE[rng.integers(len(TRANSITIVE))][int(numbers[0])])
    pair = list(verbs)[rng.integers(len(verbs))]
    good, bad = (pair[1], pair[0]) if plural else (pair[0], pair[1])
    verb_index = len(words)
    words.append(MASK)
    cont = VERB_PAIRS[pair]
    words.extend(cont[rng.integers(len(cont))])
    words.append(".")
    return AgreementPair(tuple(words), verb_index, good, bad, plural, structure, n_intervening,
                         len(attractors), subject, tuple(attractors), tuple(intervening))


def make_pairs(n, seed=0, *, structures=STRUCTURES, max_intervening=3, verbs=None, adj_prob=0.3):
    """``n`` agreement minimal pairs, generated deterministically from ``seed``.

    Subjects alternate singular / plural (balanced classes); structures cycle through
    ``structures``; the number of intervening nouns is uniform over what the structure allows up
    to ``max_intervening``; each intervening noun is singular or plural with probability 1/2.

    Parameters
    ----------
    n : int
        Number of pairs.
    seed : int
    structures : sequence of str
        A subset of :data:`STRUCTURES`.
    max_intervening : int
        Cap on intervening nouns (0 gives only simple sentences for every structure that allows 0).
    verbs : sequence of (singular, plural), optional
        Verb pairs to mask (default: all of :data:`VERB_PAIRS`).
    adj_prob : float
        Probability of an adjective before each noun (varies the sentence length).

    Returns
    -------
    list[AgreementPair]

    Examples
    --------
    >>> p = make_pairs(1, seed=3, structures=["pp"])[0]
    >>> p.words[p.verb_index], p.good in ("is", "was", "has", "laughs", "smiles", "swims", "sleeps", "waits")
    ('[MASK]', True)
    """
    unknown = [s for s in structures if s not in STRUCTURES]
    if unknown or not structures:
        raise SvaDataError(f"unknown structures {unknown}; choose from {list(STRUCTURES)}")
    verbs = list(VERB_PAIRS) if verbs is None else [tuple(v) for v in verbs]
    bad_verbs = [v for v in verbs if v not in VERB_PAIRS]
    if bad_verbs:
        raise SvaDataError(f"unknown verb pairs {bad_verbs}; choose from {list(VERB_PAIRS)}")
    usable = [s for s in structures if INTERVENING[s][0] <= max_intervening]
    if not usable:
        raise SvaDataError(f"max_intervening={max_intervening} allows none of {list(structures)}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        structure = usable[i % len(usable)]
        lo, hi = INTERVENING[structure]
        k = int(rng.integers(lo, min(hi, max_intervening) + 1))
        out.append(_one(rng, structure, plural=bool(i % 2), n_intervening=k, verbs=verbs,
                        adj_prob=adj_prob))
    return out


def sentence_words(pair):
    """The grammatical sentence (the good verb in place of the mask) as a list of words."""
    return pair.with_verb(pair.good)


def corpus_words():
    """Every word the generator can produce, in a fixed order (the vocabulary of the shipped model)."""
    words = ["the", "that", ".", "very", "a", "lot"] + ADJECTIVES + PREPOSITIONS
    for sg, pl in NOUNS + TRANSITIVE + list(VERB_PAIRS):
        words += [sg, pl]
    for conts in VERB_PAIRS.values():
        for c in conts:
            words += c
    seen, ordered = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            ordered.append(w)
    return ordered


def load_lgd_tsv(path, *, limit=None):
    """Read agreement pairs from the TSV of Goldberg (2019) (``lgd_dataset.tsv``).

    Each line: ``n_attractors, original sentence, masked sentence, good verb, bad verb``, tab
    separated; the masked sentence holds the token ``***mask***`` once. Words are split on
    whitespace and lower-cased (the uncased BERT models' convention).

    Parameters
    ----------
    path : str
    limit : int, optional
        Read at most this many pairs.

    Returns
    -------
    list[AgreementPair]
        ``structure="lgd"``, ``plural=None`` and no subject / attractor positions (the file does
        not give them).

    Raises
    ------
    SvaDataError
        A missing file, or a line that does not have the five fields, an integer attractor count
        and exactly one mask; the message names the line.
    """
    if not os.path.isfile(path):
        raise SvaDataError(f"no such file: {path}")
    pairs = []
    with open(path, encoding="utf8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 5:
                raise SvaDataError(f"{path}:{lineno}: expected 5 tab-separated fields "
                                   f"(n_attractors, sentence, masked sentence, good, bad), got {len(fields)}")
            n_attr, _orig, masked, good, bad = fields
            try:
                n = int(n_attr)
            except ValueError:
                raise SvaDataError(f"{path}:{lineno}: the attractor count {n_attr!r} is not an integer") from None
            words = masked.split()
            where = [i for i, w in enumerate(words) if w == "***mask***"]
            if len(where) != 1:
                raise SvaDataError(f"{path}:{lineno}: the masked sentence must contain ***mask*** once, "
                                   f"found {len(where)}")
            words = [MASK if i == where[0] else w.lower() for i, w in enumerate(words)]
            pairs.append(AgreementPair(tuple(words), where[0], good.lower(), bad.lower(), None, "lgd",
                                       n, n))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs
