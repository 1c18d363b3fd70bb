"""The client's wire conversions: a request stamped with its send time, a checked tree out of a
response (the proto <-> `DraftTree` edge of the client; the server's answers are encoded by the
C++ core, `retriever.drafting.drafter.Drafter.draft_response`)."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from protos.specdraft.v1 import retriever_pb2 as pb
from retriever.drafting.types import DraftTree


def tree_from_proto(t: pb.DraftTree) -> DraftTree:
    """The tree of a response, checked (`DraftTree.checked`: raises InvalidArgument when broken)."""
    return DraftTree(np.asarray(t.token_ids, np.int32), np.asarray(t.parents, np.int32),
                     np.asarray(t.scores, np.float32), np.asarray(t.sources, np.uint8)).checked()


def draft_request(tenant: str, session_id: str, prompt: Sequence[int] | None, new_tokens: Sequence[int],
                  max_nodes: int, prediction: Sequence[int] = (), verified_nodes: int | None = None
                  ) -> pb.DraftRequest:
    """The request, stamped with its send time (`sent_unix_us`: an overloaded server refuses it at once
    when it waited too long, see `retriever.service.admission.QueueWait`); `prediction` goes with a prompt only;
    `verified_nodes` (None: unset, i.e. all) reports on the session's last draft."""
    request = pb.DraftRequest(tenant=tenant, session_id=session_id,
                              prompt=list(prompt) if prompt is not None else [], new_tokens=list(new_tokens),
                              max_nodes=max(0, int(max_nodes)), sent_unix_us=time.time_ns() // 1000,
                              prediction=list(prediction) if prompt is not None else [])
    if verified_nodes is not None:
        request.verified_nodes = max(0, int(verified_nodes))
    return request
