"""Text from others, made safe to print: one helper for the box and the publisher.

A hostile update server chooses its HTTP reason phrase; a box's report chooses every
string the collector shows; a leftover process chooses its own command name. Any of them
may hold ESC and other control characters that drive the terminal of the operator who
reads the error, ``status``, the log or the fleet table (set its title, clear the screen,
hide text). Everything such text passes through on its way to a terminal or a log goes
through :func:`printable`.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (C0/C1 controls such as ESC,
    DEL, bidi overrides and other invisible format characters) shown as a Python escape."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)
