"""Oracle tests: the ``nf4`` and ``int8b`` codecs against bitsandbytes on CPU (issue 24).

Optional: skipped unless bitsandbytes is installed (``pip install -e '.[oracles]'``; tested
with bitsandbytes 0.50.2 and the CPU build of torch 2.13).

What is compared, and why not everything bit for bit:

* ``nf4``: bitsandbytes' ``quantize_4bit(quant_type="nf4")`` has the same 16 levels in the same
  order (code i is level i), one float32 absmax per block and nearest-level codes, so codes and
  scales are compared bit for bit, and fedumm's decode equals ``dequantize_4bit`` bit for bit
  (both are ``level * absmax`` in float32). Three layout differences, each checked as such:
  bitsandbytes packs the first of two codes in the *high* nibble, fedumm in the low one; it pads
  an odd count with the code of 0.0 (7), fedumm with 0; it stores ``1e-38`` (a clamp) as the
  absmax of an all-zero *last, partial* block, where fedumm stores 0 (both decode to zeros).
  bitsandbytes normalises with ``x * (1 / absmax)`` where fedumm divides, so a code may differ
  by one level where ``x / absmax`` lies within float32 rounding of a midpoint (one value in
  a million, pinned below); such near-ties are the only difference accepted. Blocks with a
  subnormal absmax (< 1.2e-38) are left out: bitsandbytes' ``1 / absmax`` overflows there.
  Tensors reach ``dequantize_4bit`` flat: on an AVX-512 CPU, bitsandbytes 0.50.2 dequantises a
  2-D shape whose row length is a multiple of 16 but not of the block with the wrong absmax (its
  own round trip of a 16 x 96 tensor is wrong); its ``quantize_4bit`` of 2-D input is right and
  is checked as is.
* ``int8b``: fedumm's codes are linear, ``round(127 * x / absmax)`` in -127..127, while the
  default table of bitsandbytes' ``quantize_blockwise`` is its non-linear "dynamic" map: not the
  same codec. The oracle passes fedumm's levels as the table instead (``code=LINEAR_CODE``,
  entry ``k + 127`` is ``k / 127``), so the layouts match: bitsandbytes' byte ``b`` is fedumm's
  code ``b - 127``. Scales are compared bit for bit, codes bit for bit except near midpoints:
  bitsandbytes' CPU kernel (0.50) rounds ``x / absmax`` to a grid of 65536 points over [-1, 1]
  and looks the code up there, so it may pick the farther of two levels when ``x / absmax`` is
  within half a grid step (1 / 65535) of their midpoint; at each such place fedumm's code is
  checked to be the nearer level in float64 (up to float32 rounding of an exact tie). An
  all-zero block is byte 0 in bitsandbytes and code 0 in fedumm (both decode to zeros), so codes
  are compared only in blocks with a nonzero absmax. Decoded values agree to float32 rounding,
  not bit for bit: fedumm computes ``k * (absmax / 127)``, bitsandbytes
  ``float32(k / 127) * absmax``, two roundings each, so at most about 2 epsilons apart.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load

from fedumm.fl.codecs import NF4_TABLE, decode, encode, parse_codec

bnb = pytest.importorskip(
    "bitsandbytes",
    reason="bitsandbytes is an optional test dependency: pip install -e '.[oracles]'",
)
bnbf = bnb.functional

EPS32 = torch.finfo(torch.float32).eps
TINY32 = torch.finfo(torch.float32).tiny  # smallest normal float32
# fedumm's int8b levels k / 127 (k = -127..127) at entries 0..254, as a 256-entry table for
# bitsandbytes; entry 255 (2.0) lies beyond every normalised value and is never picked.
LINEAR_CODE = torch.cat([torch.arange(-127, 128, dtype=torch.float32) / 127,
                         torch.tensor([2.0])])
# bitsandbytes' CPU quantize_blockwise looks codes up on a 65536-point grid over [-1, 1]:
# the normalised value it uses is off by at most half a grid step.
LUT_HALF_STEP = 1.0 / 65535


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(24)
    zeros = torch.randn(4096, generator=g)
    zeros[::3] = 0.0
    zeros[128:384] = 0.0  # whole all-zero blocks for block 64 and 128
    outliers = torch.randn(4096, generator=g) * 0.01
    outliers[[5, 700, 2047, 3001]] = torch.tensor([1e3, -250.0, 40.0, -1e4])
    zero_tail = torch.randn(3 * 64 + 10, generator=g)
    zero_tail[-10:] = 0.0  # an all-zero last, partial block at block 64
    return {
        "normal": torch.randn(4096, generator=g),
        "lora_shape": torch.randn(16, 96, generator=g),  # 2-D: row-major flattening
        "zeros": zeros,
        "outliers": outliers,
        "odd_size": torch.randn(1037, generator=g),  # not a multiple of any block, odd count
        "zero_tail": zero_tail,
        "update_scale": torch.randn(4096, generator=g) * 1e-5,  # a LoRA update's magnitude
    }


TENSORS = _tensors()
NAMES = sorted(TENSORS)


def _spelling(base: str, block: int) -> str:
    return f"{base}:block={block}"


def _fedumm_streams(base: str, block: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The unpacked ``codes`` and the ``scales`` of fedumm's base step for one tensor."""
    return parse_codec(_spelling(base, block)).base_step.encode(x.reshape(-1).float(), "t")


