"""OpenAI's `stop` on text, not tokens: the answer ends where the first stop string starts (or, asked, ends).

openvino-genai stops generating at a stop string but, when told not to include it, drops whole tokens:
" built the" with stop "the" loses the space that shares a token with "the". So the engine is always
asked to include the stop string, and the text is cut here; while streaming, the end of the text that
could begin a stop string is held back until the next text says whether it does.
"""

from __future__ import annotations

from collections.abc import Collection


class StopText:
    """Feed the generated text piece by piece; get back what can be sent, ending at the first stop string."""

    def __init__(self, stops: Collection[str], *, include: bool) -> None:
        self.stops = tuple(stops)
        self.include = include
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        found = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            at, stop = min(found, key=lambda f: (f[0], -len(f[1])))
            self.stopped, self._held = True, ""
            return text[: at + len(stop)] if self.include else text[:at]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of the generation: what was held back and is no stop string after all."""
        held, self._held = self._held, ""
        return held
