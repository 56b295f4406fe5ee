# The training script FLARE's Client API executor runs on every site (copied into the job's
# custom/ folder next to fedumm_config.yaml). The work is in the installed fedumm package.
from pathlib import Path

from fedumm.runtime.flare.client import main

main(script_dir=Path(__file__).resolve().parent)
