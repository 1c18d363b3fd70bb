"""The demo's requests: what a code assistant is asked all day, on two ~60-line Python files.

- edits whose answer is mostly in the prompt (chat, the file in the message): rename a local
  variable, add a parameter, apply a small change;
- a completion of a raw file prefix (text);
- a request, then the same tenant's next request on the edited file: the first answer is a prior
  output of the tenant, a draft source the prompt does not hold.

`DEMO_PROMPTS` runs in order with one tenant (later rows may draft from earlier rows' outputs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoPrompt:
    name: str  # short, unique: the row's label (and what `--rows` selects)
    workload: str  # edit | completion | tenant
    kind: str  # "chat" (a user message under the model's chat template) or "text" (a raw prefix)
    prompt: str
    max_new_tokens: int  # the row's default budget (the answer's length, so the whole demo stays short)


ORDERS_PY = '''\
"""Order bookkeeping for the shop's nightly report."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Order:
    order_id: str
    customer: str
    amount_cents: int
    created: dt.date
    refunded: bool = False


def revenue_by_customer(orders: list[Order]) -> dict[str, int]:
    """Cents per customer, refunds left out, largest first."""
    acc: dict[str, int] = {}
    for o in orders:
        if o.refunded:
            continue
        acc[o.customer] = acc.get(o.customer, 0) + o.amount_cents
    return dict(sorted(acc.items(), key=lambda kv: kv[1], reverse=True))


def read_orders(path: Path) -> list[Order]:
    """Reads the orders of a CSV export (header: id,customer,amount,created,refunded)."""
    orders = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            orders.append(Order(
                order_id=row["id"],
                customer=row["customer"].strip(),
                amount_cents=round(float(row["amount"]) * 100),
                created=dt.date.fromisoformat(row["created"]),
                refunded=row["refunded"] == "yes",
            ))
    return orders


def daily_totals(orders: list[Order], start: dt.date, end: dt.date) -> list[tuple[dt.date, int]]:
    """(day, cents) for every day from start to end inclusive, zero on days without orders."""
    acc = {}
    for o in orders:
        if start <= o.created <= end and not o.refunded:
            acc[o.created] = acc.get(o.created, 0) + o.amount_cents
    days = (end - start).days + 1
    return [(start + dt.timedelta(d), acc.get(start + dt.timedelta(d), 0)) for d in range(days)]


def write_report(orders: list[Order], out: Path) -> None:
    """Writes the revenue per customer as CSV, amounts in dollars."""
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["customer", "revenue"])
        for customer, cents in revenue_by_customer(orders).items():
            writer.writerow([customer, f"{cents / 100:.2f}"])
'''

RETRY_PY = '''\
"""A small HTTP client with retries for the internal inventory API."""

import json
import logging
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

BASE_URL = "https://inventory.internal/api/v2"


class ApiError(Exception):
    """The API answered with an error status, or not at all."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status


def _request(method, path, body=None, timeout=10.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE_URL + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raise ApiError(e.code, e.read().decode(errors="replace")) from e
    except urllib.error.URLError as e:
        raise ApiError(0, str(e.reason)) from e


def with_retries(method, path, body=None, attempts=3, backoff=0.5):
    """Calls the API, retrying server errors and timeouts with exponential backoff."""
    for attempt in range(attempts):
        try:
            return _request(method, path, body)
        except ApiError as e:
            if e.status and e.status < 500:
                raise
            if attempt == attempts - 1:
                raise
            wait = backoff * 2 ** attempt
            print(f"retrying {method} {path} in {wait:.1f}s after {e}")
            time.sleep(wait)


def get_item(sku):
    return with_retries("GET", f"/items/{sku}")


def set_stock(sku, count):
    if count < 0:
        print(f"refusing negative stock {count} for {sku}")
        return None
    return with_retries("PUT", f"/items/{sku}/stock", {"count": count})
'''

_REPLY = "Reply with the whole updated file in one python code block, nothing else."
_TESTS = "Write pytest tests for `revenue_by_customer` in this file (no fixtures files, build the orders in the tests)."


def _chat(request: str, source: str, filename: str) -> str:
    return f"{request}\n\n`{filename}`:\n```python\n{source}```"


def _renamed(source: str) -> str:
    """ORDERS_PY after the rename edit (what a user has once they accepted it)."""
    return source.replace("acc: dict[str, int] = {}", "totals: dict[str, int] = {}").replace(
        "acc[o.customer] = acc.get(o.customer, 0)", "totals[o.customer] = totals.get(o.customer, 0)").replace(
        "sorted(acc.items()", "sorted(totals.items()")


DEMO_PROMPTS: tuple[DemoPrompt, ...] = (
    DemoPrompt("rename", "edit", "chat", _chat(
        f"In `revenue_by_customer`, rename the local variable `acc` to `totals`. {_REPLY}", ORDERS_PY,
        "orders.py"), 160),
    DemoPrompt("add-param", "edit", "chat", _chat(
        "Add a keyword parameter `timeout: float = 10.0` to `with_retries` and pass it on to `_request`. "
        "Reply with the updated `with_retries` only, in a python code block.", RETRY_PY, "inventory_client.py"), 128),
    DemoPrompt("apply-change", "edit", "chat", _chat(
        "Replace the two print calls with `log.warning` calls (same messages). Reply with the functions you "
        "changed, in one python code block.", RETRY_PY, "inventory_client.py"), 128),
    DemoPrompt("complete", "completion", "text", ORDERS_PY.split("def daily_totals")[0] + "def daily_totals(", 64),
    DemoPrompt("tests", "tenant", "chat", _chat(_TESTS, ORDERS_PY, "orders.py"), 96),
    DemoPrompt("tests-again", "tenant", "chat", _chat(_TESTS, _renamed(ORDERS_PY), "orders.py"), 96),
)


def select(names: str | None) -> tuple[DemoPrompt, ...]:
    """The rows named in a comma-separated list (None or "": all), in DEMO_PROMPTS order; ValueError
    naming the unknown ones."""
    if not names:
        return DEMO_PROMPTS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {p.name for p in DEMO_PROMPTS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"rows must be among {', '.join(sorted(known))}, got {', '.join(unknown)}")
    return tuple(p for p in DEMO_PROMPTS if p.name in wanted)
