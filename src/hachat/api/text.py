"""What counts as blank in text people see (group names, message content): one definition.

Usernames need none of this: they are ASCII letters, digits and '._-' with at least one letter
or digit (`auth.USERNAME_PATTERN`).
"""

from __future__ import annotations

import unicodedata

# Letters and symbols that are drawn as nothing: the Hangul fillers (category Lo) and the
# Braille pattern blank (So).
INVISIBLE_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# White space and separators, controls, format characters (U+200B, U+2060, U+FEFF, bidi
# controls, tags...).
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})
# Combining marks: they show only on top of something else.
_MARK_CATEGORIES = frozenset({"Mn", "Mc", "Me"})


def is_blank(text: str) -> bool:
    """True when `text` would show nothing: once white space, controls, format characters,
    the Hangul fillers and the Braille blank are taken away, nothing is left but combining
    marks (which need a visible character to sit on)."""
    for ch in text:
        if ch.isspace() or ch in INVISIBLE_CHARACTERS:
            continue
        category = unicodedata.category(ch)
        if category in _INVISIBLE_CATEGORIES or category in _MARK_CATEGORIES:
            continue
        return False
    return True
