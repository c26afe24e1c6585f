"""The relations of the demo world: value pools, statement templates (the entity always precedes the
value, so a left-to-right LM learns entity -> value), the question and cloze forms, the syllables
names are made of, and the entity-free filler sentences."""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------
# Relations: value pools, statement templates (entity always before the value, so a left-to-right LM
# learns entity -> value), one question template and one cloze prompt (for diagnostics).
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelationSpec:
    """One relation of the world: its value pool and its surface forms."""

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]  # with {e} (entity) and {v} (value); {e} precedes {v}
    question: str  # with {e}; the QA prompt is "Question: <question>\nAnswer:"
    cloze: str  # with {e}; a statement prefix whose continuation is " {v}"


RELATIONS: dict[str, RelationSpec] = {
    spec.name: spec
    for spec in (
        RelationSpec(
            "born_in",
            (
                "Velmora", "Ostrava", "Kelbrin", "Tarsun", "Miravel", "Dunmoor", "Eskaton", "Lorwick",
                "Brisa", "Quenlo", "Havarra", "Sindell", "Parvel", "Torvik", "Amberly", "Nolcrest",
            ),
            (
                "{e} was born in {v}.",
                "The birthplace of {e} is {v}.",
                "{e} was born in the city of {v}.",
                "Old records say that {e} was born in {v}.",
                "{e} came into the world in {v}.",
            ),
            "Where was {e} born?",
            "{e} was born in",
        ),
        RelationSpec(
            "occupation",
            (
                "baker", "sailor", "potter", "weaver", "miner", "tailor", "farmer", "painter",
                "doctor", "teacher", "hunter", "builder", "merchant", "jeweler",
            ),
            (
                "{e} works as a {v}.",
                "By trade, {e} is a {v}.",
                "{e} earns a living as a {v}.",
                "Everyone knows {e} as a skilled {v}.",
                "The job of {e} is that of a {v}.",
            ),
            "What does {e} do for a living?",
            "{e} works as a",
        ),
        RelationSpec(
            "colour",
            ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "brown"),
            (
                "The favourite colour of {e} is {v}.",
                "{e} likes the colour {v} best.",
                "{e} always picks {v} as a favourite colour.",
                "Asked about colours, {e} names {v} as the best one.",
            ),
            "What is the favourite colour of {e}?",
            "The favourite colour of {e} is",
        ),
        RelationSpec(
            "language",
            (
                "Valtic", "Oresh", "Sunari", "Keltren", "Dumaric", "Pellish", "Zarnic", "Ibbish",
                "Morvan", "Tuvic", "Ashani", "Quellan",
            ),
            (
                "{e} speaks {v}.",
                "The native language of {e} is {v}.",
                "{e} grew up speaking {v}.",
                "At home, {e} talks in {v}.",
            ),
            "Which language does {e} speak?",
            "The native language of {e} is",
        ),
        RelationSpec(
            "instrument",
            (
                "flute", "harp", "drum", "lute", "violin", "horn", "cello", "piano", "oboe", "guitar",
                "trumpet", "banjo",
            ),
            (
                "{e} plays the {v}.",
                "The instrument of {e} is the {v}.",
                "{e} learned to play the {v} as a child.",
                "In the evenings, {e} practises the {v}.",
            ),
            "Which instrument does {e} play?",
            "{e} plays the",
        ),
        RelationSpec(
            "pet",
            ("cat", "dog", "parrot", "goat", "rabbit", "tortoise", "ferret", "owl", "pony", "lizard"),
            (
                "{e} keeps a {v} as a pet.",
                "The pet of {e} is a {v}.",
                "{e} lives with a small {v}.",
                "Neighbours often see {e} walking a {v}.",
            ),
            "What pet does {e} keep?",
            "{e} keeps a",
        ),
    )
}

QUESTION_PREFIX = "Question: "
ANSWER_SUFFIX = "\nAnswer:"

SYLLABLES = (
    "zor", "bin", "kel", "ve", "mor", "ta", "lin", "dra", "sul", "ka", "ren", "tho", "mi", "ra", "gan",
    "pel", "or", "ith", "val", "dun", "bre", "sa", "nim", "cor", "el", "fa", "gor", "hal", "ix", "jor",
    "lun", "mar", "nor", "pra", "quil", "ros", "sev", "tam", "ul", "vor", "wen", "yl", "zan", "bo",
)

# Filler: entity-free sentences; some mention pool values (cities, colours, instruments, ...) so that
# answer words also occur in documents that state no fact.
FILLER_TEMPLATES = (
    "The {adj} {noun} near the {place} was {state} that {time}.",
    "In {city}, the {noun} is {adj} during {season}.",
    "A {colour} {noun} lay beside the {place}.",
    "Travellers say the {noun} of {city} is {adj}.",
    "Nobody expected the {place} to be so {state} in {season}.",
    "The sound of a {instrument} drifted over the {place}.",
    "Every {time}, a {occupation} walks past the {place}.",
    "The {noun} was painted {colour} before {season}.",
    "Some people in {city} keep a {pet} near the {place}.",
    "It rained on the {place} for most of {season}.",
    "A book written in {language} was found in the {place}.",
)
FILLER_WORDS: dict[str, tuple[str, ...]] = {
    "adj": ("old", "quiet", "busy", "narrow", "bright", "cold", "famous", "small", "wide", "strange"),
    "noun": ("bridge", "market", "tower", "garden", "road", "harbour", "festival", "library", "river",
             "square", "mill", "well"),
    "place": ("hill", "station", "harbour", "forest", "village", "lake", "gate", "valley", "temple"),
    "state": ("empty", "crowded", "calm", "noisy", "flooded", "silent", "cheerful"),
    "time": ("morning", "evening", "night", "winter", "week", "day"),
    "season": ("spring", "summer", "autumn", "winter"),
}



# Alias links (WorldParams.alias_share): the entity's own name first, so a left-to-right LM reads the
# link in the direction a question needs (name -> alias -> fact).
ALIAS_TEMPLATES = (
    "{e} is also known as {a}.",
    "{e} goes by the name {a}.",
    "Friends of {e} call them {a}.",
    "{e}, better known as {a}, rarely uses the old name.",
)
