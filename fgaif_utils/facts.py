"""Atomic facts in the world's language, and the `rules` fact extractor (a small deterministic parser).

A fact is a dict, the one format shared by the fact extractors, the verifier's questions
(language.question_for_fact), the labels and the scorer:
    {"type": "object", "subject": shape, "negated": bool}
    {"type": "attribute", "subject": shape, "kind": "colour" | "size", "value": colour or size}
    {"type": "relation", "subject": shape, "relation": "left" | "right" | "above" | "below", "object": shape}
Extracted facts also carry "span": [start, end], the characters of their mention in the parsed text: the shape
noun (object), the adjective (attribute), the relation phrase (relation).

The parser scans tokens clause by clause (clauses end at . ! ? , ; : line breaks, "but", and at "and" when a
new noun phrase or clause follows it: "a heart and a star", not "small and red", not "hearts and stars").
In a clause:
- every shape word, singular or plural, synonyms included, is a mention and yields an object fact;
- a negation word ("no", "not", "n't", "without", ...) negates every mention after it in its clause
  ("there is no red circle", "i can't see hearts or stars"), except "not" after a copula whose subject
  is a mention ("the heart is not red", "the star isn't above the ring", "the heart is also not red"; only
  adverbs may stand between them), or "not" opening a clause before a relation phrase ("the heart is above the
  star , not below the ring"): that negates the predicate, which then yields no attribute or relation fact, and
  the mentions stay claims of existence; "is not in the picture" (or image, scene) says the subject is absent;
- colour and size words in front of a mention (unknown words in between are skipped: "a big shiny red heart")
  are attributes of that mention; the other colour and size words after a copula ("is", "are", "looks", ...)
  are attributes of the copula's subject, the last mention before it ("the heart is red", "the colour of
  the star is yellow", "a heart that is small");
- a relation phrase ("left of", "to the right of", "above", "under", ...) relates the copula's subject (or,
  with no copula subject, the last mention before the phrase) to the first mention after the phrase.
A negated mention yields no attribute; a relation with a negated side is dropped. "no red circle" claims
only that there is no circle (the colour qualifier is not kept: the fact format has no qualified negation).
Words the world does not know are ignored.
"""
import re

from fgaif_utils import language

FACT_TYPES = ("object", "attribute", "relation")
ATTRIBUTE_KINDS = ("colour", "size")

SHAPE_BY_WORD = language.shape_lookup()
SIZE_BY_WORD = language.size_lookup()
COLOUR_WORDS = set(language.COLOURS)
# Relation phrases as token tuples, longest first, so "to the left of" wins over "left of".
EXTRA_RELATION_PHRASES = {"left": ["left side of"], "right": ["right side of"],
                          "above": ["on top of"], "below": ["beneath", "underneath"]}
RELATION_BY_PHRASE = sorted(
    ((tuple(phrase.split()), relation)
     for table in (language.RELATION_PHRASES, EXTRA_RELATION_PHRASES)
     for relation, phrases in table.items() for phrase in phrases),
    key=lambda item: -len(item[0]))

NEGATORS = set(language.NEGATION_WORDS) | {"none", "neither", "nor", "without", "zero", "never"}
COPULAS = {"is", "are", "was", "were", "appears", "appear", "looks", "look", "seems", "seem"}
# Adverbs that may stand between a copula and its "not" ("the heart is also not red").
PREDICATE_ADVERBS = {"also", "still", "really", "actually", "definitely", "certainly", "clearly", "probably",
                     "just", "surely"}
SENTENCE_BREAKS = {".", "!", "?", "\n"}
CLAUSE_BREAKS = SENTENCE_BREAKS | {",", ";", ":", "(", ")", "but", "while", "whereas", "although", "however"}
# "and" ends a clause when one of these follows it.
CLAUSE_OPENERS = {"a", "an", "the", "some", "any", "no", "not", "there", "here", "i", "we", "you", "it", "its",
                  "this", "that", "these", "those", "another", "one", "two", "three", "four", "five", "six",
                  "several", "many", "few", "each", "every", "both"} | NEGATORS
# Words that stop the backward scan from a shape noun over its adjectives (besides colours and sizes, which it
# collects, and punctuation): everything the world's vocabulary knows plus common English function words.
# Any other word is treated as an unknown adjective and skipped.
KNOWN_WORDS = (set(language.vocabulary()) | NEGATORS | COPULAS | CLAUSE_BREAKS | CLAUSE_OPENERS
               | {"and", "or", "of", "to", "in", "on", "at", "by", "with", "near", "next", "beside", "behind",
                  "between", "which", "who", "has", "have", "had", "than", "as", "like", "from", "into", "onto",
                  "'s", "be", "can", "do", "does", "did", "will", "would", "could", "side", "top"}
               | {word for phrase, _ in RELATION_BY_PHRASE for word in phrase})

