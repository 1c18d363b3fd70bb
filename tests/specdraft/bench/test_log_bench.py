"""`specdraft bench log` end to end on a tiny log (the 10M-token run is `make bench-log`)."""

import argparse

from specdraft.bench import log_bench
from tests.redis_fixtures import require_redis_server


def test_log_bench_prints_ingest_and_outage_tables(capsys, tmp_path):
    require_redis_server()
    parser = argparse.ArgumentParser()
    log_bench.add_arguments(parser)
    args = parser.parse_args(["--tokens", "20000", "--tenants", "2", "--phase-s", "0.3",
                              "--json", str(tmp_path / "log.json")])
    assert log_bench.run(args) == 0
    out = capsys.readouterr().out
    assert "| redis | 2 |" in out and "| file | 2 |" in out
    assert "| redis SIGKILL |" in out and "all arrived" in out
    assert (tmp_path / "log.json").exists()
