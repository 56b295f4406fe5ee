"""SecAgg+ on the wire (fedumm.fl.secure_sum): every message round-trips through its bytes,
the bytes the server counts are the bytes that travel, and a client's side refuses messages
out of order, malformed or from someone else."""

from __future__ import annotations

import numpy as np
import pytest

from fedumm.fl.secure_sum import (
    ADVERTISE,
    SHARE,
    InProcessParties,
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    SecAggSite,
    SecureSumRound,
    decode_keys,
    decode_masked,
    decode_request,
    decode_sealed,
    decode_shares,
    decode_unmask,
    encode_keys,
    encode_masked,
    encode_request,
    encode_sealed,
    encode_shares,
    encode_unmask,
    neighbour_graph,
)


def test_every_message_round_trips_and_is_as_long_as_the_server_counts() -> None:
    ids = [3, 5, 8, 13]
    graph = neighbour_graph(ids, 0, 0, 0)
    server = SecAggServer(0, graph, 2, 6)
    parties = {k: SecAggClient(k, 0, graph[k], 2) for k in ids}
    keys = [p.advertise_keys() for p in parties.values()]
    for m in keys:
        assert decode_keys(encode_keys([m])) == {m.client: m}
        assert len(encode_keys([m])) == m.nbytes
    routed = server.receive_keys(keys)
    assert decode_keys(encode_keys(list(routed[3].values()))) == routed[3]
    shares = [parties[k].share_keys(routed[k]) for k in ids]
    for m in shares:
        assert decode_shares(encode_shares(m)) == m and len(encode_shares(m)) == m.nbytes
    inbox = server.receive_shares(shares)
    assert decode_sealed(encode_sealed(inbox[5])) == inbox[5]
    x = np.arange(6, dtype=np.uint32)
    masked = [parties[k].masked_input(x, inbox[k]) for k in ids[:3]]  # client 13 drops
    for m in masked:
        back = decode_masked(encode_masked(m))
        assert back.client == m.client and np.array_equal(back.vector, m.vector)
        assert back.vector.dtype == np.uint32 and len(encode_masked(m)) == m.nbytes
    request = server.receive_masked(masked)
    assert request.dropped == {13}
    assert decode_request(encode_request(request)) == request
    assert len(encode_request(request)) == request.nbytes
    answers = [parties[k].unmask(request) for k in ids[:3]]
    for m in answers:
        assert m.key_shares and m.seed_shares  # both kinds: 13 dropped, the others did not
        assert decode_unmask(encode_unmask(m), request) == m
        assert len(encode_unmask(m)) == m.nbytes
    assert np.array_equal(server.unmask(answers), 3 * x)


@pytest.mark.parametrize("decode,blob", [(decode_keys, b"\0" * 67), (decode_shares, b"\0" * 5),
                                         (decode_masked, b"\0" * 7),
                                         (decode_request, b"\x05\0\0\0" + b"\0" * 8)])
def test_a_malformed_message_aborts(decode, blob) -> None:
    with pytest.raises(SecAggAbort, match="malformed"):
        decode(blob)


class Impostor(InProcessParties):
    """Client 1 answers the advertise stage with client 2's keys."""

    def exchange(self, rnd, stage, messages):
        out = super().exchange(rnd, stage, messages)
        if stage == ADVERTISE:
            out[1] = out[2]
        return out


def test_a_message_that_claims_another_sender_aborts_the_round() -> None:
    sites = {k: SecAggSite(k) for k in range(4)}
    with pytest.raises(SecAggAbort, match="client 1's advertise_keys message claims to come "
                                          "from 2"):
        SecureSumRound(0, list(sites), neighbour_graph(list(sites), 0, 0, 0), 2, 4,
                       Impostor(sites))


def test_a_site_answers_only_in_order_and_masks_only_the_input_it_holds() -> None:
    site = SecAggSite(0)
    with pytest.raises(SecAggAbort, match="before its keys"):
        site.handle(0, SHARE, b"", {})
    sites = {k: SecAggSite(k) for k in range(3)}
    rnd = SecureSumRound(7, [0, 1, 2], neighbour_graph([0, 1, 2], 0, 0, 7), 2, 4,
                         InProcessParties(sites))
    sites[0].hold(6, lambda plan: (np.zeros(4, np.uint32), 0))  # last round's input
    with pytest.raises(SecAggAbort, match="client 0: asked to mask an input for round 7"):
        rnd.finish([0, 1, 2])
    with pytest.raises(SecAggAbort, match="unknown secure aggregation stage"):
        sites[1].handle(7, "reveal_everything", b"", {})


def test_a_round_over_the_wire_sums_the_held_inputs_and_passes_the_plan() -> None:
    sites = {k: SecAggSite(k) for k in range(5)}
    plans = {}
    for k, site in sites.items():
        def input_of(plan, k=k):
            plans[k] = plan
            return np.full(3, k * plan["factor"], np.uint32), k
        site.hold(2, input_of)
    parties = InProcessParties(sites, dropped_after_input=frozenset({4}))
    res = SecureSumRound(2, list(sites), neighbour_graph(list(sites), 0, 0, 2), 3, 3,
                         parties).finish([0, 1, 2, 4], lambda k: {"plan": {"factor": 10 + k}})
    assert res.inputs == {0, 1, 2, 4}  # 3 was not asked; 4 sent its input, then dropped
    assert res.total.tolist() == [sum(k * (10 + k) for k in (0, 1, 2, 4))] * 3
    assert res.dropped == {"before_shares": [], "before_input": [3], "after_input": [4]}
    assert {k: a["clipped"] for k, a in res.answers.items()} == {0: 0, 1: 1, 2: 2, 4: 4}
    assert plans == {k: {"factor": 10 + k} for k in (0, 1, 2, 4)}
