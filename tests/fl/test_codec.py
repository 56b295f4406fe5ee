"""fedumm.fl.codecs: spellings, per-codec error bounds, sizes, determinism, error feedback."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import zlib

import pytest
import torch

from fedumm.fl import codecs
from fedumm.fl.codecs import (
    FP4_TABLE,
    NF4_TABLE,
    CodecSpec,
    ErrorFeedback,
    bytes_per_value,
    carries_values,
    decode,
    encode,
    parse_codec,
    payload_info,
    roundtrip,
)

A = "base_model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"
EXAMPLES = [
    "float32", "bfloat16", "float16", "int8", "int8b", "nf4", "fp4", "topk:0.01",
    "topk:0.05+int8", "topk:0.1+bfloat16+zlib", "nf4+zlib", "int8:block=128",
]
HAS_ZSTD = importlib.util.find_spec("zstandard") is not None


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def adapters(seed: int = 0) -> dict[str, torch.Tensor]:
    return {A: randn(16, 96, seed=seed), B: randn(80, 16, seed=seed + 1),
            "base_model.model.bias": randn(50, seed=seed + 2)}


def blocks(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    return list(x.reshape(-1).split(block))


# ---------------------------------------------------------------------------- spelling


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_parse_and_canonical_spelling_reparses(text: str) -> None:
    spec = parse_codec(text)
    assert isinstance(spec, CodecSpec)
    assert parse_codec(str(spec)) == spec
    assert parse_codec(f" {text.upper()} ") == spec


def test_parse_fields() -> None:
    assert parse_codec("int8b") == parse_codec("int8:block=64") == CodecSpec("int8b", 64)
    assert str(parse_codec("int8:block=64")) == "int8b"
    assert str(parse_codec("int8:block=128")) == "int8:block=128"
    assert parse_codec("nf4").block == 64 and parse_codec("fp4").block == 64
    s = parse_codec("topk:0.1+bfloat16+zlib")
    assert (s.topk_fraction, s.topk_count, s.base, s.entropy) == (0.1, None, "bfloat16", "zlib")
    assert str(s) == "topk:0.1+bfloat16+zlib" and s.sparse and not s.lossless
    t = parse_codec("topk:1000")
    assert (t.topk_fraction, t.topk_count, t.base) == (None, 1000, "float32")
    assert str(parse_codec("topk:0.01")) == "topk:0.01+float32"
    assert parse_codec("float32").lossless and parse_codec("float32+zlib").lossless
    assert not parse_codec("bfloat16").lossless and not parse_codec("float32").sparse
    assert parse_codec("topk:1.0").topk_fraction == 1.0 and parse_codec("topk:1").topk_count == 1
    with pytest.raises(AttributeError):
        s.base = "int8"  # frozen


@pytest.mark.parametrize("text", [
    "", "int4", "float32+", "+int8", "int8+topk:0.1", "zlib+int8", "int8+nf4", "topk:0",
    "topk:1.5", "topk:-3", "topk:abc", "topk:0.1+topk:0.2", "nf4+zlib+zlib", "int8:block=0",
    "float32:block=64", "int8:block=x", "topk:nan", "zstd+zlib",
])
def test_bad_spellings_list_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="accepted spellings"):
        parse_codec(text)


def test_carries_values_only_for_dense_plain_casts() -> None:
    assert all(carries_values(t) for t in ("float32", "bfloat16", "float16+zlib"))
    assert carries_values(parse_codec("float16"))
    assert not any(carries_values(t) for t in ("topk:0.5", "topk:1.0+bfloat16", "int8", "int8b",
                                                "nf4+zlib", "fp4"))


def test_topk_keep_counts() -> None:
    assert parse_codec("topk:0.05").keep(16384) == 819  # 819.2 rounds to 819
    assert parse_codec("topk:0.01").keep(10) == 1  # at least one
    assert parse_codec("topk:1000").keep(50) == 50  # capped at numel
    assert parse_codec("topk:0.01").keep(0) == 0


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_roundtrip_keys_shapes_dtype_and_bytes(text: str) -> None:
    x = adapters()
    payload = encode(x, text)
    assert isinstance(payload, bytes)
    out = decode(payload)
    assert list(out) == sorted(x)
    for k in x:
        assert out[k].shape == x[k].shape and out[k].dtype == torch.float32
    received, nbytes = roundtrip(x, text)
    assert nbytes == len(payload)
    assert all(torch.equal(received[k], out[k]) for k in x)
    info = payload_info(payload)
    assert info["codec"] == str(parse_codec(text))
    assert [e[0] for e in info["tensors"]] == sorted(x)


def test_float32_is_exact_and_dtypes_restore() -> None:
    x = {**adapters(), "half": randn(7, 3).to(torch.bfloat16)}
    out = decode(encode(x, "float32"))
    assert all(torch.equal(out[k], x[k].float()) for k in x)
    restored = decode(encode(x, "float32"), restore_dtype=True)
    assert restored["half"].dtype == torch.bfloat16 and torch.equal(restored["half"], x["half"])


@pytest.mark.parametrize(("text", "rel", "absolute"), [
    ("bfloat16", 2.0**-8, 0.0), ("float16", 2.0**-11, 2.0**-25),
])
def test_half_precision_relative_error(text: str, rel: float, absolute: float) -> None:
    x = randn(256, 64)
    y = decode(encode({"x": x}, text))["x"]
    assert bool(((y - x).abs() <= rel * x.abs() + absolute).all())


def test_float16_overflow_is_refused() -> None:
    with pytest.raises(ValueError, match="float16 range"):
        encode({A: torch.tensor([1e6])}, "float16")


def test_int8_per_tensor_bound() -> None:
    x = randn(256, 64)
    y = decode(encode({"x": x}, "int8"))["x"]
    absmax = x.abs().max()
    assert float((y - x).abs().max()) <= float(absmax) / 127 / 2 * (1 + 1e-5)
    # at most 255 distinct levels, all multiples of absmax/127
    assert torch.unique(y).numel() <= 255


@pytest.mark.parametrize("block", [64, 128])
def test_int8_blockwise_bound_per_block(block: int) -> None:
    x = randn(256, 64) * torch.linspace(0.01, 10, 256).unsqueeze(1)  # blocks of very different size
    y = decode(encode({"x": x}, f"int8:block={block}"))["x"]
    for xb, yb in zip(blocks(x, block), blocks(y, block), strict=True):
        assert float((yb - xb).abs().max()) <= float(xb.abs().max()) / 127 / 2 * (1 + 1e-5)


def half_max_gap(table: torch.Tensor) -> float:
    return float((table[1:] - table[:-1]).max()) / 2


def test_tables() -> None:
    assert NF4_TABLE.numel() == 16 and FP4_TABLE.numel() == 15
    for table in (NF4_TABLE, FP4_TABLE):
        assert table.dtype == torch.float32
        assert bool((table[1:] > table[:-1]).all())
        assert float(table[0]) == -1.0 and float(table[-1]) == 1.0 and 0.0 in table.tolist()
    assert float(NF4_TABLE[8]) == pytest.approx(0.07958029955625534, abs=0)
    assert sorted(set((FP4_TABLE.abs() * 6).tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize(("text", "table"), [("nf4", NF4_TABLE), ("fp4", FP4_TABLE)])
def test_4bit_values_are_table_levels_and_error_bounded(text: str, table: torch.Tensor) -> None:
    x = randn(256, 64) * torch.linspace(0.01, 10, 256).unsqueeze(1)
    y = decode(encode({"x": x}, text))["x"]
    bound = half_max_gap(table)
    for xb, yb in zip(blocks(x, 64), blocks(y, 64), strict=True):
        absmax = xb.abs().max()
        levels = table * absmax
        assert bool(torch.isin(yb, levels).all())
        assert float((yb - xb).abs().max()) <= bound * float(absmax) * (1 + 1e-5)
        # each value got its nearest level
        nearest = levels[(xb.unsqueeze(1) - levels).abs().argmin(dim=1)]
        assert bool(((yb - xb).abs() <= (nearest - xb).abs() + 1e-6 * absmax).all())


def test_topk_keeps_largest_magnitudes_exactly() -> None:
    x = randn(256, 64)
    k = parse_codec("topk:0.05").keep(x.numel())
    y = decode(encode({"x": x}, "topk:0.05"))["x"]
    expected = torch.topk(x.abs().flatten(), k).indices
    kept = torch.nonzero(y.flatten()).flatten()
    assert kept.numel() == k == 819
    assert torch.equal(torch.sort(kept).values, torch.sort(expected).values)
    assert torch.equal(y.flatten()[kept], x.flatten()[kept])  # float32 values are exact
    counted = decode(encode({"x": x}, "topk:1000"))["x"]
    assert int((counted != 0).sum()) == 1000


def test_topk_with_int8_values() -> None:
    x = randn(256, 64)
    k = parse_codec("topk:0.05").keep(x.numel())
    y = decode(encode({"x": x}, "topk:0.05+int8"))["x"].flatten()
    pos = torch.sort(torch.topk(x.abs().flatten(), k).indices).values
    others = torch.ones(x.numel(), dtype=torch.bool)
    others[pos] = False
    assert bool((y[others] == 0).all())
    kept = x.flatten()[pos]
    bound = float(kept.abs().max()) / 127 / 2 * (1 + 1e-5)
    assert float((y[pos] - kept).abs().max()) <= bound


@pytest.mark.parametrize("numel", [200, 60_000, 70_000])
def test_topk_index_widths(numel: int) -> None:
    x = randn(numel)
    payload = encode({"x": x}, "topk:0.5")
    y = decode(payload)["x"]
    keep = torch.topk(x.abs(), numel // 2).indices
    assert torch.equal(y[keep], x[keep]) and int((y != 0).sum()) == numel // 2
    bits = 8 if numel <= 256 else 16 if numel <= 65536 else 32
    header = json.loads(payload[8:8 + int.from_bytes(payload[:8], "little")])
    assert f"index{bits}" in header


# ---------------------------------------------------------------------------- sizes


def test_sizes_of_a_million_entries() -> None:
    x = {"x": randn(1_000_000)}
    full = len(encode(x, "float32"))
    assert len(encode(x, "int8")) < 0.3 * full
    assert len(encode(x, "nf4")) < 0.16 * full
    assert len(encode(x, "topk:0.01")) < 0.03 * full
    for text in ["float32", "bfloat16", "int8", "int8b", "nf4", "fp4", "topk:0.01",
                 "topk:0.01+int8", "topk:0.05+nf4"]:
        measured = len(encode(x, text)) / 1_000_000
        assert measured == pytest.approx(bytes_per_value(text), rel=0.05), text


def test_bytes_per_value_by_hand() -> None:
    assert bytes_per_value("float32") == 4.0
    assert bytes_per_value("bfloat16") == 2.0 and bytes_per_value("float16") == 2.0
    assert bytes_per_value("int8") == pytest.approx(1.0, rel=1e-4)
    assert bytes_per_value("nf4") == pytest.approx(0.5 + 4 / 64, rel=1e-4)
    assert bytes_per_value("topk:0.01+int8") == pytest.approx(0.01 * (4 + 1), rel=1e-3)
    assert bytes_per_value("nf4+zlib") == bytes_per_value("nf4")


def test_zlib_shrinks_a_mostly_zero_payload() -> None:
    x = torch.zeros(100_000)
    x[::50] = randn(2000)
    plain, packed = encode({"x": x}, "float32"), encode({"x": x}, "float32+zlib")
    assert len(packed) < 0.2 * len(plain)
    assert torch.equal(decode(packed)["x"], x)


# ---------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("text", EXAMPLES)
def test_deterministic(text: str) -> None:
    x = adapters()
    reordered = dict(reversed(list(adapters().items())))
    assert encode(x, text) == encode(x, text) == encode(reordered, text)


def test_deterministic_across_processes() -> None:
    # safetensors orders several metadata keys differently per process; one key keeps bytes stable
    code = ("import hashlib, torch; from fedumm.fl.codecs import encode; "
            "g = torch.Generator().manual_seed(0); "
            "x = {'b': torch.randn(70, generator=g), 'a': torch.randn(3, 5, generator=g)}; "
            "print(hashlib.sha256(encode(x, 'topk:0.5+nf4+zlib')).hexdigest())")
    g = torch.Generator().manual_seed(0)
    x = {"b": torch.randn(70, generator=g), "a": torch.randn(3, 5, generator=g)}
    here = hashlib.sha256(encode(x, "topk:0.5+nf4+zlib")).hexdigest()
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert here == there


@pytest.mark.parametrize("text", EXAMPLES)
def test_empty_dict(text: str) -> None:
    assert decode(encode({}, text)) == {}
    assert roundtrip({}, text)[0] == {}


@pytest.mark.parametrize("text", EXAMPLES)
def test_small_zero_and_odd_tensors(text: str) -> None:
    x = {"one_d": randn(37), "tiny": randn(3), "zeros": torch.zeros(8, 8), "scalar": randn(1)[0],
         "empty": torch.zeros(0, 4), "single": torch.tensor([-2.5])}
    out = decode(encode(x, text))
    for k in x:
        assert out[k].shape == x[k].shape and bool(torch.isfinite(out[k]).all())
    assert bool((out["zeros"] == 0).all())
    if not parse_codec(text).sparse:
        # the largest magnitude of a block survives every quantiser
        assert float(out["single"]) == pytest.approx(-2.5, rel=1e-2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused_naming_the_key(bad: float) -> None:
    x = adapters()
    x[B] = x[B].clone()
    x[B][3, 4] = bad
    with pytest.raises(ValueError, match="lora_B"):
        encode(x, "int8")


def test_non_float_input_is_refused() -> None:
    with pytest.raises(ValueError, match="not a float dtype"):
        encode({"i": torch.arange(4)}, "float32")


# ---------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("text", ["float32", "nf4", "topk:0.05+int8", "int8b+zlib"])
def test_truncated_payload_raises_value_error(text: str) -> None:
    payload = encode(adapters(), text)
    for cut in (0, 3, 7, 20, len(payload) // 2, len(payload) - 1):
        with pytest.raises(ValueError, match="corrupt|truncated|not a fedumm"):
            decode(payload[:cut])


@pytest.mark.parametrize("text", ["float32", "nf4", "topk:0.05+int8", "int8b+zlib"])
def test_corrupted_payload_raises_value_error(text: str) -> None:
    payload = bytearray(encode(adapters(), text))
    for at in (len(payload) - 5, len(payload) // 2, 9, 30):
        bad = bytearray(payload)
        bad[at] ^= 0x5A
        with pytest.raises(ValueError, match="corrupt|truncated|not a fedumm|unsupported"):
            decode(bytes(bad))


def test_foreign_safetensors_and_garbage_raise_value_error() -> None:
    from safetensors.torch import save

    with pytest.raises(ValueError, match="not a fedumm"):
        decode(save({"x": torch.zeros(3)}))
    with pytest.raises(ValueError):
        decode(b"FUMZ\x01" + b"not zlib at all")
    with pytest.raises(ValueError):
        decode(b"FUMZ\x09" + zlib.compress(b"x"))
    with pytest.raises(ValueError):
        decode(b"\xff" * 64)


# ---------------------------------------------------------------------------- entropy


@pytest.mark.skipif(not HAS_ZSTD, reason="zstandard not installed")
def test_zstd_roundtrip() -> None:
    x = adapters()
    out = decode(encode(x, "nf4+zstd"))
    ref = decode(encode(x, "nf4"))
    assert all(torch.equal(out[k], ref[k]) for k in x)


def test_zstd_without_package_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    assert parse_codec("int8+zstd").entropy == "zstd"  # spelling is valid either way
    with pytest.raises(ImportError, match="pip install zstandard"):
        encode(adapters(), "int8+zstd")


# ---------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("text", ["topk:0.05", "nf4", "topk:0.1+int8+zlib"])
def test_error_feedback_conserves_the_sum(text: str) -> None:
    ef = ErrorFeedback()
    total_in = {k: torch.zeros_like(v) for k, v in adapters().items()}
    total_out = {k: torch.zeros_like(v) for k, v in adapters().items()}
    for r in range(5):
        x = adapters(seed=10 * r)
        payload, decoded = ef.compress(x, text)
        assert isinstance(payload, bytes)
        assert all(torch.equal(decoded[k], decode(payload)[k]) for k in x)
        for k in x:
            total_in[k] += x[k]
            total_out[k] += decoded[k]
    state = ef.state_dict()
    for k in total_in:
        assert torch.allclose(total_out[k] + state[k], total_in[k], atol=1e-5)
        assert state[k].device.type == "cpu" and state[k].dtype == torch.float32


def test_error_feedback_state_dict_roundtrip_and_missing_keys() -> None:
    ef = ErrorFeedback()
    ef.compress(adapters(), "topk:0.05")
    state = ef.state_dict()
    assert set(state) == set(adapters()) and any(float(v.abs().sum()) > 0 for v in state.values())
    other = ErrorFeedback()
    other.load_state_dict(state)
    x = adapters(seed=3)
    p1, d1 = ef.compress(x, "topk:0.05")
    p2, d2 = other.compress(x, "topk:0.05")
    assert p1 == p2
    # a key absent from a round keeps its residual
    before = ef.state_dict()[A]
    ef.compress({B: randn(80, 16)}, "nf4")
    assert torch.equal(ef.state_dict()[A], before)
    with pytest.raises(ValueError, match="residual"):
        ef.compress({A: randn(3, 3)}, "nf4")


def test_throughput_helper_reports_rates() -> None:
    out = codecs.throughput("nf4", numel=10_000)
    assert out["bytes"] > 0 and out["encode_mb_s"] > 0 and out["decode_mb_s"] > 0
