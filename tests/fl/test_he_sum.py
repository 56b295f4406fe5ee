"""FLARE's homomorphic encryption as the secure sum (fedumm.fl.he_sum), in process: the sum of
the inputs that arrived within CKKS's error, the secure weighted mean against the strategy's
plain one, and the keys where they belong."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from fedumm.config import ConfigError, SecAggConfig, StrategyConfig, load_config
from fedumm.fl.he_sum import (
    CLIENT_CONTEXT,
    HE_DECRYPT,
    HE_ENCRYPT,
    SERVER_CONTEXT,
    SLOTS,
    HESite,
    HESumRound,
    decode_vectors,
    load_context,
    provision_contexts,
)
from fedumm.fl.secagg import SecureRound, round_groups
from fedumm.fl.secure_sum import InProcessParties, SecAggAbort
from fedumm.fl.strategies import FedAvg
from fedumm.models.reference import REFERENCE_GROUPS as REF


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    server, client = provision_contexts(tmp_path_factory.mktemp("he"))
    return load_context(server, secret=False), load_context(client, secret=True)


def sites(ids, client_ctx, rnd, inputs):
    out = {k: HESite(k, client_ctx) for k in ids}
    for k, site in out.items():
        site.hold(rnd, lambda plan, k=k: (inputs[k], 0))
    return out


def test_the_server_adds_ciphertexts_and_one_site_decrypts_the_sum(contexts) -> None:
    server_ctx, client_ctx = contexts
    length = SLOTS + 100  # two ciphertexts, the second one partly filled
    rng = np.random.default_rng(0)
    inputs = {k: rng.normal(0, 0.05, length) for k in range(5)}
    parties = InProcessParties(sites(range(5), client_ctx, 3, inputs))
    res = HESumRound(3, list(range(5)), length, parties, server_ctx).finish([0, 1, 3, 4])
    exact = sum(inputs[k] for k in (0, 1, 3, 4))
    assert res.total.dtype == np.float64 and res.total.shape == (length,)
    assert 0 < np.abs(res.total - exact).max() < 1e-7  # CKKS: approximate, close
    assert res.inputs == {0, 1, 3, 4} and res.dropped == {"before_input": [2]}
    up, down = res.traffic[HE_ENCRYPT]
    assert down == 0 and up > 10 * 4 * 4 * length  # ciphertexts dwarf float32 bytes
    sum_up, sum_down = res.traffic[HE_DECRYPT]
    assert sum_up == 8 * length  # the decrypted float64 sum
    assert abs(sum_down - up / 4) < 0.01 * up / 4  # the summed ciphertexts: one site's size


def test_the_server_cannot_decrypt_and_a_site_must(contexts, tmp_path) -> None:
    server_ctx, client_ctx = contexts
    blob = ts.ckks_vector(client_ctx, [1.0, 2.0]).serialize()
    (on_server,) = decode_vectors(len(blob).to_bytes(4, "little") + blob, server_ctx)
    with pytest.raises(ValueError, match="secret"):
        on_server.decrypt()
    with pytest.raises(ValueError, match="holds the secret key"):
        HESumRound(0, [0], 2, InProcessParties({}), client_ctx)
    with pytest.raises(ValueError, match="lacks the secret key"):
        HESite(0, server_ctx)
    (tmp_path / "c").write_bytes(server_ctx.serialize())
    with pytest.raises(ValueError, match="must hold the secret key"):
        load_context(tmp_path / "c", secret=True)
    server, client = provision_contexts(tmp_path / "kit")
    assert (server.name, client.name) == (SERVER_CONTEXT, CLIENT_CONTEXT)
    again = provision_contexts(tmp_path / "kit")  # kept: a resumed run keeps its keys
    assert again[1].read_bytes() == client.read_bytes()


def test_a_wrong_length_or_malformed_ciphertext_aborts(contexts) -> None:
    server_ctx, client_ctx = contexts
    inputs = {0: np.zeros(10), 1: np.zeros(11)}
    parties = InProcessParties(sites([0, 1], client_ctx, 0, inputs))
    with pytest.raises(SecAggAbort, match="client 1 sent 11 encrypted entries, expected 10"):
        HESumRound(0, [0, 1], 10, parties, server_ctx).finish([0, 1])
    with pytest.raises(SecAggAbort, match="malformed"):
        decode_vectors(b"\xff\0\0\0abc", server_ctx)


def test_the_he_weighted_mean_is_the_strategys_mean(contexts) -> None:
    import torch

    from fedumm.fl.updates import GENERATION, UNDERSTANDING, ClientUpdate
    from fedumm.models.protocol import IMAGE_INPUTS

    server_ctx, _ = contexts
    v = "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    g = "base_model.model.gen_head.lora_A.weight"
    gen = torch.Generator().manual_seed(0)
    ref = {k: torch.randn(30, generator=gen) for k in (v, g)}
    ups = [ClientUpdate(c, {k: ref[k] + 0.1 * torch.randn(30, generator=gen)
                            for k in ((v,) if c % 2 == 0 else (g,))},
                        {UNDERSTANDING: 5 * (c + 1) * (c % 2 == 0),
                         GENERATION: 3 * (c + 1) * (c % 2), IMAGE_INPUTS: 0})
           for c in range(4)]
    strategy = FedAvg(StrategyConfig(), 4, 0, groups=REF)
    groups, weights = round_groups(strategy, ref, ups)
    parties = InProcessParties({k: HESite(k, contexts[1]) for k in range(4)},
                               he_context=server_ctx)
    secure = SecureRound(2, list(range(4)), ref, groups,
                         SecAggConfig(enabled=True, method="he"), seed=0, parties=parties)
    mean, record = secure.finish(ups, weights, dropped={3})
    plain = strategy.aggregate(2, ref, ups[:3])  # the oracle: the strategy's own mean
    after = strategy.aggregate(2, ref, [mean])
    for k in ref:
        assert float((after[k] - plain[k]).abs().max()) < 1e-6  # float32: often equal
    assert record["method"] == "he" and record["inputs"] == 3
    assert record["dropped_before_input"] == [3] and "threshold" not in record


def test_config_takes_he_on_flare_runtimes_only() -> None:
    assert load_config(None, ["secagg.enabled=true", "secagg.method=he",
                              "runtime=flare-sim"]).secagg.method == "he"
    with pytest.raises(ConfigError, match="secagg.method=he.*runtime=flare-sim"):
        load_config(None, ["secagg.enabled=true", "secagg.method=he"])
    with pytest.raises(ConfigError, match="secagg.method"):
        load_config(None, ["secagg.method=paillier"])


def test_a_site_finds_its_context_in_the_startup_kit_it_runs_in(tmp_path) -> None:
    from fedumm.runtime.flare.client import startup_file

    kit = tmp_path / "site-1"
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / CLIENT_CONTEXT).write_bytes(b"x")
    job = kit / "0f3a" / "app_site-1"
    job.mkdir(parents=True)
    assert startup_file(CLIENT_CONTEXT, job) == kit / "startup" / CLIENT_CONTEXT
    with pytest.raises(FileNotFoundError, match="not provisioned with FLARE's HEBuilder"):
        startup_file(SERVER_CONTEXT, job)
