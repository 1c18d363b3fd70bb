"""Three real retriever servers sharing tenants over Redis: Describe's membership, the not-an-owner
refusal, and the client's re-send to the next owner when a refusal comes or an owner dies."""

from __future__ import annotations

import time

import grpc
import pytest

from protos.specdraft.v1 import retriever_pb2 as pb
from retriever import errors
from retriever.client import RetrieverClient
from retriever.placement import Member, owners
from retriever.status import owners_in
from tests.retriever.outputlog.test_integration import OUTPUT, SERVING, Node

TENANT = "team-7"


def cluster_of(url: str, n: int = 3) -> list[Node]:
    nodes = [Node(redis_url=url, replica_id=f"r{i}", tenant_owners=2, membership_ttl_s=1.0, heartbeat_s=0.1)
             for i in range(n)]
    for node in nodes:
        node.wait_status(SERVING, timeout_s=10)
    deadline = time.monotonic() + 5
    while any(len(node.stub.Describe(pb.DescribeRequest(), timeout=2).members) < n for node in nodes):
        assert time.monotonic() < deadline, "every replica must list the others within 5 s"
        time.sleep(0.02)
    return nodes


def address(node: Node) -> str:
    return f"127.0.0.1:{node.server.port}"


@pytest.mark.parametrize("store", ["redis_server", "redis_cluster"])
def test_describe_names_the_owners_and_a_non_owner_refuses_naming_them(request, store):
    nodes = cluster_of(request.getfixturevalue(store).url)
    try:
        d = nodes[0].stub.Describe(pb.DescribeRequest(tenant=TENANT), timeout=2)
        members = [Member(m.replica_id, m.address, m.capacity) for m in d.members]
        assert sorted(m.replica_id for m in members) == ["r0", "r1", "r2"] and d.owners_per_tenant == 2
        assert [m.address for m in d.owners] == [m.address for m in owners(TENANT, members, 2)]
        owner_ids = {m.replica_id for m in d.owners}
        outsider = next(node for i, node in enumerate(nodes) if f"r{i}" not in owner_ids)
        with pytest.raises(grpc.RpcError) as refused:
            outsider.stub.Draft(pb.DraftRequest(tenant=TENANT, session_id="s", prompt=[1, 2], max_nodes=4), timeout=2)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert owners_in(refused.value.details()) == tuple(m.address for m in d.owners)
        insider = next(node for i, node in enumerate(nodes) if f"r{i}" in owner_ids)
        insider.session(TENANT, [1, 2, 3], OUTPUT)  # an owner drafts and ends sessions of the tenant
    finally:
        for node in nodes:
            node.stop()



def stop_all(nodes) -> None:
    """Stops every node, one already stopped (the killed owner) included."""
    for node in nodes:
        try:
            node.stop()
        except Exception:  # noqa: BLE001 - the stopped owner
            pass


def test_client_sends_sessions_to_owners_and_re_sends_when_an_owner_dies(redis_server):
    nodes = cluster_of(redis_server.url)
    by_address = {address(n): n for n in nodes}
    d = nodes[0].stub.Describe(pb.DescribeRequest(tenant=TENANT), timeout=2)
    first, second = [m.address for m in d.owners]
    outsider = next(a for a in by_address if a not in (first, second))
    client = RetrieverClient(outsider, deadline_s=1.0, call_timeout_s=2.0, backoff_s=(0.05, 0.2))  # seed: not an owner
    try:
        session = client.session(TENANT)
        session.start([5, 6, 7, 8, 9, 5, 6, 7])
        tree = session.draft([8], 8)  # refused by the seed and re-sent, or routed by the membership learnt
        assert tree is not None and int(tree.token_ids[0]) == 9 and session.reroutes <= 1
        session.end(OUTPUT)
        assert session.closed.wait(5) and session.output_tokens == 1 + len(OUTPUT)
        assert client.route(TENANT)[:2] == (first, second)
        assert session._address == first
        time.sleep(1.0)  # the second owner tails the output (the two-replica bar: within 1 s)
        by_address[first].server.stop(0).wait(10)  # the first owner dies; the client still lists it
        s = client.session(TENANT)
        s.start(OUTPUT[:10])
        hit = s.draft([OUTPUT[10]], 8)  # UNAVAILABLE from the dead owner, re-sent at once to the second
        assert hit is not None and int(hit.token_ids[0]) == OUTPUT[11] and int(hit.sources[0]) == 2  # TENANT
        assert s.reroutes == 1 and s._address == second
        s.end()
        assert s.closed.wait(5) and s.output_tokens == 1
    finally:
        client.close()
        stop_all(nodes)


