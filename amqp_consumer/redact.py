"""Hide the password of every URL: the one path for logs, config errors and the manhole.

It works on text, not on parsed URLs, so it also covers URLs that do not parse
(which are exactly the ones echoed in config errors), any scheme
(``postgresql://app:secret@db``), and a ``user:password@host`` written without
a scheme. When in doubt it hides too much: a password holding an unencoded
``/``, ``?`` or ``#`` still ends up as ``***``.
"""

from __future__ import annotations

import re

HIDDEN = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_AUTHORITY_END = re.compile(r"[/?#]")
# user:password@ at the start of a token that has no scheme.
_BARE_USERINFO = re.compile(r"^([^\s:/@'\"()\[\]]*):[^@]*@")
# In free text a URL ends at whitespace or a quote.
_TOKEN = re.compile(r"[^\s'\"]+")


def redact(text: str, *, whole: bool = False) -> str:
    """text with the password of each URL in it replaced by ***; everything else as it was.

    whole=True takes text as one value (a config string), so that a password
    with a space or a quote in it is hidden too; otherwise text is free text
    (a log line, an error) in which URLs end at whitespace and quotes.
    """
    if "@" not in text:
        return text
    if whole:
        return _redact_value(text)
    return _TOKEN.sub(lambda m: _redact_value(m.group()) if "@" in m.group() else m.group(), text)


def _redact_value(text: str) -> str:
    heads = [m.end() for m in _SCHEME.finditer(text)]
    if not heads:
        return _BARE_USERINFO.sub(lambda m: f"{m.group(1)}:{HIDDEN}@", text, count=1)
    out: list[str] = []
    done = 0
    for i, start in enumerate(heads):
        if start < done:
            continue
        span = _userinfo(text, start, heads[i + 1] if i + 1 < len(heads) else len(text))
        if span is not None:
            colon, at = span
            out += [text[done : colon + 1], HIDDEN]
            done = at
    out.append(text[done:])
    return "".join(out)


def _userinfo(text: str, start: int, limit: int) -> tuple[int, int] | None:
    """(index of the ':' before the password, index of the '@' after it), or None without a password."""
    end = _AUTHORITY_END.search(text, start, limit)
    authority_end = end.start() if end else limit
    at = text.rfind("@", start, authority_end)
    if at < 0:
        # No '@' in the authority, but a ':': the password may hold a '/', '?'
        # or '#' that ended the authority early, and its '@' comes later.
        colon = text.find(":", start, authority_end)
        at = text.rfind("@", start, limit)
        return (colon, at) if 0 <= colon < at else None
    colon = text.find(":", start, at)
    return (colon, at) if colon >= 0 else None
