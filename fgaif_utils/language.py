"""The synthetic world's language: vocabulary, priors, sentence and question templates.

Everything that writes or reads the world's text (the scene generator, the noisy-caption generator, the
ground-truth scorer, the rule-based fact extractor, the verifier's questions and the tokenizer) takes its
words from here, so that a description the world writes is always one the scorer can parse.

Text is lower case, words and punctuation separated by single spaces: "there is a large red heart ."
"""

SHAPES = ["circle", "square", "triangle", "star", "heart", "ring"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
SIZES = ["small", "large"]
RELATIONS = ["left", "right", "above", "below"]

# Language priors. A shape's typical colour is drawn with probability `typical_colour_p` (world params);
# co-occurring partners are drawn together more often than chance. Both are what a policy trained on
# noisy captions learns to hallucinate: the partner that "should" be there, the colour a shape "usually" has.
TYPICAL_COLOUR = {"circle": "yellow", "square": "blue", "triangle": "green",
                  "star": "yellow", "heart": "red", "ring": "orange"}
PARTNER = {"heart": "star", "star": "heart", "circle": "ring", "ring": "circle",
           "square": "triangle", "triangle": "square"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}

# Surface forms. The first entry is the canonical word; the rest are synonyms the world also writes.
SHAPE_WORDS = {"circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle"],
               "star": ["star"], "heart": ["heart"], "ring": ["ring", "donut"]}
SHAPE_PLURALS = {"circle": ["circles", "discs"], "square": ["squares", "boxes"], "triangle": ["triangles"],
                 "star": ["stars"], "heart": ["hearts"], "ring": ["rings", "donuts"]}
SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
RELATION_PHRASES = {"left": ["left of", "to the left of"], "right": ["right of", "to the right of"],
                    "above": ["above"], "below": ["below", "under"]}

EXISTENCE_LEADS = ["there is", "i can see", "the image shows", "the picture contains"]
OPENERS = ["in this picture ,", "in the image ,", "on a dark background ,"]
NEGATION_WORDS = ["no", "not"]

# Prompts and questions. The description prompt is LLaVA-1.5's; questions follow POPE's wording.
DESCRIBE_PROMPT = "Describe this image in detail."
QUESTION_TEMPLATES = {
    "object": "is there a {shape} in the image ?",
    "colour": "is the {shape} {colour} ?",
    "size": "is the {shape} {size} ?",
    "relation": "is the {shape} {relation} the {other} ?",
}
WHAT_COLOUR_TEMPLATE = "what colour is the {shape} ?"
ANSWERS = ["yes", "no"]

# Geometry (pixels on the 64x64 canvas). A relation is *stated* in a reference description only when the
# centre offset on its axis exceeds STATE_MARGIN and that axis dominates; a relation *claim* is judged true
# when the offset has the claimed sign and exceeds JUDGE_MARGIN.
STATE_MARGIN = 10.0
JUDGE_MARGIN = 2.0

CHAT_WORDS = ["user", "assistant", ":", "describe", "this", "image", "in", "detail", "."]
FUNCTION_WORDS = ["there", "is", "a", "an", "and", "the", "of", "to", "i", "can", "see", "shows", "picture",
                  "contains", "on", "dark", "background", ",", "?", "what", "colour", "color", "are", "also",
                  "it", "its", "no", "not", "yes", "with"]


def vocabulary():
    """Every word the world uses, in a fixed order (the tiny tokenizer's vocabulary after the specials)."""
    words = []
    groups = [CHAT_WORDS, FUNCTION_WORDS, COLOURS, RELATIONS, ["under", "size"]]
    groups += list(SHAPE_WORDS.values()) + list(SHAPE_PLURALS.values()) + list(SIZE_WORDS.values())
    for group in groups:
        for word in group:
            if word not in words:
                words.append(word)
    return words


def shape_lookup():
    """Map every singular and plural surface form to (canonical shape, is_plural)."""
    table = {}
    for shape, forms in SHAPE_WORDS.items():
        for form in forms:
            table[form] = (shape, False)
    for shape, forms in SHAPE_PLURALS.items():
        for form in forms:
            table[form] = (shape, True)
    return table


def size_lookup():
    return {form: size for size, forms in SIZE_WORDS.items() for form in forms}


def question_for_fact(fact):
    """The yes/no question that checks one atomic fact (see fgaif_utils.facts for the fact format).

    Facts about the world's shapes get the world's spelling ("is the heart left of the star ?"); free-text facts
    from an LLM about real images get plain English ("Is the dog next to the bench?")."""
    subject, other = fact["subject"], fact.get("object")
    in_world = subject in SHAPES and (other is None or other in SHAPES)
    if fact["type"] == "object":
        return (QUESTION_TEMPLATES["object"].format(shape=subject) if in_world
                else f"Is there a {subject} in the image?")
    if fact["type"] == "attribute":
        if in_world and fact["kind"] == "colour":
            return QUESTION_TEMPLATES["colour"].format(shape=subject, colour=fact["value"])
        if in_world and fact["kind"] == "size":
            return QUESTION_TEMPLATES["size"].format(shape=subject, size=fact["value"])
        return f"Is the {subject} {fact['value']}?"
    if fact["type"] == "relation":
        if in_world and fact["relation"] in RELATION_PHRASES:
            return QUESTION_TEMPLATES["relation"].format(shape=subject, other=other,
                                                         relation=RELATION_PHRASES[fact["relation"]][0])
        return f"Is the {subject} {fact['relation']} the {other}?"
    raise ValueError(f"unknown fact type {fact['type']!r} in {fact}")


def relation_holds(subject, relation, other, margin=JUDGE_MARGIN):
    """Whether `subject` is `relation` of `other` in the image (objects are scene dicts with cx, cy in pixels;
    y grows downwards, so "above" means a smaller cy)."""
    dx = subject["cx"] - other["cx"]
    dy = subject["cy"] - other["cy"]
    if relation == "left":
        return dx < -margin
    if relation == "right":
        return dx > margin
    if relation == "above":
        return dy < -margin
    if relation == "below":
        return dy > margin
    raise ValueError(f"unknown relation {relation!r}")


def stated_relation(subject, other):
    """The relation a reference description may state between two objects, or None when it is ambiguous:
    the dominant axis's offset must exceed STATE_MARGIN."""
    dx = subject["cx"] - other["cx"]
    dy = subject["cy"] - other["cy"]
    if abs(dx) >= abs(dy) and abs(dx) > STATE_MARGIN:
        return "left" if dx < 0 else "right"
    if abs(dy) > abs(dx) and abs(dy) > STATE_MARGIN:
        return "above" if dy < 0 else "below"
    return None
