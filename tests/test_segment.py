"""Sentence and sub-sentence splitting (hand-computed word counts) and last-token alignment with fake tokenizers."""
import random

import pytest

from fgaif_utils.segment import (align_subsentences, split_sentences, split_subsentences, subsentence_end_positions,
                                 subsentence_starts, token_char_ends)


def pieces(text, spans):
    return [text[s:e] for s, e in spans]


def test_split_sentences_our_style_and_prose():
    text = "there is a red heart . the heart is left of the star ."
    assert pieces(text, split_sentences(text)) == ["there is a red heart .", "the heart is left of the star ."]
    text = "A dog. A cat!  Is it 3.5 stars?? (Yes.) and more"
    assert pieces(text, split_sentences(text)) == ["A dog.", "A cat!", "Is it 3.5 stars??", "(Yes.)", "and more"]
    text = "first line\nsecond line .\n\n"
    assert pieces(text, split_sentences(text)) == ["first line", "second line ."]
    assert split_sentences("") == [] and split_sentences("   \n ") == []


# Words glue standalone punctuation to the word before; counts in the comments are (word index: word).
@pytest.mark.parametrize("text, expected", [
    # 0 there .. 5 heart, | 6 a .. 13 star. (14 words): 6 + 5 < 14 and 6 >= 5 -> split
    ("there is a large red heart , a small blue box and a big star .",
     ["there is a large red heart ,", "a small blue box and a big star ."]),
    # 0 in 1 the 2 image, | 3 there .. 7 heart. (8 words): 3 + 5 < 8 fails -> one piece
    ("in the image , there is a red heart .", ["in the image , there is a red heart ."]),
    # 0 the .. 6 star, | 7 and .. 13 box. (14 words): 7 + 5 < 14, 7 >= 5 -> split
    ("the heart is left of the star , and the ring is above the box .",
     ["the heart is left of the star ,", "and the ring is above the box ."]),
    # 12 words: candidate 6 with 6 + 5 < 12 -> split; the same with 11 words -> no split
    ("there is a large red heart , and there is a blue box .",
     ["there is a large red heart ,", "and there is a blue box ."]),
    ("there is a large red heart , and there is a box .", ["there is a large red heart , and there is a box ."]),
    # 16 words; start 6 (heart,), then candidate 9 (box,): piece 6..8 has 3 < 5 words and 6 is not the
    # sentence start -> start 6 is dropped, 9 becomes the start: the short piece joins the one before it
    ("there is a large red heart , a blue box , and a small yellow star above it .",
     ["there is a large red heart , a blue box ,", "and a small yellow star above it ."]),
    # 16 words; candidate 2 (after heart,) gives a first piece of 2 < 5 words -> dropped (first piece grows);
    # candidate 9 (after red,): 9 - 0 >= 5 and 9 + 5 < 16 -> split
    ("the heart , the star and the ring are red , and the box is small and blue .",
     ["the heart , the star and the ring are red ,", "and the box is small and blue ."]),
])
def test_split_subsentences_hand_computed(text, expected):
    assert pieces(text, split_subsentences(text)) == expected


def test_prose_splits_like_our_style():
    prose = "There is a large red heart, a small blue box and a big star. The heart is left of the star!"
    assert pieces(prose, split_subsentences(prose)) == ["There is a large red heart,", "a small blue box and a big star.",
                                                        "The heart is left of the star!"]


def test_subsentence_starts_on_words():
    words = "a, b c d e f, g, h i j k l m".split()       # 13 words; candidates 1 (short first), 6, 7
    # 1: 1 - 0 < 5 and previous start is the sentence start -> no start; 6: 6 - 0 >= 5 -> start;
    # 7: 7 - 6 < 5, previous start 6 is not the sentence start -> 6 dropped, 7 starts
    assert subsentence_starts(words) == [0, 7]
    assert subsentence_starts(["a,", "b"]) == [0]
    assert subsentence_starts(["one"]) == [0]


def test_subsentences_cover_the_text_without_gaps():
    rng = random.Random(0)
    vocab = ["there", "is", "a", "red", "heart", ",", ";", ".", "!", "?", "and", "the", "star", "heart,", "box."]
    for _ in range(300):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40))) + rng.choice(["", " ", "\n"])
        spans = split_subsentences(text)
        position = 0
        for start, end in spans:
            assert start < end and text[position:start].strip() == "" and text[start:end].strip() == text[start:end]
            position = end
        assert text[position:].strip() == ""


