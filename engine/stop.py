"""Stop strings over streamed text: hold back what might start a stop string until it is decided."""

from __future__ import annotations


class StopStringMatcher:
    """Finds the first stop string in text that arrives in pieces (token by token).

    The result does not depend on how the text is split: the match is the stop string that completes
    first (at the earliest end position; the longest one when several end there), as if the text
    had been fed one character at a time.
    """

    def __init__(self, stops: list[str], include_stop_str: bool = False) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = list(stops)
        self.include_stop_str = include_stop_str
        self.matched: str | None = None
        self._held = ""  # emitted text never ends in a prefix of a stop string: that part waits here

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit now, the stop string matched or None).

        After a match the stream is over: the rest of the text is dropped and later feeds emit nothing.
        """
        if self.matched is not None:
            return "", None
        text = self._held + new_text
        found = self._first_match(text)
        if found is not None:
            start, stop = found
            self.matched, self._held = stop, ""
            return text[: start + len(stop)] if self.include_stop_str else text[:start], stop
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """Return the held-back text at the end of the stream (nothing after a match)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -length, stop): earliest end, then longest
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None else min(best, candidate)
        return None if best is None else (best[0] + best[1], best[2])

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
