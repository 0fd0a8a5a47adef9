"""Sentences, sub-sentences, and the token that closes each sub-sentence.

FGAIF labels (and rewards) every sub-sentence of a response; the reward models read their prediction at the
token that closes it. This file splits text into character spans and maps those spans onto token ids.

Sub-sentence rule (Fine-Grained RLHF's splitter, Wu et al. 2023, which FGAIF uses), written from its
description. Within one sentence, the words are the whitespace-separated tokens, where a token with no letter
or digit (",", ".", "?!", ...) is glued to the word before it, so "heart ," and "heart," are the same word
and our space-separated style splits exactly like ordinary prose. Word i (i >= 1) is a candidate start when
word i-1 ends in one of , ; ! ? and i + MIN_WORDS < number of words (the new piece would have at least
MIN_WORDS + 1 words). A candidate becomes a start when the piece since the previous start has at least
MIN_WORDS words. When that piece is shorter: if the previous start is a later start (not the sentence start)
it is dropped and the candidate becomes the start instead (the short piece joins the piece before it); if the
previous start is the sentence start, the candidate is dropped (the short first piece grows into the next).
So every piece has at least MIN_WORDS words, except a sentence that is shorter than that as a whole.
"""
import bisect

SENTENCE_END = ".!?"
CLOSERS = "\"')]"          # may follow the sentence-end punctuation: he said "hi." Next
SUBSENTENCE_END = ",;!?"
MIN_WORDS = 5


def _trimmed(text, start, end):
    """(start, end) without leading/trailing whitespace; None if nothing is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def split_sentences(text):
    """Sentence spans (start, end): a sentence ends after a run of . ! ? (and closing quotes or brackets)
    that is followed by whitespace or the end of the text, and at every line break. "3.5" does not end a
    sentence; abbreviations such as "e.g. " do (no dictionary of abbreviations, on purpose: offline, rule-based).
    Spans carry no leading/trailing whitespace; text after the last end (a truncated sentence) is a sentence."""
    spans = []
    start, i, n = 0, 0, len(text)
    while i < n:
        if text[i] == "\n":
            end = i
        elif text[i] in SENTENCE_END:
            j = i
            while j < n and text[j] in SENTENCE_END:
                j += 1
            while j < n and text[j] in CLOSERS:
                j += 1
            if j < n and not text[j].isspace():
                i = j
                continue
            end = j
        else:
            i += 1
            continue
        span = _trimmed(text, start, end)
        if span:
            spans.append(span)
        start = i = max(end, i + 1)
    span = _trimmed(text, start, n)
    if span:
        spans.append(span)
    return spans


def _words(text, start, end):
    """Word spans in text[start:end]: whitespace-separated tokens, punctuation-only tokens glued to the word
    before them (a leading punctuation-only token stays a word of its own)."""
    words = []
    i = start
    while i < end:
        if text[i].isspace():
            i += 1
            continue
        j = i
        while j < end and not text[j].isspace():
            j += 1
        if words and not any(c.isalnum() for c in text[i:j]):
            words[-1] = (words[-1][0], j)
        else:
            words.append((i, j))
        i = j
    return words


def subsentence_starts(words):
    """Indices of the words that start a sub-sentence (the module docstring's rule); `words` are strings."""
    starts = [0]
    for i in range(1, len(words)):
        if words[i - 1][-1] not in SUBSENTENCE_END or i + MIN_WORDS >= len(words):
            continue
        if i - starts[-1] >= MIN_WORDS:
            starts.append(i)
        elif starts[-1] != 0:
            starts[-1] = i
    return starts


def split_subsentences(text):
    """Sub-sentence spans (start, end) in text order; together they cover the text except whitespace."""
    spans = []
    for sent_start, sent_end in split_sentences(text):
        words = _words(text, sent_start, sent_end)
        starts = subsentence_starts([text[s:e] for s, e in words])
        for k, first in enumerate(starts):
            last = (starts[k + 1] if k + 1 < len(starts) else len(words)) - 1
            spans.append((words[first][0], words[last][1]))
    return spans


def _common_prefix_len(a, b):
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_char_ends(token_ids, decode):
    """For each token, the character end of its text in decode(token_ids), from decoding growing prefixes.

    The end of token k is the length of decode(token_ids[:k + 1]) where that is a prefix of the full decode;
    where it is not (a decoder that cleans up spaces differently at the end of a prefix, a byte-level token
    that is only part of a UTF-8 character) the common prefix with the full text is used, and ends are made
    non-decreasing. Tokens that decode to nothing (EOS, padding with skip_special_tokens) get the end of the
    token before them. Cost: one decode per prefix, O(n^2) token-decodes for n tokens (about 10^5 for a
    300-token response, milliseconds to tens of milliseconds with a fast tokenizer); fine per response."""
    ids = [int(t) for t in token_ids]
    full = decode(ids)
    ends, best = [], 0
    for k in range(1, len(ids) + 1):
        best = max(best, _common_prefix_len(decode(ids[:k]), full))
        ends.append(best)
    return ends


def align_subsentences(token_ids, decode, spans=None):
    """Sub-sentences with the token that closes each: a list of {"span": (start, end), "last_token": index
    into token_ids, "members": indices of the input spans}.

    `spans` index into decode(token_ids) (default: split_subsentences of it); `decode` should skip special
    tokens so that the decoded text is the response alone. The closing token is the first token whose
    character end is >= the sub-sentence's end, so a token that straddles a boundary (", a") closes the
    earlier sub-sentence, and tokens after the text (EOS, padding) are never chosen. When two consecutive
    sub-sentences would be closed by the same token (the later one lies inside that token), they are merged
    into one entry whose span covers both and whose `members` lists both: no two entries share a last token,
    so labels of merged members must be merged too (scorer.aggregate_labels over their facts)."""
    ids = [int(t) for t in token_ids]
    text = decode(ids)
    spans = split_subsentences(text) if spans is None else [tuple(s) for s in spans]
    ends = token_char_ends(ids, decode) if spans else []
    aligned = []
    for index, (start, end) in enumerate(spans):
        last = bisect.bisect_left(ends, end)
        if last == len(ids):
            raise ValueError(f"sub-sentence {index} {(start, end)} ends past the decoded text "
                             f"({len(text)} chars, {len(ids)} tokens): spans must index into decode(token_ids)")
        if aligned and last < aligned[-1]["last_token"]:
            raise ValueError(f"sub-sentence spans are not in text order: span {index} {(start, end)}")
        if aligned and last == aligned[-1]["last_token"]:
            aligned[-1]["span"] = (aligned[-1]["span"][0], end)
            aligned[-1]["members"].append(index)
        else:
            aligned.append({"span": (start, end), "last_token": last, "members": [index]})
    return aligned


def subsentence_end_positions(token_ids, decode, spans=None):
    """Index into token_ids of the token that closes each sub-sentence (see align_subsentences: sub-sentences
    that would share a closing token are merged, so the list can be shorter than `spans`)."""
    return [entry["last_token"] for entry in align_subsentences(token_ids, decode, spans)]
