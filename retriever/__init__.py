"""The specdraft retriever: drafting service over the C++ suffix-index core (`retriever._core`).

Rooms: `drafting/` (the pure core), `store/` (on-disk indexes), `outputlog/` (prior outputs shared
by replicas), `service/` (the gRPC server), `client/` (the Python client); shared by all: `errors`,
`status` (the one error -> status table), `config` (the settings loader), `credentials`.
"""

__version__ = "0.1.0"