_TOKEN = re.compile(r"[\w']+|\n|[^\w\s]")
_PRONOUN_IS = {"there", "here", "it", "that", "what", "who"}   # "there's" = "there is"


def tokenize(text):
    """Lower-case tokens (word, start, end): words, single punctuation characters, line breaks. "isn't" ->
    "is" "not" (and "n't" written apart -> "not"), "there's" -> "there" "is", "heart's" -> "heart" "'s"; quotes
    around a word are dropped."""
    tokens = []
    for match in _TOKEN.finditer(text.replace("\u2019", "'")):
        word, start, end = match.group().lower(), match.start(), match.end()
        if "'" in word and word != "'":
            stripped = word.strip("'")
            start += len(word) - len(word.lstrip("'"))
            end = start + len(stripped)
            word = stripped
            if not word:
                continue
        if word == "n't":   # written apart: "is n't"
            tokens.append(("not", start, end))
        elif word.endswith("n't") and len(word) > 3:
            stem = {"ca": "can", "wo": "will"}.get(word[:-3], word[:-3])
            tokens += [(stem, start, end - 3), ("not", end - 3, end)]
        elif word == "cannot":
            tokens += [("can", start, start + 3), ("not", start + 3, end)]
        elif word.endswith("'s") and len(word) > 2:
            stem = word[:-2]
            tokens += [(stem, start, end - 2), ("is" if stem in _PRONOUN_IS else "'s", end - 2, end)]
        else:
            tokens.append((word, start, end))
    return tokens


def _clauses(tokens):
    """Split tokens into clauses (lists of tokens); the break tokens themselves are dropped."""
    clauses, current = [], []
    for i, token in enumerate(tokens):
        word = token[0]
        next_word = tokens[i + 1][0] if i + 1 < len(tokens) else ""
        if word in CLAUSE_BREAKS or (word == "and" and (next_word in CLAUSE_OPENERS or next_word.isdigit())):
            if current:
                clauses.append(current)
            current = []
        else:
            current.append(token)
    if current:
        clauses.append(current)
    return clauses


def _attribute_of(word):
    if word in COLOUR_WORDS:
        return "colour", word
    if word in SIZE_BY_WORD:
        return "size", SIZE_BY_WORD[word]
    return None


def _is_unknown(word):
    return word not in KNOWN_WORDS and word not in SHAPE_BY_WORD and word not in COLOUR_WORDS \
        and word not in SIZE_BY_WORD and any(c.isalpha() for c in word)


def _relation_at(clause, i):
    """(relation, end index) of a relation phrase starting at token i, or None."""
    for phrase, relation in RELATION_BY_PHRASE:
        if tuple(token[0] for token in clause[i:i + len(phrase)]) == phrase:
            return relation, i + len(phrase)
    return None


def _object_fact(shape, negated, token):
    return {"type": "object", "subject": shape, "negated": negated, "span": [token[1], token[2]]}


def _attribute_fact(shape, kind_value, token):
    kind, value = kind_value
    return {"type": "attribute", "subject": shape, "kind": kind, "value": value, "span": [token[1], token[2]]}


def _clause_facts(clause):
    """The facts of one clause (see the module docstring)."""
    facts = []
    # Pass 1: mentions (with existence negation), relation phrases, and which adjectives are prenominal.
    mentions = {}          # token index -> {"shape", "negated"}
    phrases = {}           # token index -> (relation, end index)
    prenominal = set()
    negated = False
    i = 0
    while i < len(clause):
        word = clause[i][0]
        relation = _relation_at(clause, i)
        if relation:
            phrases[i] = relation
            i = relation[1]
            continue
        if word in SHAPE_BY_WORD:
            mentions[i] = {"shape": SHAPE_BY_WORD[word][0], "negated": negated,
                           "facts": [_object_fact(SHAPE_BY_WORD[word][0], negated, clause[i])]}
            k = i - 1
            while k >= 0 and (_attribute_of(clause[k][0]) or _is_unknown(clause[k][0])):
                if _attribute_of(clause[k][0]):
                    prenominal.add(k)
                    if not negated:
                        mentions[i]["facts"].append(
                            _attribute_fact(mentions[i]["shape"], _attribute_of(clause[k][0]), clause[k]))
                k -= 1
        elif word in NEGATORS and not _negates_predicate(clause, i, mentions):
            negated = True
        elif word in NEGATORS and _absent_from_picture(clause, i + 1) and any(k < i for k in mentions):
            # "the red star is not in the picture": the copula's subject does not exist (and has no attributes)
            subject = mentions[max(k for k in mentions if k < i)]
            subject["negated"] = True
            subject["facts"] = [dict(subject["facts"][0], negated=True)]
        i += 1
    facts += [fact for mention in mentions.values() for fact in mention["facts"]]
    # Pass 2: predicates. A copula after a mention opens a predicate about the last mention before it.
    # after_relation: adjectives after "left of the" with no noun of their own ("the heart is left of the large red",
    # a cut-off sentence) describe nothing said, not the subject.
    subject, predicate_negated, last_mention, after_relation = None, False, None, False
    i = 0
    while i < len(clause):
        word = clause[i][0]
        if i in mentions:
            last_mention = mentions[i]
        elif word in COPULAS and last_mention is not None:
            subject, predicate_negated, after_relation = last_mention, False, False
        elif word in NEGATORS and _negates_predicate(clause, i, mentions):
            predicate_negated = True
        elif i in phrases:
            relation, after = phrases[i]
            first = subject or last_mention
            second = next((mentions[k] for k in range(after, len(clause)) if k in mentions), None)
            if first and second and not (first["negated"] or second["negated"] or (subject and predicate_negated)):
                facts.append({"type": "relation", "subject": first["shape"], "relation": relation,
                              "object": second["shape"], "span": [clause[i][1], clause[after - 1][2]]})
            i, after_relation = after, True
            continue
        elif _attribute_of(word) and i not in prenominal and subject is not None and not after_relation:
            if not (predicate_negated or subject["negated"]):
                facts.append(_attribute_fact(subject["shape"], _attribute_of(word), clause[i]))
        i += 1
    return facts


