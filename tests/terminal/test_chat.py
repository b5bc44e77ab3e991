#!/usr/bin/env python3
"""`moe-edge chat` on a real terminal (a pseudo-terminal, standard library only), as a person uses it:

    python3 tests/terminal/test_chat.py target/debug/moe-edge

- a reply streams and ends at the prompt; `/stats` reports it (tokens, tok/s, why it stopped);
- Ctrl-C during a long reply stops that reply, not the program: `/stats` then says Cancelled with
  fewer tokens than the same message's reply uninterrupted (same seed, after `/reset`);
- Ctrl-C at the prompt does not cancel the next reply;
- `/system TEXT` and `/reset` answer; Ctrl-D on an empty line exits with status 0.

Builds the chat-capable tiny model (models/tiny-mixtral with the chat fixtures' tokenizer and ChatML
template) in a temporary directory. Prints 'N passed' and exits non-zero on any failure.
"""
import os
import pathlib
import pty
import re
import select
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import ROOT, chat_model  # noqa: E402
MESSAGE = "Tell me everything about compression."
# sampled with this seed, the reply runs until the context is full (182 tokens): long enough to cut
ARGS = ["--system", "Be brief.", "--temperature", "1", "--seed", "2", "--max-tokens", "230"]


class Terminal:
    """A program on a pseudo-terminal: what it printed, and keys typed at it."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvp(argv[0], argv)
        self.out = b""

    def read_until(self, pattern, timeout=120):
        """Reads until `pattern` (a regex over everything printed since `mark`) matches."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.out[self.mark:]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; the terminal shows:\n"
                                     f"{self.out[self.mark:].decode(errors='replace')}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the program ended while waiting for {pattern!r}:\n"
                                         f"{self.out[self.mark:].decode(errors='replace')}")
                self.out += chunk
        return self.out[self.mark:]

    def type(self, keys):
        self.mark = len(self.out)
        os.write(self.fd, keys)

    def wait(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.05)[0]:
                    self.out += os.read(self.fd, 65536)
            except OSError:
                pass
        raise AssertionError("the program did not exit")


STATS = rb"last reply: \d+ prompt tokens fed at [\d.]+ tok/s, (\d+) generated at [\d.]+ tok/s \((\w+)\)"


def main():
    binary = str(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target/debug/moe-edge").resolve())
    runner = os.environ.get("MOE_EDGE_TEST_RUNNER", "").split()
    passed = 0

    def ok(name):
        nonlocal passed
        passed += 1
        print("ok  ", name)

    with tempfile.TemporaryDirectory() as tmp:
        model = pathlib.Path(tmp)
        chat_model(model)
        term = Terminal(runner + [binary, "chat", "-m", str(model), *ARGS])
        term.mark = 0
        term.read_until(rb"Ctrl-D exits")
        term.read_until(rb"> $")
        ok("the interactive chat starts with its help and a prompt")

        # the reference: the same message answered uninterrupted
        term.type(MESSAGE.encode() + b"\r")
        term.read_until(rb"\n> $")
        term.type(b"/stats\r")
        stats = term.read_until(STATS)
        full, reason = re.search(STATS, stats).groups()
        full = int(full)
        assert reason == b"ContextFull" and full >= 100, stats
        ok(f"a reply streams to the end and /stats reports it ({full} tokens, {reason.decode()})")

        # Ctrl-C during the reply stops it, and the program goes on
        term.type(b"/reset\r")
        term.read_until(rb"\(conversation forgotten\)\r?\n> $")
        term.type(MESSAGE.encode() + b"\r")
        term.read_until(re.escape(MESSAGE.encode()) + rb"\r?\n.")  # the reply has begun
        term.type(b"\x03")
        term.read_until(rb"\n> $")
        term.type(b"/stats\r")
        stats = term.read_until(STATS)
        cut, reason = re.search(STATS, stats).groups()
        assert reason == b"Cancelled" and int(cut) < full, stats
        ok(f"Ctrl-C stops the reply ({int(cut)} of {full} tokens), not the program")

        # Ctrl-C at the prompt does not cancel the next reply
        term.type(b"\x03")
        time.sleep(0.3)
        term.type(b"/reset\r")
        term.read_until(rb"\(conversation forgotten\)\r?\n> $")
        term.type(MESSAGE.encode() + b"\r")
        term.read_until(rb"\n> $")
        term.type(b"/stats\r")
        stats = term.read_until(STATS)
        n, reason = re.search(STATS, stats).groups()
        assert reason == b"ContextFull" and int(n) == full, stats
        ok("Ctrl-C at the prompt leaves the next reply whole")

        term.type(b"/system Answer in German.\r")
        term.read_until(rb"\(system message set\)")
        ok("/system sets the system message")

        term.type(b"\x04")
        code = term.wait()
        assert code == 0, f"exit status {code}"
        ok("Ctrl-D exits with status 0")
    print(f"{passed} passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAIL", e)
        sys.exit(1)
