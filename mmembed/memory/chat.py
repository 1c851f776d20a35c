"""The `mmembed chat` loop: lines in, answers out, every turn through a `Session`.

    > What colour is <image:star.png>?
    red
      recalled: #12 image 0.81 · #15 text 0.44 "a red star"
    > /history    this session's turns        /forget    delete everything this user remembers
    > /quit       leave (the memory keeps the conversation; the next chat continues it)

Any other line starting with `/` is an unknown command, said so and not sent (`//…` sends `/…`).

Inline media (`<image:path>`, `<audio:path>`) resolve against the working directory, and
`<text:caption>` is a caption read as its vector; a missing file, an unreadable one or an
over-long prompt is one line (on the error stream) and the chat goes on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple, TextIO

from mmembed.decoder.prompt import parse_inline
from mmembed.errors import UserError
from mmembed.memory.session import Session
from mmembed.memory.records import MemoryHit
from mmembed.terminal import printable as shown

COMMANDS = "commands: /history, /forget, /quit"
COMMAND_WORDS = ("/history", "/forget", "/quit")
HELP = f"{COMMANDS}; media inline as <image:path>, <audio:path> or <text:caption>"
class ChatTally(NamedTuple):
    answered: int  # turns the decoder answered (and the memory stored)
    refused: int  # lines refused: a turn's error, an unknown command, a command given an argument


def run_chat(session: Session, lines: Iterable[str], out: TextIO, prompt: str = "> ", err: TextIO | None = None,
             **generate: Any) -> ChatTally:
    """Answer every line of `lines` until `/quit` or the end of input; returns what was answered and refused.

    Answers, histories and replies to commands go to `out`; the help line and each refused line's
    message to `err` (default `out`), so a scripted chat can tell them apart.
    """
    answered, refused, err = 0, 0, err or out
    err.write(f"{HELP}\n")
    err.flush()
    out.write(prompt)
    out.flush()
    for number, line in enumerate(lines):
        line = line.removeprefix("\ufeff").strip() if number == 0 else line.strip()  # a byte-order mark
        if line == "/quit":
            break
        try:
            if line.split()[:1] in (["/history"], ["/forget"], ["/quit"]) and line not in COMMAND_WORDS:
                raise UserError(f"{line.split()[0]} takes no arguments ({COMMANDS})")
            elif line == "/history":  # the whole session (history() keeps its last 50 items: turn 1 vanished)
                for h in session.history(limit=2**62):
                    out.write(f"  {_describe(h)}\n")
            elif line == "/forget":
                out.write(f"forgot {session.forget()} item(s)\n")
            elif line.startswith("/") and not line.startswith("//"):
                raise UserError(f"unknown command {line.split()[0]} ({COMMANDS}; "
                                "start a message with // to send one that begins with /)")
            elif line:
                answer = session.ask(parse_inline(line[1:] if line.startswith("//") else line), **generate)
                answered += 1
                # one line, escaped as /history shows it (a sampled answer held ESC, NUL, newlines)
                out.write(f"{shown(answer.text)}\n")
                if answer.recalled:
                    out.write("  recalled: " + " · ".join(_describe(h) for h in answer.recalled) + "\n")
        except UserError as e:  # a bad line is one line; the conversation goes on
            refused += 1
            err.write(f"error: {e}\n")
            err.flush()
        out.write(prompt)
        out.flush()
    out.write("\n")
    return ChatTally(answered, refused)


def _describe(h: MemoryHit) -> str:
    """One line for a remembered item; its text quoted with control characters, quotes and
    backslashes escaped: a stored text (anyone who reaches `mmembed serve` can store one for any
    user) printed raw could retitle the terminal, write its clipboard or forge history lines."""
    score = "" if h.score is None else f" {h.score:.2f}"
    text = f' "{shown(h.text, quoted=True)}"' if h.text else ""
    return f"#{h.id} {h.role} {h.modality}{score}{text}"
