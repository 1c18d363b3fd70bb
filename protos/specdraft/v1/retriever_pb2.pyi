from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_CONTEXT: _ClassVar[Source]
    SOURCE_TENANT: _ClassVar[Source]
    SOURCE_CORPUS: _ClassVar[Source]
    SOURCE_REFERENCE: _ClassVar[Source]
    SOURCE_PREDICTION: _ClassVar[Source]
SOURCE_UNSPECIFIED: Source
SOURCE_CONTEXT: Source
SOURCE_TENANT: Source
SOURCE_CORPUS: Source
SOURCE_REFERENCE: Source
SOURCE_PREDICTION: Source

class DraftRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "prompt", "new_tokens", "max_nodes", "sent_unix_us", "prediction", "verified_nodes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_NODES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    prompt: _containers.RepeatedScalarFieldContainer[int]
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    max_nodes: int
    sent_unix_us: int
    prediction: _containers.RepeatedScalarFieldContainer[int]
    verified_nodes: int
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., prompt: _Optional[_Iterable[int]] = ..., new_tokens: _Optional[_Iterable[int]] = ..., max_nodes: _Optional[int] = ..., sent_unix_us: _Optional[int] = ..., prediction: _Optional[_Iterable[int]] = ..., verified_nodes: _Optional[int] = ...) -> None: ...

class DraftTree(_message.Message):
    __slots__ = ("token_ids", "parents", "scores", "sources")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    sources: _containers.RepeatedScalarFieldContainer[Source]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., sources: _Optional[_Iterable[_Union[Source, str]]] = ...) -> None: ...

class DraftError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("tree", "context_tokens", "error")
    TREE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    tree: DraftTree
    context_tokens: int
    error: DraftError
    def __init__(self, tree: _Optional[_Union[DraftTree, _Mapping]] = ..., context_tokens: _Optional[int] = ..., error: _Optional[_Union[DraftError, _Mapping]] = ...) -> None: ...

class DraftBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[DraftRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[DraftRequest, _Mapping]]] = ...) -> None: ...

class DraftBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[DraftResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[DraftResponse, _Mapping]]] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "new_tokens", "verified_nodes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_NODES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    verified_nodes: int
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., new_tokens: _Optional[_Iterable[int]] = ..., verified_nodes: _Optional[int] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("output_tokens",)
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    output_tokens: int
    def __init__(self, output_tokens: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "kind", "tokens", "documents", "tokenizer_name", "tokenizer_sha256", "vocab_size", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    tokens: int
    documents: int
    tokenizer_name: str
    tokenizer_sha256: str
    vocab_size: int
    path: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., tokens: _Optional[int] = ..., documents: _Optional[int] = ..., tokenizer_name: _Optional[str] = ..., tokenizer_sha256: _Optional[str] = ..., vocab_size: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("default_max_nodes", "max_nodes_cap", "vocab_size", "max_context_tokens", "max_new_tokens", "max_batch", "max_sessions", "tenant_token_budget")
    DEFAULT_MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_CAP_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    default_max_nodes: int
    max_nodes_cap: int
    vocab_size: int
    max_context_tokens: int
    max_new_tokens: int
    max_batch: int
    max_sessions: int
    tenant_token_budget: int
    def __init__(self, default_max_nodes: _Optional[int] = ..., max_nodes_cap: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_sessions: _Optional[int] = ..., tenant_token_budget: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("version", "indexes", "limits", "ready", "members", "replica_id", "owners_per_tenant", "owners")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    OWNERS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    limits: Limits
    ready: bool
    members: _containers.RepeatedCompositeFieldContainer[ReplicaMember]
    replica_id: str
    owners_per_tenant: int
    owners: _containers.RepeatedCompositeFieldContainer[ReplicaMember]
    def __init__(self, version: _Optional[str] = ..., indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., ready: _Optional[bool] = ..., members: _Optional[_Iterable[_Union[ReplicaMember, _Mapping]]] = ..., replica_id: _Optional[str] = ..., owners_per_tenant: _Optional[int] = ..., owners: _Optional[_Iterable[_Union[ReplicaMember, _Mapping]]] = ...) -> None: ...

class ReplicaMember(_message.Message):
    __slots__ = ("replica_id", "address", "capacity")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    capacity: int
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[int] = ...) -> None: ...
