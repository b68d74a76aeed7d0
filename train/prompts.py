"""The DreamBooth paper's evaluation prompts: 25 per subject kind, filled with the run's words.

    python -m train.prompts "a photo of sks dog" "a photo of a dog"    # prints the 25 prompts

The paper (Ruiz et al. 2022, section 4.1) evaluates each subject on 25 prompts. Objects get 20
recontextualizations (the subject somewhere) and 5 property changes (colour, material, shape);
live subjects (the paper's dogs and cats) get 10 recontextualizations, 10 accessorizations
(hats, outfits) and the same 5 property changes, since a backpack does not wear a santa hat.
Each template holds the identifier and the class noun, as in "a sks dog in the jungle".
"""

from __future__ import annotations

import argparse

from .intake import prompt_words

# Shared by both kinds: the subject somewhere, then its properties changed.
PLACES = [
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street",
    "on top of pink fabric", "on top of a wooden floor", "with a city in the background",
    "with a mountain in the background", "with a blue house in the background",
    "on top of a purple rug in a forest",
]
OBJECT_PLACES = [
    "with a wheat field in the background", "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background", "floating on top of water",
    "floating in an ocean of milk", "on top of green grass with sunflowers around it",
    "on top of a mirror", "on top of the sidewalk in a crowded street",
    "on top of a dirt road", "on top of a white rug",
]
ACCESSORIES = [
    "wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf",
    "wearing a black top hat and a monocle", "in a chef outfit", "in a firefighter outfit",
    "in a police outfit", "wearing pink glasses", "wearing a yellow shirt",
    "in a purple wizard outfit",
]
PROPERTIES = ["red", "purple", "shiny", "wet", "cube shaped"]  # "a red sks dog"

SUBJECT_KINDS = ["auto", "object", "live"]
# Class nouns the paper would call live subjects (it had dogs and cats); "auto" looks the last
# word of the class prompt up here. Anything else is evaluated as an object.
LIVE_NOUNS = set(
    "dog dogs puppy cat cats kitten pet animal person man woman boy girl child baby face "
    "people horse bird parrot rabbit bunny hamster guinea pig fox wolf bear lion tiger "
    "cow sheep goat pig monkey".split())


def templates(kind: str) -> list[str]:
    """The 25 templates of a subject kind ("object" or "live"), `{}` where "sks dog" goes."""
    if kind == "object":
        middle = [f"a {{}} {p}" for p in OBJECT_PLACES]
    elif kind == "live":
        middle = [f"a {{}} {a}" for a in ACCESSORIES]
    else:
        raise ValueError(f"subject kind must be object or live (got {kind!r})")
    return ([f"a {{}} {p}" for p in PLACES] + middle + [f"a {p} {{}}" for p in PROPERTIES])


def subject_kind(kind: str, class_noun: str) -> str:
    """Resolve "auto" from the class noun: live for animals and people, else object."""
    if kind not in SUBJECT_KINDS:
        raise ValueError(f"subject kind must be one of {', '.join(SUBJECT_KINDS)} (got {kind!r})")
    if kind != "auto":
        return kind
    return "live" if class_noun.lower() in LIVE_NOUNS else "object"


def subject_prompts(instance_prompt: str, class_prompt: str | None,
                    kind: str = "auto") -> tuple[list[str], str]:
    """The paper's 25 prompts for this subject, and the kind resolved. The identifier and class
    noun are read from the prompts as training reads them ("a photo of sks dog", "a photo of a
    dog" -> "sks", "dog")."""
    identifier, noun = prompt_words(instance_prompt, class_prompt)
    kind = subject_kind(kind, noun)
    return [t.format(f"{identifier} {noun}".strip()) for t in templates(kind)], kind


def without_identifier(prompt: str, identifier: str) -> str:
    """The prompt with the identifier word removed ("a sks dog in the snow" -> "a dog in the
    snow"): what CLIP-T compares images with, since CLIP has never seen "sks"."""
    words = prompt.split()
    kept = [w for w in words if w.lower() != identifier.lower()] if identifier else words
    return " ".join(kept) if kept else prompt


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m train.prompts",
                                     description="Print the paper's evaluation prompts.")
    parser.add_argument("instance_prompt", help='e.g. "a photo of sks dog"')
    parser.add_argument("class_prompt", nargs="?", help='e.g. "a photo of a dog"')
    parser.add_argument("--kind", default="auto", choices=SUBJECT_KINDS)
    args = parser.parse_args()
    prompts, resolved = subject_prompts(args.instance_prompt, args.class_prompt, args.kind)
    print(f"# {resolved} prompts")
    print("\n".join(prompts))
