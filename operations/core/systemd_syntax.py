"""
Command lines for systemd units, written so systemd reads back exactly the words meant.

systemd does not parse ExecStart= like a POSIX shell (systemd.service(5), "Command lines"): C-style
escapes apply inside quotes too (``\\n``, ``\\\\``), ``%`` starts a specifier and ``$`` a variable
even inside quotes, and a lone unquoted ``;`` separates commands. A word of plain characters is
written as it is; any other is double-quoted with ``\\`` and ``"`` escaped, then ``%`` → ``%%`` and
``$`` → ``$$``. Control characters (a newline would end the line) cannot be written: refused.
"""

import re

PLAIN = re.compile(r"[A-Za-z0-9_./:=,@+-]+")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control_characters(text):
    return bool(CONTROL.search(text))


def word(text):
    """One argument as an ExecStart= word."""
    if has_control_characters(text):
        raise ValueError(f"{text!r}: control characters (newline, tab, ...) cannot be passed through a systemd unit")
    if not PLAIN.fullmatch(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text.replace("%", "%%").replace("$", "$$")


def command_line(words):
    """Words as one ExecStart= command line (the executable first)."""
    return " ".join(word(text) for text in words)
