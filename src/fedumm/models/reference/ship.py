"""Copy a pretrained checkpoint into the package as the shipped base, with its hashes.

    python -m fedumm.models.reference.ship CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from fedumm.models.checksums import write_checksums
from fedumm.models.reference.backbone import (
    CODEBOOK,
    CONFIG,
    SHIPPED_BASE,
    TOKENIZER,
    WEIGHTS,
    ReferenceBackbone,
)

FILES = (WEIGHTS, CONFIG, TOKENIZER, CODEBOOK, "pretrain_log.jsonl")


def ship(src: str | Path, dst: Path = SHIPPED_BASE) -> dict[str, str]:
    src = Path(src)
    ReferenceBackbone.load(src)  # refuse anything that does not load or match its fingerprint
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(src / name, dst / name)
    return write_checksums(dst, FILES)


if __name__ == "__main__":
    print(json.dumps(ship(sys.argv[1]), indent=2))
