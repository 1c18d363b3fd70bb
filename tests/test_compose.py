"""docker-compose.yml against the Compose Specification schema (tests/data/compose_spec.json, from the
docker-compose 1.29.2 wheel, Apache-2.0), plus the wiring the README promises."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _validator() -> jsonschema.Draft201909Validator:
    return jsonschema.Draft201909Validator(json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text()))


def test_compose_file_follows_the_compose_specification():
    _validator().validate(_compose())  # raises ValidationError naming the offending path


def test_services_are_wired_as_documented():
    services = _compose()["services"]
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default | {"verifier"} == {"redis", "index-stdlib", "retriever", "verifier"}
    retriever, verifier = services["retriever"], services["verifier"]
    assert retriever["environment"]["SPECDRAFT_REDIS_URL"].startswith("redis://redis:")
    assert "CMD" in retriever["healthcheck"]["test"] and "HealthStub" in " ".join(retriever["healthcheck"]["test"])
    assert verifier["environment"]["SPECDRAFT_VERIFIER_RETRIEVER"] == "retriever:50051"
    assert verifier["profiles"] == ["gpu"] and verifier["build"]["dockerfile"] == "Dockerfile.verifier"
    assert (ROOT / verifier["build"]["dockerfile"]).exists() and (ROOT / "Dockerfile").exists()
    devices = verifier["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_a_schema_violation_is_caught():
    broken = _compose()
    broken["services"]["retriever"]["ports"] = {"not": "a list"}
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate(broken)


def test_the_scale_profile_is_a_3_plus_3_redis_cluster_and_three_retrievers():
    services = _compose()["services"]
    scale = {name for name, service in services.items() if service.get("profiles") == ["scale"]}
    assert scale == {*(f"redis-node-{i}" for i in range(1, 7)), "redis-cluster-init",
                     *(f"retriever-{i}" for i in range(1, 4))}
    assert "--cluster-replicas 1" in " ".join(services["redis-cluster-init"]["command"])
    for i in range(1, 4):
        env = services[f"retriever-{i}"]["environment"]
        assert env["SPECDRAFT_REDIS_URL"].startswith("redis+cluster://redis-node-1:6379,")
        assert env["SPECDRAFT_ADVERTISE_ADDRESS"] == f"retriever-{i}:50051" and env["SPECDRAFT_TENANT_OWNERS"] == "2"
