"""Pronounceable made-up words for names, cities, companies, majors, universities.

Invented words keep the synthetic world free of facts a pretrained model may
already know, so everything it answers must come from the generated corpus.
Words are built from simple onset + vowel + coda syllables; a coda is always
followed by a single-consonant onset so no unpronounceable clusters appear.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Onsets: the first _N_SIMPLE_ONSETS are single consonants (allowed after a coda).
_SIMPLE_ONSETS: tuple[str, ...] = (
    "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
)
_CLUSTER_ONSETS: tuple[str, ...] = (
    "br", "ch", "cl", "dr", "fl", "gr", "kr", "pl", "pr", "sh", "st", "th", "tr", "vr",
)
_ONSETS: tuple[str, ...] = _SIMPLE_ONSETS + _CLUSTER_ONSETS
_N_SIMPLE_ONSETS = len(_SIMPLE_ONSETS)
_NUCLEI: tuple[str, ...] = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "a", "ai", "ea", "io", "ou")
# Codas inside a word stay simple; the last syllable may also take a cluster.
_INNER_CODAS: tuple[str, ...] = ("", "", "", "", "", "", "n", "r", "l", "s", "m")
_FINAL_CODAS: tuple[str, ...] = _INNER_CODAS + ("n", "r", "x", "nd", "rk", "th", "s", "l")
_P_VOWEL_START = 0.15

_MAX_BATCH = 16384
# A round yielding fewer than batch/_STALL_RATIO new words counts as stalled;
# this many stalled rounds in a row means the syllable space is exhausted.
_STALL_RATIO = 1000
_MAX_STALLED_ROUNDS = 5


def _draw_words(rng: np.random.Generator, m: int, min_syl: int, max_syl: int) -> list[str]:
    """Draw m candidate words (possibly repeating) with vectorised index draws."""
    n_syl = rng.integers(min_syl, max_syl + 1, size=m)
    onset = rng.integers(0, len(_ONSETS), size=(m, max_syl))
    simple = rng.integers(0, _N_SIMPLE_ONSETS, size=(m, max_syl))
    nucleus = rng.integers(0, len(_NUCLEI), size=(m, max_syl))
    inner = rng.integers(0, len(_INNER_CODAS), size=(m, max_syl))
    final = rng.integers(0, len(_FINAL_CODAS), size=m)
    vowel_start = rng.random(m) < _P_VOWEL_START
    words: list[str] = []
    for i in range(m):
        k = int(n_syl[i])
        parts: list[str] = []
        prev_coda = ""
        for j in range(k):
            if j == 0:
                on = "" if vowel_start[i] else _ONSETS[onset[i, j]]
            elif prev_coda:
                on = _SIMPLE_ONSETS[simple[i, j]]
                if on == prev_coda:  # no doubled consonants such as "rr"
                    on = _SIMPLE_ONSETS[(simple[i, j] + 1) % _N_SIMPLE_ONSETS]
            else:
                on = _ONSETS[onset[i, j]]
            coda = _FINAL_CODAS[final[i]] if j == k - 1 else _INNER_CODAS[inner[i, j]]
            parts.append(on + _NUCLEI[nucleus[i, j]] + coda)
            prev_coda = coda
        words.append("".join(parts).capitalize())
    return words


def make_word_pool(
    n: int,
    seed: int,
    min_syllables: int = 2,
    max_syllables: int = 3,
    exclude: Iterable[str] = frozenset(),
) -> list[str]:
    """Return n distinct capitalised letter-only words, none in ``exclude``.

    Deterministic in all arguments; pass the words of previously built pools in
    ``exclude`` to keep the pools of one world mutually disjoint.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"make_word_pool: n={n!r} is invalid; pass an integer >= 0.")
    if not (1 <= min_syllables <= max_syllables):
        raise ValueError(
            f"make_word_pool: min_syllables={min_syllables!r}, max_syllables={max_syllables!r} "
            "are invalid; need 1 <= min_syllables <= max_syllables."
        )
    banned = {w.capitalize() for w in exclude}
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    stalled = 0
    while len(out) < n:
        missing = n - len(out)
        before = len(out)
        batch = min(_MAX_BATCH, max(64, 2 * missing))
        for w in _draw_words(rng, batch, min_syllables, max_syllables):
            if w in seen or w in banned:
                continue
            seen.add(w)
            out.append(w)
            if len(out) == n:
                break
        gained = len(out) - before
        stalled = stalled + 1 if gained * _STALL_RATIO < batch and len(out) < n else 0
        if stalled >= _MAX_STALLED_ROUNDS:
            raise ValueError(
                f"make_word_pool: could only make {len(out)} of n={n} distinct words with "
                f"{min_syllables}..{max_syllables} syllables; raise max_syllables or lower n."
            )
    return out