# ---- fake tokenizers: a vocabulary of strings, decode joins them


def concat_decoder(vocab, special=()):
    """Pieces carry their own leading spaces; special tokens decode to nothing (skip_special_tokens)."""
    return lambda ids: "".join(vocab[i] for i in ids if i not in special)


def spaced_decoder(vocab):
    """A word-level decoder: joins with spaces, then cleans up the space before punctuation, like HF cleanup."""
    return lambda ids: " ".join(vocab[i] for i in ids).replace(" ,", ",").replace(" .", ".")


def test_token_char_ends_concat():
    vocab = ["there", " is", " a", " heart", " , a", " star", " .", "</s>"]
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 7]
    decode = concat_decoder(vocab, special={7})
    assert decode(ids) == "there is a heart , a star ."
    assert token_char_ends(ids, decode) == [5, 8, 10, 16, 20, 25, 27, 27, 27]


def test_token_char_ends_with_cleanup_and_broken_characters():
    vocab = ["there", "is", "a", "heart", ",", "star", "."]
    decode = spaced_decoder(vocab)
    assert decode([0, 1, 2, 3, 4, 2, 5, 6]) == "there is a heart, a star."
    assert token_char_ends([0, 1, 2, 3, 4, 2, 5, 6], decode) == [5, 8, 10, 16, 17, 19, 24, 25]

    # A byte-level tokenizer: "é" is two bytes in two tokens; the prefix ending after the first byte decodes
    # to a replacement character that is not in the full text.
    pieces_ = [b"caf", b"\xc3", b"\xa9", b" heart"]
    decode = lambda ids: b"".join(pieces_[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    assert decode([0, 1, 2, 3]) == "café heart"
    assert token_char_ends([0, 1, 2, 3], decode) == [3, 3, 4, 10]


def test_subsentence_end_positions_straddling_token():
    vocab = ["there", " is", " a", " large", " red", " heart", " , a", " small", " blue", " box", " and", " big",
             " star", " .", "</s>", "<pad>"]
    decode = concat_decoder(vocab, special={14, 15})
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 2, 11, 12, 13, 14, 15, 15]
    text = decode(ids)
    assert pieces(text, split_subsentences(text)) == ["there is a large red heart ,", "a small blue box and a big star ."]
    # " , a" (index 6) ends past the first sub-sentence's end and is the first to reach it: it closes it.
    # EOS and padding end where " ." ends, but " ." (index 14) comes first.
    assert subsentence_end_positions(ids, decode) == [6, 14]


def test_subsentence_end_positions_word_level_decoder():
    words = "there is a large red heart , a small blue box and a big star . the heart is left of the star .".split()
    vocab = sorted(set(words))
    ids = [vocab.index(w) for w in words]
    decode = lambda token_ids: " ".join(vocab[i] for i in token_ids)  # noqa: E731
    # sub-sentences: "... heart ," (closed by "," at 6), "a small ... star ." (15), "the heart ... star ." (23)
    assert subsentence_end_positions(ids, decode) == [6, 15, 23]


def test_subsentences_sharing_a_last_token_are_merged():
    vocab = ["ab", "cdefgh", "ij"]
    decode = concat_decoder(vocab)
    ids = [0, 1, 2]                     # "abcdefghij": token 1 covers chars 2..8
    spans = [(0, 3), (3, 6), (6, 10)]   # the first two both end inside token 1
    assert align_subsentences(ids, decode, spans) == [
        {"span": (0, 6), "last_token": 1, "members": [0, 1]},
        {"span": (6, 10), "last_token": 2, "members": [2]},
    ]
    assert subsentence_end_positions(ids, decode, spans) == [1, 2]


def test_alignment_errors_and_empty():
    decode = concat_decoder(["ab", "cd"])
    with pytest.raises(ValueError, match="ends past the decoded text"):
        subsentence_end_positions([0, 1], decode, [(0, 2), (2, 9)])
    with pytest.raises(ValueError, match="not in text order"):
        subsentence_end_positions([0, 1], decode, [(2, 4), (0, 2)])
    assert subsentence_end_positions([], decode) == []
