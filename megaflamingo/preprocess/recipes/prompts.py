"""AF1's manifest prompts, by kind of task.

AF1's data preparation lists the prompts its manifests used ("prompts are selected from the
following based on the task of each dataset"); its audiocaps example writes "describe the sound
in a sentence.". At training time the augmentation rules (`megaflamingo.data.templates`) replace
most of these for the augmentations the stage configs choose (`AC_short`, `default`,
`provide_all_labels`, ...); with `do_nothing` (the pretraining blend) the manifest prompt is used
as written, so it matters that it is AF1's.
"""

CAPTION = "describe the sound in a sentence."
MUSIC_CAPTION_PARAGRAPH = "describe the music in a paragraph."
# AQA manifests carry "question: <question>": AF1's AQA rules rewrite that lead-in to
# "please answer this question:" (and add yes/no options for binary answers).
QUESTION = "question: {question}"
CLASSIFY_SOUND = "classify this sound."
ACOUSTIC_SCENE = "this acoustic scene is"
SPECIFIC_TO_GENERAL = "describe this sound in the order from specific to general."
EMOTION = "what is the emotion of this speech?"
INSTRUMENT = "what is the instrument of this music?"
SOURCE = "what is the source of this music?"
QUALITIES = "what are the qualities of the music?"
NOTE_PRODUCED_BY = "this music note is produced by"
GENRE = "what is the genre of this music?"


def question(text: str) -> str:
    return QUESTION.format(question=" ".join(str(text).split()))
