"""A base codec registered from outside the package composes with topk and entropy steps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedumm.fl.codecs import (
    bytes_per_value,
    carries_values,
    decode,
    encode,
    parse_codec,
    payload_info,
)
from fedumm.fl.codecs.base import BaseCodec
from fedumm.registry import CODECS


class Toy(BaseCodec):
    """Affine uint8 codes per tensor: code = round((x - lo) / step), step = (hi - lo) / 255;
    the ``scales`` stream holds (lo, step) for each tensor."""

    name = "toy"

    def stream_dtypes(self) -> dict[str, torch.dtype]:
        return {"codes": torch.uint8, "scales": torch.float32}

    def counts(self, n: int) -> dict[str, int]:
        return {"codes": n, "scales": 2}

    def encode(self, v: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        lo, hi = (float(v.min()), float(v.max())) if v.numel() else (0.0, 0.0)
        step = (hi - lo) / 255 or 1.0
        codes = torch.round((v - lo) / step).clamp_(0, 255).to(torch.uint8)
        return {"codes": codes, "scales": torch.tensor([lo, step])}

    def decode(self, n: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        lo, step = parts["scales"]
        return lo + parts["codes"].to(torch.float32) * step


@pytest.fixture
def toy() -> Iterator[None]:
    CODECS.register("toy", Toy)
    yield
    CODECS.unregister("toy")


def test_toy_spellings_parse_and_resolve(toy: None) -> None:
    assert "toy" in CODECS
    spec = parse_codec(" TOY ")
    assert (spec.base, spec.block, str(spec)) == ("toy", None, "toy")
    composed = CODECS.resolve("topk:0.5+toy+zlib")
    assert composed == parse_codec("topk:0.5+toy+zlib")
    assert str(composed) == "topk:0.5+toy+zlib" and composed.sparse and not composed.lossless
    assert not carries_values("toy")
    with pytest.raises(ValueError, match="unknown step 'toy:block=4'"):
        parse_codec("toy:block=4")  # takes no argument
    with pytest.raises(ValueError, match="one base step"):
        parse_codec("toy+int8")


def test_toy_roundtrip_by_hand(toy: None) -> None:
    x = torch.tensor([-1.0, 0.25, 0.5, 1.0])
    out = decode(encode({"x": x}, "toy"))["x"]
    # lo = -1, step = 2/255; codes 0, round(159.375) = 159, round(191.25) = 191, 255
    expected = torch.tensor([-1.0, -1 + 159 * 2 / 255, -1 + 191 * 2 / 255, 1.0])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert payload_info(encode({"x": x}, "toy"))["codec"] == "toy"


def test_toy_under_topk_and_zlib(toy: None) -> None:
    x = torch.tensor([[0.1, -4.0], [0.2, 2.0]])
    payload = encode({"w": x}, "topk:0.5+toy+zlib")
    assert payload[:4] == b"FUMZ"
    out = decode(payload)["w"]
    # topk keeps -4 and 2 (positions 1, 3); toy codes them as lo = -4 (code 0), -4 + 255 * 6/255
    torch.testing.assert_close(out, torch.tensor([[0.0, -4.0], [0.0, 2.0]]), rtol=0, atol=1e-6)
    assert decode(encode({"w": x}, CODECS.resolve("topk:0.5+toy+zlib")))["w"].equal(out)
    # 2 kept codes + 2 float32 scales + 2 one-byte positions, over 4 values
    assert bytes_per_value("topk:0.5+toy", numel=4) == (2 + 8 + 2) / 4


def test_unknown_step_names_the_valid_steps(toy: None) -> None:
    with pytest.raises(ValueError, match="unknown step 'half9'") as info:
        parse_codec("topk:0.1+half9")
    message = str(info.value)
    for name in ("float32", "bfloat16", "float16", "int8b", "nf4", "fp4", "toy", "zlib", "zstd"):
        assert name in message
    with pytest.raises(ValueError, match="unknown step"):
        CODECS.resolve("half9")


def test_unregistered_toy_is_unknown_again() -> None:
    CODECS.register("toy", Toy)
    assert str(parse_codec("toy")) == "toy"
    CODECS.unregister("toy")
    with pytest.raises(ValueError, match="unknown step 'toy'") as info:
        parse_codec("toy")
    assert "| toy" not in str(info.value)
