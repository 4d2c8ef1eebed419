"""Streaming text output: incremental detokenization and stop strings.

    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=True)
    stops = StopStringMatcher(["\\n\\nUser:"])
    for token_id in generated:
        text, hit = stops.feed(detok.add(token_id))
        send(text)
        if hit:
            break
    else:
        send(stops.feed(detok.flush())[0] + stops.flush())

`IncrementalDetokenizer` turns one token at a time into text deltas. A character
whose UTF-8 bytes are spread over several tokens (Chinese, emoji with byte-level
BPE or sentencepiece byte fallback) is held back until it is complete, so a delta
never carries a U+FFFD placeholder that a later token would have turned into a
real character. Each step decodes only a short window of ids (the vLLM "prefix
offset / read offset" technique), so its cost does not grow with the output.

`StopStringMatcher` cuts the text stream at the first stop string and never lets
out a piece of text that might still turn out to be the start of one.
"""

import numbers

REPLACEMENT_CHAR = "\ufffd"

# Prompt ids kept as left context: enough for any decoder that looks at the
# previous token (sentencepiece's dummy-prefix space, byte runs of one character).
PROMPT_CONTEXT_TOKENS = 5

# When this many ids have arrived without the text ever ending on a whole
# character (a long run of invalid bytes, or list-adds that keep splitting
# characters), the window is moved forward to a boundary that is verified to
# split the text cleanly, so a step never decodes more than about this many ids.
MAX_HELD_TOKENS = 16

# Ids kept after such a boundary: a UTF-8 character has at most 4 bytes and each
# byte-carrying token at least one, so a character that begins before the boundary
# is fully decided by then, whatever comes later.
SETTLE_MARGIN = 4


class IncrementalDetokenizer:
    """Text deltas for a growing sequence of generated token ids.

    The deltas, followed by `flush()`, concatenate to exactly
    `tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`
    when no `prompt_ids` are given. With `prompt_ids` the output is decoded as the
    continuation of the prompt: it is what decoding prompt + output adds after the
    prompt's text, so e.g. the leading space of a sentencepiece word is kept.
    (transformers' clean_up_tokenization_spaces is a whole-text rewrite and is not
    applied while streaming; DeepSeek's tokenizers have it off.)

    Text is emitted up to the last complete character; only a trailing run of U+FFFD
    (an unfinished character, or invalid bytes that might still be followed by one)
    waits for more ids or for `flush()`.

    `prompt_ids` should end on a whole character, as every encode() result does.
    `tokenizer` is anything with `decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=...)`.
    """

    def __init__(self, tokenizer, prompt_ids=None, skip_special_tokens=False):
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(i) for i in prompt_ids[-PROMPT_CONTEXT_TOKENS:]] if prompt_ids is not None else []
        # The window starts at the prefix offset: ids before it no longer affect the text.
        # window[:_read] decodes to text that is already emitted (or is prompt context),
        # and _extra more characters of the window's text have been emitted after it.
        self._window = context
        self._read = len(context)
        self._read_len = None          # len(decode(window[:_read])), computed when needed
        self._extra = 0
        self.output_ids = []
        self._deltas = []

    @property
    def text(self):
        """Everything emitted so far."""
        return "".join(self._deltas)

    def _decode(self, ids):
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                      clean_up_tokenization_spaces=False)

    def add(self, token_ids):
        """Append one token id (or a list of them); returns the text that is now final."""
        if isinstance(token_ids, numbers.Integral):
            new = [int(token_ids)]
        else:
            new = [int(i) for i in token_ids]
        if not new:
            return ""
        self.output_ids.extend(new)
        self._window.extend(new)
        return self._emit(force=False)

    def flush(self):
        """Text still held back at the end of generation (an unfinished character shows as U+FFFD)."""
        return self._emit(force=True)

    def _emit(self, force):
        window = self._window
        if self._read == len(window):
            return ""
        if self._read_len is None:
            self._read_len = len(self._decode(window[:self._read]))
        emitted = self._read_len + self._extra
        full = self._decode(window)
        if force or not full.endswith(REPLACEMENT_CHAR):
            # the text ends on a whole character: everything is final
            self._advance(len(window), context_has_text=len(full) > self._read_len)
            return self._out(full[emitted:])
        stable = len(full.rstrip(REPLACEMENT_CHAR))
        delta = full[emitted:stable]
        emitted = max(emitted, stable)
        self._extra = emitted - self._read_len
        if len(window) - self._read > MAX_HELD_TOKENS:
            delta += self._settle(full, emitted)
        return self._out(delta)

    def _advance(self, new_read, context_has_text):
        """Everything up to new_read is emitted; the ids since the old read offset become the
        left context. Context that renders no text (skipped special tokens) cannot anchor
        decoders that treat the first visible piece specially (sentencepiece drops its
        leading space), so then the older context is kept as well."""
        start = self._read
        if not context_has_text and len(self._window) <= 4 * MAX_HELD_TOKENS:
            start = 0
        self._window = self._window[start:]
        self._read = new_read - start
        self._read_len = None
        self._extra = 0

    def _settle(self, full, emitted):
        """Move the offsets to a verified clean split near the end of the window; returns the
        text (permanent U+FFFDs) that this makes final, if any."""
        window, read = self._window, self._read
        for cut in range(len(window) - SETTLE_MARGIN, len(window) - SETTLE_MARGIN - 4, -1):
            if cut <= read:
                break
            head = self._decode(window[:cut])
            if not full.startswith(head):
                continue  # the cut splits a character
            # the new window starts as close to the cut as possible, where its own text
            # continues exactly where `head` stops
            for start in range(cut - 1, read - 1, -1):
                before = self._decode(window[start:cut])
                if not before:
                    continue
                after = self._decode(window[start:])
                if after.startswith(before) and after[len(before):] == full[len(head):]:
                    self._window = window[start:]
                    self._read = cut - start
                    self._read_len = len(before)
                    self._extra = max(emitted, len(head)) - len(head)
                    return full[emitted:len(head)]
        return ""

    def _out(self, delta):
        if delta:
            self._deltas.append(delta)
        return delta


class StopStringMatcher:
    """Finds stop strings in a stream of text deltas.

    `feed(delta)` returns `(text, stop)`: `text` is safe to show now; `stop` is the
    stop string that was found (generation should end, and `text` ends right before
    it) or None. A tail that could still become a stop string is held back and
    comes out with a later delta, or from `flush()` once generation ends without
    a match. The result does not depend on how the text was split into deltas:
    the stop that completes first in the text wins (for two completing at the same
    character, the one starting earlier, i.e. the longer).
    """

    def __init__(self, stop):
        if isinstance(stop, str):
            stop = [stop]
        # an empty stop string would match everywhere; OpenAI-style APIs ignore it
        self.stops = [s for s in (stop or []) if s]
        self._held = ""
        self.matched = None

    @property
    def stopped(self):
        return self.matched is not None

    def feed(self, delta):
        if self.matched is not None:
            return "", None
        text = self._held + delta
        if not self.stops:
            self._held = ""
            return text, None
        best = None
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                if best is None or key < best[0]:
                    best = (key, stop)
        if best is not None:
            (_, start), stop = best
            self._held = ""
            self.matched = stop
            return text[:start], stop
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], None

    def _partial_suffix(self, text):
        """Length of the longest end of `text` that is a proper beginning of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self):
        """Held-back text once the stream has ended without a stop."""
        text, self._held = self._held, ""
        return text
