"""Reading a Prometheus /metrics page in the tests: `scrape(url)`, `value(...)` and the naming
conventions every family must follow (`check_conventions`)."""

import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SECRET = "zebra_quokka_7731"  # prompt text that must never reach a log line
_NAME = re.compile(r"specdraft_(retriever|verifier)_[a-z0-9_]+")


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{family name: {sorted label items + (sample name,): value}} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, {})
        for s in family.samples:
            out[family.name][(s.name, *sorted(s.labels.items()))] = s.value
    return out


def value(metrics: dict, sample: str, **labels: str) -> float:
    family = re.sub(r"_(total|bucket|count|sum)$", "", sample)
    return metrics.get(family, {}).get((sample, *sorted(labels.items())), 0.0)


def check_conventions(url: str, prefix: str) -> None:
    """Every family: the service prefix, snake case, help text; counters end in _total; the
    duration histograms in _seconds; no family both a unit-less and a _seconds name."""
    with urllib.request.urlopen(url, timeout=10) as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    assert families
    for f in families:
        if f.name.endswith("_created"):
            continue
        assert f.name.startswith(prefix) and _NAME.fullmatch(f.name) and f.documentation, f.name
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
        if "duration" in f.name:
            assert f.name.endswith("_seconds") and f.type == "histogram", f.name