def _per_value(scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return scales.repeat_interleave(block)[:n]


def _bnb_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Codes from bitsandbytes' 4-bit packing (first code in the high nibble)."""
    b = packed.reshape(-1)
    return torch.stack([b >> 4, b & 0x0F], dim=1).reshape(-1)[:n]


def _bnb_pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes packed as bitsandbytes does (first code in the high nibble), shape (bytes, 1)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def _wire_codes(payload: bytes) -> torch.Tensor:
    """The packed ``codes`` stream as it travels in a fedumm payload (no entropy step)."""
    return st_load(payload)["codes"]


def _assert_only_near_ties(name: str, f_codes: torch.Tensor, b_codes: torch.Tensor,
                           normed: torch.Tensor, levels: torch.Tensor, window: float) -> None:
    """Codes may differ only by one level, where the float64 ``normed`` value (x / absmax) is
    within ``window`` of the midpoint of the two levels, and there fedumm's is the nearer."""
    differ = (f_codes.long() != b_codes.long()).nonzero().reshape(-1)
    if not differ.numel():
        return
    f, b = f_codes.long()[differ], b_codes.long()[differ]
    assert ((f - b).abs() == 1).all(), f"{name}: codes differ by more than one level"
    lv = levels.double()
    midpoint = (lv[f] + lv[b]) / 2
    v = normed[differ]
    dist = (v - midpoint).abs()
    assert (dist <= window).all(), (
        f"{name}: {differ.numel()} codes differ away from a midpoint; first at {differ[0]}: "
        f"x/absmax={v[0].item()!r}, fedumm {f[0].item()}, bitsandbytes {b[0].item()}, "
        f"distance to the midpoint {dist[0].item():.3g} > {window:.3g}")
    # fedumm picks the nearer level (float64), up to float32 rounding of an exact tie
    assert ((v - lv[f]).abs() <= (v - lv[b]).abs() + 4 * EPS32).all(), name


# ---------------------------------------------------------------------------- nf4


def _bnb_nf4(x: torch.Tensor, block: int):
    return bnbf.quantize_4bit(x.float(), blocksize=block, quant_type="nf4")


def test_bnb_nf4_table_is_fedumms() -> None:
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu").float(), NF4_TABLE)


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("name", NAMES)
def test_nf4_codes_and_scales_match_bitsandbytes(name: str, block: int) -> None:
    x = TENSORS[name]
    n = x.numel()
    ours = _fedumm_streams("nf4", block, x)
    packed, state = _bnb_nf4(x, block)
    f_scales, b_scales = ours["scales"], state.absmax
    assert b_scales.dtype == torch.float32 and b_scales.shape == f_scales.shape
    # no subnormal absmax in the oracle data (bitsandbytes' 1 / absmax would overflow)
    assert ((f_scales == 0) | (f_scales >= TINY32)).all()
    zero = f_scales == 0
    assert torch.equal(b_scales[~zero], f_scales[~zero]), f"{name}: absmax differs"
    # an all-zero block: 0 in both, except bitsandbytes' clamp on the last, partial block
    assert (b_scales[zero] <= 1e-38).all() and (b_scales[zero][:-1] == 0).all()
    b_codes = _bnb_nibbles(packed, n)
    per_value = _per_value(f_scales, block, n).double()
    normed = x.reshape(-1).double() / torch.where(per_value > 0, per_value, 1.0)
    # division vs multiplication by the reciprocal: a few float32 ulps of a value <= 1
    _assert_only_near_ties(name, ours["codes"], b_codes, normed, NF4_TABLE, window=4 * EPS32)


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("name", NAMES)
def test_nf4_wire_bytes_are_bitsandbytes_bytes_with_nibbles_swapped(name: str,
                                                                     block: int) -> None:
    x = TENSORS[name]
    n = x.numel()
    wire = _wire_codes(encode({"t": x}, _spelling("nf4", block)))
    packed, _ = _bnb_nf4(x, block)
    b = packed.reshape(-1)
    swapped = ((b & 0x0F) << 4) | (b >> 4)
    assert wire.dtype == torch.uint8 and wire.numel() == b.numel() == (n + 1) // 2
    agree = (_fedumm_streams("nf4", block, x)["codes"] == _bnb_nibbles(packed, n))
    whole = agree[: n - n % 2].reshape(-1, 2).all(dim=1)  # bytes whose two codes agree
    assert torch.equal(wire[: n // 2][whole], swapped[: n // 2][whole])
    if n % 2:  # the last byte: the real code, then the pad (fedumm 0, bitsandbytes 7 = 0.0)
        assert (wire[-1] & 0x0F) == (b[-1] >> 4) and (wire[-1] >> 4) == 0
        assert (b[-1] & 0x0F) == 7


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("name", NAMES)
def test_nf4_decode_equals_bitsandbytes_dequantize(name: str, block: int) -> None:
    x = TENSORS[name].reshape(-1)  # flat for bitsandbytes' dequantize_4bit (see the docstring)
    ours = _fedumm_streams("nf4", block, x)
    decoded = decode(encode({"t": TENSORS[name]}, _spelling("nf4", block)))["t"].reshape(-1)
    # fedumm's own codes and scales, in bitsandbytes' layout, through its dequantize_4bit
    state = bnbf.QuantState(absmax=ours["scales"], shape=x.shape, blocksize=block,
                            quant_type="nf4", dtype=torch.float32)
    theirs = bnbf.dequantize_4bit(_bnb_pack(ours["codes"]), state).reshape(-1)
    assert torch.equal(theirs, decoded), f"{name}: level * absmax differs"
    # end to end: bitsandbytes' quantize + dequantize, equal wherever the codes agree
    packed, state = _bnb_nf4(x, block)
    end_to_end = bnbf.dequantize_4bit(packed, state).reshape(-1)
    agree = ours["codes"] == _bnb_nibbles(packed, x.numel())
    assert torch.equal(end_to_end[agree], decoded[agree])


def test_nf4_a_float32_near_tie_is_the_one_difference_seen() -> None:
    """The only nf4 disagreement found (one of 2**20 values at scale 1e-3): fedumm's float32
    ``x / absmax`` rounds onto the midpoint of levels 9 and 10 (a tie goes to the lower code),
    bitsandbytes' ``x * (1 / absmax)`` lands just above it. The exact quotient is 5e-9 above the
    midpoint, so bitsandbytes' level is the nearer one here, by 5e-9 of a 0.085-wide gap."""
    absmax, v = 0.0028075436130166054, 0.0005713948048651218  # float32 values, exactly
    x = torch.zeros(64)  # one full block (bitsandbytes divides in a last, partial block)
    x[0], x[1] = absmax, v
    ours = _fedumm_streams("nf4", 64, x)["codes"]
    packed, state = _bnb_nf4(x, 64)
    assert (ours[1].item(), _bnb_nibbles(packed, 64)[1].item()) == (9, 10)
    midpoint = (NF4_TABLE[9].double() + NF4_TABLE[10].double()) / 2
    assert (torch.tensor(v) / torch.tensor(absmax)).item() == midpoint.item()
    assert 0 < float(x[1].double() / x[0].double() - midpoint) < 1e-8
    assert torch.equal(ours[[0] + list(range(2, 64))],
                       _bnb_nibbles(packed, 64)[[0] + list(range(2, 64))])


# ---------------------------------------------------------------------------- int8b


def _bnb_int8(x: torch.Tensor, block: int):
    return bnbf.quantize_blockwise(x.float(), code=LINEAR_CODE.clone(), blocksize=block)


@pytest.mark.parametrize("block", [64, 128, 256])
@pytest.mark.parametrize("name", NAMES)
def test_int8b_codes_and_scales_match_bitsandbytes_with_a_linear_table(name: str,
                                                                       block: int) -> None:
    x = TENSORS[name]
    n = x.numel()
    ours = _fedumm_streams("int8b", block, x)
    q, state = _bnb_int8(x, block)
    assert q.dtype == torch.uint8 and int(q.max()) < 255
    assert torch.equal(state.absmax, ours["scales"]), f"{name}: absmax differs"
    per_value = _per_value(ours["scales"], block, n)
    live = per_value > 0  # codes of an all-zero block differ (byte 0 vs code 0), see above
    b_codes = q.reshape(-1).long() - 127
    f_codes = ours["codes"].long()
    assert (f_codes[~live] == 0).all()
    normed = x.reshape(-1).double()[live] / per_value.double()[live]
    window = LUT_HALF_STEP + 4 * EPS32
    _assert_only_near_ties(name, f_codes[live] + 127, b_codes[live] + 127, normed,
                           LINEAR_CODE[:255], window=window)


@pytest.mark.parametrize("block", [64, 128, 256])
@pytest.mark.parametrize("name", NAMES)
def test_int8b_decode_matches_bitsandbytes_dequantize(name: str, block: int) -> None:
    x = TENSORS[name]
    ours = _fedumm_streams("int8b", block, x)
    decoded = decode(encode({"t": x}, _spelling("int8b", block)))["t"].reshape(-1)
    # fedumm's codes and scales through bitsandbytes' dequantize_blockwise (same table)
    bytes_ = (ours["codes"].to(torch.int16) + 127).to(torch.uint8)
    theirs = bnbf.dequantize_blockwise(bytes_, absmax=ours["scales"], code=LINEAR_CODE.clone(),
                                       blocksize=block)
    # k * (absmax / 127) vs float32(k / 127) * absmax: two roundings each side
    torch.testing.assert_close(theirs, decoded, rtol=2 * EPS32, atol=0)
    # end to end, wherever the codes agree (elsewhere they differ by one level, see above)
    q, state = _bnb_int8(x, block)
    end_to_end = bnbf.dequantize_blockwise(q, state).reshape(-1)
    all_zero_block = _per_value(ours["scales"], block, x.numel()) == 0
    agree = (q.reshape(-1).long() - 127 == ours["codes"].long()) | all_zero_block
    torch.testing.assert_close(end_to_end[agree], decoded[agree], rtol=2 * EPS32, atol=0)


# ---------------------------------------------------------------------------- many values


@pytest.mark.parametrize("base", ["nf4", "int8b"])
def test_disagreements_on_a_million_values_are_near_ties(base: str) -> None:
    """On 2**20 values the codes disagree only at midpoints (nf4: none with this seed;
    int8b: 989, from bitsandbytes' 65536-point lookup), and at every disagreement fedumm's code
    is the nearer level up to float32 rounding."""
    block = 64
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)) * 1e-3
    ours = _fedumm_streams(base, block, x)
    per_value = _per_value(ours["scales"], block, x.numel()).double()
    normed = x.double() / per_value
    if base == "nf4":
        packed, state = _bnb_nf4(x, block)
        codes, levels, window = _bnb_nibbles(packed, x.numel()).long(), NF4_TABLE, 4 * EPS32
        ours_idx = ours["codes"].long()
    else:  # table entries: fedumm's code + 127
        packed, state = _bnb_int8(x, block)
        codes, levels, window = packed.long(), LINEAR_CODE[:255], LUT_HALF_STEP + 4 * EPS32
        ours_idx = ours["codes"].long() + 127
    assert torch.equal(state.absmax, ours["scales"])
    _assert_only_near_ties(base, ours_idx, codes, normed, levels, window)
    differ = int((ours_idx != codes).sum())
    assert differ < x.numel() // 500, f"{base}: {differ} codes differ"
