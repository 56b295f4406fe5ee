"""Small makers shared by test modules (importable as ``makers``: pytest puts this folder,
the root conftest's, on ``sys.path``)."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from pathlib import Path

import fedumm.cli as cli


def png(width: int, height: int, color_type: int, depth: int, raw: bytes) -> bytes:
    """A PNG written by hand, so any header (16-bit, huge sizes) can be made."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``fedumm argv``, argparse's exits included."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


@contextlib.contextmanager
def killed_at_training_call(n: int):
    """Inside the block, the n-th client training (``ClientTrainer.train``) raises
    KeyboardInterrupt: a run killed at that point, mid-round or between rounds."""
    from fedumm.fl.client import ClientTrainer

    real, calls = ClientTrainer.train, {"n": 0}

    def train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *args, **kwargs)

    ClientTrainer.train = train
    try:
        yield
    finally:
        ClientTrainer.train = real


def blip3o_tiny():
    """The BLIP3o backbone's tiny random-weight preset, on the CPU."""
    from fedumm.config import BackboneConfig
    from fedumm.models.kinds import build_backbone

    return build_backbone(BackboneConfig(kind="blip3o", preset="tiny", device="cpu"))


def blip3o_samples() -> list:
    """Four understanding then four generation samples (ShapesWorld, 48 px)."""
    from fedumm.data.readers.shapes import generate_shapes, shapes_samples
    from fedumm.models.protocol import GENERATION, UNDERSTANDING

    s = shapes_samples(generate_shapes("downstream", 8, seed=3, role="train", image_size=48))
    return ([x for x in s if x.task == UNDERSTANDING][:4]
            + [x for x in s if x.task == GENERATION][:4])


def run_adapters(run) -> dict:
    """A finished run's exported global adapters (PEFT's safetensors file)."""
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "adapters" / "adapter_model.safetensors"))


def round_records(run) -> list[dict]:
    """A run's ``round`` records from metrics.jsonl, in order."""
    from fedumm.runtime.run_dir import RunDirectory

    return [m for m in RunDirectory(run).metrics() if m.get("type") == "round"]
