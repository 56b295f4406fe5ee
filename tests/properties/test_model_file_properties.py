"""Property tests of checkpoint and model-file loading: a run checkpoint (``state.pt``), a
safetensors file and a model folder that are empty, cut short at any byte, random, or hold
NaN (with valid checksums) are one clear error naming the file; intact ones load unchanged."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fedumm.models.checksums import check_tensor_file
from fedumm.models.loading import load_for_eval
from fedumm.models.reference.micro import micro_backbone
from fedumm.runtime.run_dir import RunDirectory, RunDirError


def checkpoint(nan_at: str | None = None) -> dict:
    """A state.pt as a round writes it (server part, client part, counters)."""
    state = {"round": 2, "states": [{"a.lora_A": torch.ones(3, 2), "a.lora_B": torch.zeros(2)}],
             "strategy": {"m": torch.ones(2)}, "residual": {},
             "transport": {"clients": {0: {"optimizer": torch.full((2,), math.nan)}}},
             "counters": {"upload": [10], "eval_s": 0.5}, "fingerprint": "f" * 64}
    if nan_at == "states":
        state["states"][0]["a.lora_B"] = torch.tensor([0.0, math.nan])
    elif nan_at == "strategy":
        state["strategy"]["m"] = torch.tensor([math.inf, 1.0])
    return state


def saved(state: object) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


WHOLE = saved(checkpoint())


@given(st.one_of(st.integers(min_value=0, max_value=len(WHOLE)).map(lambda n: WHOLE[:n]),
                 st.binary(max_size=100),
                 st.sampled_from(["states", "strategy"]).map(lambda k: saved(checkpoint(k))),
                 st.sampled_from([[], {}, {"round": 1}, {"round": -1, "states": [],
                                                          "strategy": {}, "counters": {},
                                                          "fingerprint": ""}, 3]).map(saved)))
@settings(max_examples=80)
def test_a_checkpoint_loads_intact_or_names_the_file(tmp_path_factory, data):
    run = RunDirectory(tmp_path_factory.mktemp("run"))
    run.checkpoint_file.parent.mkdir()
    run.checkpoint_file.write_bytes(data)
    try:
        state = run.load_checkpoint()
    except RunDirError as exc:
        assert "state.pt" in str(exc) and "\n" not in str(exc)
    else:
        # only the whole file loads; a client's NaN optimizer state is not the server's
        assert data == WHOLE and state["round"] == 2
        assert torch.equal(state["states"][0]["a.lora_A"], torch.ones(3, 2))


@pytest.fixture(scope="module")
def tensor_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    save_file({"a": torch.ones(5, 4), "b": torch.arange(6, dtype=torch.float32)}, str(path))
    return path.read_bytes()


@given(st.data())
@settings(max_examples=60)
def test_a_safetensors_file_reads_whole_or_names_the_file(tmp_path_factory, tensor_file, data):
    cut = data.draw(st.integers(min_value=0, max_value=len(tensor_file)))
    path = tmp_path_factory.mktemp("cut") / "adapter_model.safetensors"
    path.write_bytes(tensor_file[:cut])
    try:
        check_tensor_file(path)
    except ValueError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert cut == len(tensor_file)


def test_a_nan_model_with_valid_checksums_is_refused(tmp_path):
    bb = micro_backbone(0)
    with torch.no_grad():
        next(bb.model.parameters()).view(-1)[0] = math.nan
    bb.save(tmp_path / "ck")  # checksums and fingerprint written for the NaN weights
    with pytest.raises(ValueError, match=r"model\.safetensors: .* NaN or infinite"):
        load_for_eval(tmp_path / "ck")


@pytest.mark.parametrize("content", [b"", b"\x00" * 8, b"{}"])
def test_an_empty_or_truncated_adapter_file_is_named(tmp_path, content):
    run = tmp_path / "run"
    (run / "adapters").mkdir(parents=True)
    (run / "adapters" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (run / "adapters" / "adapter_model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors (is empty|cannot be read)"):
        load_for_eval(run)


def test_an_empty_state_pt_is_named(tmp_path):
    run = RunDirectory(tmp_path)
    run.checkpoint_file.parent.mkdir()
    run.checkpoint_file.write_bytes(b"")
    with pytest.raises(RunDirError, match=r"state\.pt is empty"):
        run.load_checkpoint()
