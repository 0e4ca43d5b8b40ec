"""Incremental detokenization with stop strings."""

from __future__ import annotations

# Prompt tokens decoded together with the output, so that the first output token gets the
# leading space or merge that it has in context (SentencePiece-style tokenizers drop it alone).
PREFIX_TOKENS = 6
REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    """Text of one request's output, updated token by token.

    `visible_text` never ends inside a UTF-8 character that later tokens complete, and while
    stop strings are set it holds back the characters that could start one, so a streamed
    stop string is never sent.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.prefix_ids = list(prompt_token_ids[-PREFIX_TOKENS:])
        self.skip_special_tokens = skip_special_tokens
        self.prefix_text = self._decode(self.prefix_ids)
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.output_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self.num_sent_chars = 0  # characters already handed out by take_new_text()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def decode_all(self, output_ids: list[int]) -> str:
        """Text of `output_ids` as a continuation of the prompt."""
        full = self._decode(self.prefix_ids + list(output_ids))
        if full.startswith(self.prefix_text):
            return full[len(self.prefix_text):]
        return self._decode(list(output_ids))

    def update(self, output_ids: list[int]) -> str | None:
        """Re-decode after new tokens; return the stop string that ended the text, if any."""
        previous_len = len(self.text)
        self.text = self.decode_all(output_ids)
        if self.stop:
            search_from = max(0, previous_len - self.max_stop_len)
            hits = [(self.text.find(s, search_from), s) for s in self.stop]
            hits = [(index, s) for index, s in hits if index >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[:index]
                self.stop_reason = stop
                return stop
        return None

    def visible_text(self, finished: bool) -> str:
        """Return the prefix of the text that is safe to send now."""
        if finished:
            return self.text
        end = len(self.text)
        while end > 0 and self.text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        if self.max_stop_len:
            end = min(end, max(0, len(self.text) - (self.max_stop_len - 1)))
        return self.text[:end]

    def take_new_text(self, finished: bool) -> str:
        """Text not handed out yet; advances the cursor."""
        visible = self.visible_text(finished)
        new = visible[self.num_sent_chars:]
        self.num_sent_chars = max(self.num_sent_chars, len(visible))
        return new