def test_draft_batch_sends_each_call_to_an_owner_of_its_tenant(redis_server):
    from retriever.client import DraftCall

    nodes = cluster_of(redis_server.url)
    client = RetrieverClient(address(nodes[0]), deadline_s=2.0, call_timeout_s=2.0)
    try:
        tenants = [f"team-{i}" for i in range(12)]
        calls = [DraftCall(t, "s", [5, 6, 7, 8, 9, 5, 6, 7], (), 4) for t in tenants]
        replies = client.draft_batch(calls)  # some refused by the seed as not an owner, re-sent to owners
        assert all(not isinstance(r, errors.SpecdraftError) for r in replies), replies
        assert [int(r.tree.token_ids[0]) for r in replies] == [8] * len(tenants)
        with pytest.raises(grpc.RpcError):  # the seed itself refuses a tenant it does not own
            outsider = next(t for t in tenants if address(nodes[0]) not in client.route(t)[:2])
            nodes[0].stub.Draft(pb.DraftRequest(tenant=outsider, session_id="x", prompt=[1], max_nodes=4), timeout=2)
        with pytest.raises(errors.InvalidArgument):
            client.draft_batch([])
    finally:
        client.close()
        for node in nodes:
            node.stop()


def test_not_owner_is_one_row_of_the_status_table():
    from retriever.status import TABLE, error_of, status_of

    e = errors.NotOwner("tenant 't' must be drafted by one of its 2 owners, got r9 (owners: h:1,h:2)", ("h:1", "h:2"))
    assert status_of(e) is TABLE[errors.NotOwner] and status_of(e).grpc == grpc.StatusCode.FAILED_PRECONDITION
    back = error_of(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    assert isinstance(back, errors.NotOwner) and back.owners == ("h:1", "h:2")
    assert type(error_of(grpc.StatusCode.FAILED_PRECONDITION, "tokenizer mismatch")) is errors.FailedPrecondition


def test_session_ends_on_the_next_owner_when_its_replica_refuses_the_end(redis_server):
    nodes = cluster_of(redis_server.url)
    by_address = {address(n): n for n in nodes}
    d = nodes[0].stub.Describe(pb.DescribeRequest(tenant=TENANT), timeout=2)
    first, second = [m.address for m in d.owners]
    client = RetrieverClient(",".join(by_address), deadline_s=1.0, call_timeout_s=2.0, backoff_s=(0.05, 0.2))
    try:
        client.describe()  # the membership: sessions go to the first owner
        session = client.session(TENANT)
        session.start([5, 6, 7, 8, 9, 5, 6, 7])
        assert session.draft([8], 8) is not None and session._address == first
        by_address[first].server.stop(5)  # draining: its open stream goes on, new calls are refused
        deadline = time.monotonic() + 5
        while True:  # until the first owner refuses new calls
            try:
                by_address[first].stub.Describe(pb.DescribeRequest(), timeout=1)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    break  # (a call caught as the stop begins is CANCELLED: probe again)
            assert time.monotonic() < deadline, "the draining replica must refuse new calls"
            time.sleep(0.01)
        session.end(OUTPUT)  # the stream closes cleanly there; EndSession is refused: re-sent to the second
        assert session.closed.wait(10) and session.output_tokens == 1 + len(OUTPUT)
        assert session.reroutes == 1
    finally:
        client.close()
        stop_all(nodes)


def test_a_durable_end_taken_but_not_confirmed_is_not_re_sent(redis_server):
    from tests.retriever.outputlog.test_integration import Node as Server

    node = Server(redis_url=redis_server.url, durable_end_session=True, durable_timeout_s=0.3)
    node.wait_status(SERVING, timeout_s=10)
    client = RetrieverClient(f"127.0.0.1:{node.server.port}", deadline_s=1.0, call_timeout_s=2.0)
    try:
        session = client.session(TENANT)
        session.start([5, 6, 7, 8, 9, 5, 6, 7])
        session.draft([8], 8)
        redis_server.kill()  # the end is taken, its output cannot be confirmed in the log
        session.end(OUTPUT)
        assert session.closed.wait(10) and session.output_tokens is None
        assert session.reroutes == 0  # not re-sent: that would queue the output twice
    finally:
        client.close()
        node.stop()
