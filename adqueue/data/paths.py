"""File names are bytes on Linux; SQL, JSON and terminals want text. A reversible text form.

Python gives undecodable bytes of a file name as lone surrogates (U+DC80-U+DCFF), which no UTF-8
database, JSON parser or hash accepts. `to_text` turns an OS path into printable text that any
of them takes, and `to_os` turns it back, exactly. A name that is valid UTF-8 without control
characters or backslashes, which is nearly every name, is stored as it is; in any other, a
backslash becomes `\\\\` and each undecodable byte or control character `\\xHH`. Since every
backslash of an original name is escaped, decoding is unambiguous.
"""

from __future__ import annotations

import re

_NEEDS_ESCAPE = re.compile(r"[\\\x00-\x1f\x7f\udc80-\udcff]")
_ESCAPED = re.compile(r"\\(\\|x([0-9a-f]{2}))")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code - 0xDC00 if code >= 0xDC00 else code:02x}"


def _unescape(match: re.Match[str]) -> str:
    if match.group(1) == "\\":
        return "\\"
    code = int(match.group(2), 16)
    return chr(0xDC00 + code if code >= 0x80 else code)  # bytes >= 0x80 came from undecodable ones


def to_text(path: str) -> str:
    """The text form of an OS path (as os.walk or sys.argv give it)."""
    return _NEEDS_ESCAPE.sub(_escape, path) if _NEEDS_ESCAPE.search(path) else path


def to_os(text: str) -> str:
    """The OS path of a text form, ready for open()."""
    return _ESCAPED.sub(_unescape, text) if "\\" in text else text