def _absent_from_picture(clause, i):
    """Whether the tokens from i say "in the picture" / "in this image" (after "is not": the subject is absent)."""
    words = [token[0] for token in clause[i:i + 3]]
    return len(words) == 3 and words[0] in ("in", "on") and words[1] in ("the", "this") \
        and words[2] in ("picture", "image", "scene")


def _negates_predicate(clause, i, mentions):
    """Whether the negator at token i negates a predicate ("the heart is not red") rather than existence:
    it follows a copula, with only adverbs between them ("the heart is also not red"), that has a mention
    before it in the clause; or it opens its clause before a relation phrase ("the heart is above the star , not
    below the ring": the ring is there, the relation is denied)."""
    if i == 0 and clause[0][0] == "not" and _relation_at(clause, 1):
        return True
    k = i - 1
    while k > 0 and clause[k][0] in PREDICATE_ADVERBS:
        k -= 1
    return k > 0 and clause[k][0] in COPULAS and any(m < k for m in mentions)


def parse_facts(text):
    """Every fact stated in `text`, in text order (by span), each with its "span" into `text`."""
    if not isinstance(text, str):
        raise TypeError(f"parse_facts expects a str, got {type(text).__name__}: {text!r}")
    facts = []
    for clause in _clauses(tokenize(text)):
        facts += _clause_facts(clause)
    return sorted(facts, key=lambda fact: tuple(fact["span"]))


def extract_facts_rules(subsentence, response=None):
    """The `rules` backend of fact extraction: the facts of one sub-sentence, spans relative to it.
    `response` (the whole response, context for an LLM backend) is not needed by the rules."""
    return parse_facts(subsentence)


def facts_of_type(facts, fact_type):
    if fact_type not in FACT_TYPES:
        raise ValueError(f"unknown fact type {fact_type!r}; expected one of {FACT_TYPES}")
    return [fact for fact in facts if fact["type"] == fact_type]


def check_fact(fact):
    """Raise ValueError naming the fact when it is not a well-formed fact dict (e.g. from an LLM backend)."""
    required = {"object": ("subject", "negated"), "attribute": ("subject", "kind", "value"),
                "relation": ("subject", "relation", "object")}
    if not isinstance(fact, dict) or fact.get("type") not in required:
        raise ValueError(f"not a fact (type must be one of {FACT_TYPES}): {fact!r}")
    missing = [key for key in required[fact["type"]] if key not in fact]
    if missing:
        raise ValueError(f"{fact['type']} fact without {missing}: {fact!r}")
    if fact["type"] == "attribute" and fact["kind"] not in ATTRIBUTE_KINDS:
        raise ValueError(f"attribute fact with unknown kind {fact['kind']!r} (expected {ATTRIBUTE_KINDS}): {fact!r}")
    if fact["type"] == "relation" and fact["relation"] not in language.RELATIONS:
        raise ValueError(f"relation fact with unknown relation {fact['relation']!r}: {fact!r}")
    return fact


def describe_fact(fact):
    """A short English reading of a fact: "heart exists", "no circle", "heart is red", "heart left of star"."""
    if fact["type"] == "object":
        return f"no {fact['subject']}" if fact["negated"] else f"{fact['subject']} exists"
    if fact["type"] == "attribute":
        return f"{fact['subject']} is {fact['value']} ({fact['kind']})"
    phrase = language.RELATION_PHRASES.get(fact["relation"], [fact["relation"]])[0]   # an LLM's own: "lying on"
    return f"{fact['subject']} {phrase} {fact['object']}"
