"""The prompt an understanding sample with a text modality is asked with (FedMLLM's wording).

Where the data gives understanding samples a text modality (``Sample.context``: a meme's
caption, a tweet, a scene description), the model sees the text, a phrase that names the
modalities the sample has, and the question. FedMLLM's prompt augmentation replaces the
modality-naming phrase by one wording for every sample, so that a client that only ever sees
one modality does not learn to depend on the phrase; evaluation always uses the full-modality
phrase, as FedMLLM does. Samples without a text modality in their data are asked their question
as it is.
"""

from __future__ import annotations

from dataclasses import replace

from fedumm.data.records import Sample
from fedumm.data.scenarios import UNDERSTANDING

PHRASES = {
    (True, True): "based on the text and the image ,",
    (True, False): "based on the image ,",
    (False, True): "based on the text ,",
    (False, False): "based on nothing ,",
}
AGNOSTIC = "based on the input , without considering the modality ,"


def modality_phrase(has_image: bool, has_text: bool, agnostic: bool = False) -> str:
    """The phrase naming a sample's modalities, or the modality-agnostic one."""
    return AGNOSTIC if agnostic else PHRASES[(has_image, has_text)]


def compose_prompt(sample: Sample, agnostic: bool = False) -> Sample:
    """The sample with ``text`` = its text modality, the modality phrase and its question (what
    a backbone is asked); the question stays in ``labels["question"]``."""
    if sample.task != UNDERSTANDING:
        return sample
    question = sample.labels.get("question", sample.text or "")
    phrase = modality_phrase(sample.image is not None, sample.context is not None, agnostic)
    text = " ".join(p for p in (sample.context, phrase, question) if p)
    return replace(sample, text=text, labels={**sample.labels, "question": question})


def has_text_modality(samples: list[Sample]) -> bool:
    """Whether the data gives its understanding samples a text modality."""
    return any(s.context is not None for s in samples if s.task == UNDERSTANDING)
