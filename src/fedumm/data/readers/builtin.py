"""The built-in readers: importing this module registers each in :data:`fedumm.registry.READERS`
(the registry imports it the first time it is asked for a name).

A module of its own, not the package's ``__init__``: the format modules import the data
modules below them (ShapesWorld's generator, the official record types), and those import
``fedumm.data.readers.*`` in turn, so registering from the package would import in a circle.
"""

from __future__ import annotations

from fedumm.data.readers import (  # noqa: F401  (imported for their registrations)
    conversations,
    fedmllm,
    hf,
    shapes,
    text_image,
    vqa_v2,
    webdataset,
)
