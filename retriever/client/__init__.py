"""The Python client of the retriever: `RetrieverClient` (unary calls, `session(tenant)` for one
generation's `DraftStreamSession`), `ChannelSecurity` (TLS, mTLS, bearer token), and the typed
values its calls return. Import from here: `from retriever.client import RetrieverClient`.
"""

from retriever.client.channel import ChannelSecurity, Refusals, open_channel
from retriever.client.client import (
                                     Description,
                                     DraftCall,
                                     DraftReply,
                                     IndexDescription,
                                     RetrieverClient,
                                     RetrieverLimits,
)
from retriever.client.conversions import draft_request, tree_from_proto
from retriever.client.stream import DraftStreamSession

__all__ = ["ChannelSecurity", "Description", "DraftCall", "DraftReply", "DraftStreamSession", "IndexDescription",
           "Refusals", "RetrieverClient", "RetrieverLimits", "draft_request", "open_channel", "tree_from_proto"]
