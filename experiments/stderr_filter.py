"""Copies standard input to standard output as it arrives, leaving out one known kind of dependency noise.

`cli.run` puts this program between a command's file descriptor 2 and the terminal. After a write fails
inside an asynchronous checkpoint (a disk that filled during the save), orbax closes its event loop while
tensorstore's writer threads still deliver their results to it; each delivery prints, at the C level, a
traceback that lies entirely inside asyncio and ends in "RuntimeError: Event loop is closed". The failure
itself reaches the user as the command's one error line. Everything else passes through unchanged and at
once (progress bars, other tracebacks), and, being a separate process, this survives a native crash of the
command, whose faulthandler output still gets through. Standard library only (it runs with `python -S`).
"""

import os
import sys

HEADER = b"Traceback (most recent call last):"
NOISE = b"RuntimeError: Event loop is closed"


def is_noise(block: bytes) -> bool:
  """A whole traceback block: every frame inside asyncio, and the last line the closed-loop error."""
  lines = block.rstrip(b"\n").split(b"\n")
  frames = [line for line in lines if line.startswith(b'  File "')]
  return lines[-1].strip() == NOISE and bool(frames) and all(b"asyncio" in f for f in frames)


def block_end(buf: bytes) -> int:
  """Where the traceback at the start of `buf` ends: after its first complete unindented line, or before the
  next traceback header; -1 while incomplete."""
  start = buf.find(b"\n") + 1
  while 0 < start < len(buf):
    if buf.startswith(HEADER, start):
      return start
    end = buf.find(b"\n", start)
    if end < 0:
      return -1
    if not buf[start : start + 1].isspace():
      return end + 1
    start = end + 1
  return -1


def filter_stream(read, write) -> int:
  """Copies read() chunks to write() until read() returns b''; returns how many noise blocks were left out.

  Text passes at once, except a traceback (held until its last line, then written or dropped) and a tail that
  may still become a traceback header (held until it cannot). A header may follow a progress bar's partial
  line, so it is looked for anywhere."""
  buf, dropped = b"", 0
  while True:
    chunk = read()
    buf += chunk
    eof = not chunk
    while buf:
      if buf.startswith(HEADER):
        end = block_end(buf)
        if end < 0 and not eof:
          break  # the block is not complete yet
        block, buf = (buf, b"") if end < 0 else (buf[:end], buf[end:])
        if is_noise(block):
          dropped += 1
        else:
          write(block)
        continue
      at = buf.find(HEADER)
      if at > 0:
        write(buf[:at])
        buf = buf[at:]
        continue
      keep = next((k for k in range(min(len(HEADER) - 1, len(buf)), 0, -1) if HEADER.startswith(buf[-k:])), 0)
      keep = 0 if eof else keep
      write(buf[: len(buf) - keep])
      buf = buf[len(buf) - keep :]
      break
    if eof:
      if buf:
        write(buf)
      return dropped


def main() -> None:
  out = sys.stdout.fileno()

  def write(data: bytes) -> None:
    while data:
      data = data[os.write(out, data) :]

  filter_stream(lambda: os.read(0, 65536), write)


if __name__ == "__main__":
  main()
