"""The built-in backbone kinds: importing their packages registers them on
:data:`fedumm.registry.BACKBONES` (whose ``builtins`` module this is: the registry imports it
the first time it is asked for a kind)."""

import fedumm.models.blip3o  # noqa: F401
import fedumm.models.janus  # noqa: F401
import fedumm.models.reference  # noqa: F401
