"""The sandbox's REST resources: built from the event log, OHIP's auth rules, a rate limit."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from support import sandbox_token

from consumer import cli
from consumer.sandbox import SandboxGateway, SandboxOptions, server

OPTS = SandboxOptions()
ROUTES = {
    "Reservation": ("reservationId", "/rsv/v1/hotels/{hotel}/reservations/{key}"),
    "Profile": ("profileId", "/crm/v1/profiles/{key}"),
    "Financial": ("transactionId", "/csh/v1/hotels/{hotel}/transactions/{key}"),
}
_KEEP = object()


token = sandbox_token


class FrozenClock:
    """The sandbox's ``time`` module, its clock moved only by the test: rate-limit refills and
    token expiry without sleeping, whatever the load on the machine (issue #9 item 12)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FrozenClock:
    """Freeze the sandbox's clock (before the gateway is created: its bucket starts full)."""
    frozen = FrozenClock()
    monkeypatch.setattr(server, "time", frozen)
    return frozen


def truth(gw: SandboxGateway, chain: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Expected resources, folded independently from the chain's events in log order."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for ev in gw.events(chain):
        module, key = ev["moduleName"], ev["primaryKey"]
        id_name = ROUTES[module][0]
        res = out.setdefault(
            (module, key),
            {id_name: key, "hotelId": ev["hotelId"], "chainCode": chain, "version": 0},
        )
        res["version"] += 1
        res["lastEventName"] = ev["eventName"]
        res["lastOffset"] = ev["metadata"]["offset"]
        res.setdefault("fields", {}).update({d["elementName"]: d["newValue"] for d in ev["detail"]})
    return out


def first_values(gw: SandboxGateway, chain: str, key: str) -> dict[str, str]:
    ev = next(e for e in gw.events(chain) if e["primaryKey"] == key)
    return {d["elementName"]: d["newValue"] for d in ev["detail"]}


def path(module: str, key: str, hotel: str = "") -> str:
    return ROUTES[module][1].format(hotel=hotel, key=key)


async def get(
    gw: SandboxGateway,
    url_path: str,
    tok: str | None,
    *,
    hotel: str | None = None,
    app_key: str | None = OPTS.app_key,
    auth: object = _KEEP,
) -> httpx.Response:
    headers = {}
    if tok is not None:
        headers["Authorization"] = f"Bearer {tok}"
    if auth is not _KEEP:
        headers["Authorization"] = str(auth)
    if app_key is not None:
        headers["x-app-key"] = app_key
    if hotel is not None:
        headers["x-hotelid"] = hotel
    async with httpx.AsyncClient() as fresh:
        return await fresh.get(f"{gw.url}{url_path}", headers=headers)


def pick(
    expected: dict[tuple[str, str], dict[str, Any]], module: str, gw: SandboxGateway, chain: str
) -> dict[str, Any]:
    """A resource with several events whose latest values differ from its first ones."""
    for (mod, key), res in expected.items():
        if mod == module and res["version"] >= 2 and res["fields"] != first_values(gw, chain, key):
            return res
    raise AssertionError(f"no updated {module} in the log")


async def test_resources_carry_the_latest_values_of_the_log(sandbox_factory):
    gw = await sandbox_factory(chains=("DEMO", "ALT"), backlog=400)
    tok = await token(gw)
    demo, alt = truth(gw, "DEMO"), truth(gw, "ALT")
    for module, (id_name, _) in ROUTES.items():
        res = pick(demo, module, gw, "DEMO")
        r = await get(gw, path(module, res[id_name], res["hotelId"]), tok, hotel=res["hotelId"])
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json() == res
    # A key only the second chain has is found there.
    (module, key), res = next((k, v) for k, v in alt.items() if k not in demo)
    r = await get(gw, path(module, key, res["hotelId"]), tok, hotel=res["hotelId"])
    assert r.json() == res and r.json()["chainCode"] == "ALT"
    # New events show at once: a resource that just got a follow-up reports it.
    before = demo
    new = gw.append("DEMO", 60)
    after = truth(gw, "DEMO")
    module, key = next(
        (e["moduleName"], e["primaryKey"])
        for e in new
        if (e["moduleName"], e["primaryKey"]) in before and e["moduleName"] == "Reservation"
    )
    res = after[(module, key)]
    assert res["version"] > before[(module, key)]["version"]
    r = await get(gw, path(module, key, res["hotelId"]), tok, hotel=res["hotelId"])
    assert r.json() == res


async def test_unknown_ids_wrong_hotel_and_wrong_module_are_404(sandbox_factory):
    gw = await sandbox_factory(backlog=200)
    tok = await token(gw)
    expected = truth(gw, "DEMO")
    (_, key), res = next((k, v) for k, v in expected.items() if k[0] == "Reservation")
    other = next(h for h in ("HOTEL1", "HOTEL2") if h != res["hotelId"])
    ok = await get(gw, path("Reservation", key, res["hotelId"]), tok, hotel=res["hotelId"])
    assert ok.status_code == 200
    cases = [
        ("Reservation", "1", res["hotelId"]),  # unknown id
        ("Reservation", key, other),  # the resource is at another hotel
        ("Financial", key, res["hotelId"]),  # a reservation's key on the other routes
        ("Profile", key, None),
    ]
    for module, wanted, hotel in cases:
        r = await get(gw, path(module, wanted, hotel or ""), tok, hotel=hotel)
        assert r.status_code == 404, (module, wanted, hotel)
        problem = r.json()
        assert problem["status"] == 404 and f"{module} {wanted} not found" in problem["detail"]
    for url_path in ("/rsv/v1/hotels/HOTEL1/reservations", "/crm/v1/profiles/1/extra"):
        r = await get(gw, url_path, tok, hotel="HOTEL1")
        assert r.status_code == 404 and r.text == "not found\n"
    assert gw.stats.rest_requests == 5  # unknown paths are not REST requests


async def test_token_and_app_key_are_required(sandbox_factory, clock: FrozenClock):
    """Issue #9 item 12: the token expires when the test moves the clock, not after a sleep
    that a slow request could outlast."""
    gw = await sandbox_factory(backlog=100, token_ttl_s=0.5)
    tok = await token(gw)
    (module, key), res = next(iter(truth(gw, "DEMO").items()))
    url_path, hotel = path(module, key, res["hotelId"]), res["hotelId"]
    assert (await get(gw, url_path, tok, hotel=hotel)).status_code == 200
    refused = [
        await get(gw, url_path, None, hotel=hotel),
        await get(gw, url_path, "not-a-token", hotel=hotel),
        await get(gw, url_path, None, hotel=hotel, auth=tok),  # no Bearer scheme
        await get(gw, url_path, tok, hotel=hotel, app_key="wrong"),
        await get(gw, url_path, tok, hotel=hotel, app_key=None),
        await get(gw, url_path, tok, hotel=hotel, app_key=gw.key_hash),  # the hash, not the key
    ]
    for r in refused:
        assert r.status_code == 401 and r.json()["status"] == 401
        assert r.headers["www-authenticate"] == "Bearer"
    clock.advance(0.6)
    expired = await get(gw, url_path, tok, hotel=hotel)
    assert expired.status_code == 401
    assert (await get(gw, url_path, await token(gw), hotel=hotel)).status_code == 200


async def test_hotel_routes_need_a_matching_x_hotelid(sandbox_factory):
    gw = await sandbox_factory(backlog=300)
    tok = await token(gw)
    expected = truth(gw, "DEMO")
    for module in ("Reservation", "Financial"):
        (_, key), res = next((k, v) for k, v in expected.items() if k[0] == module)
        url_path = path(module, key, res["hotelId"])
        missing = await get(gw, url_path, tok)
        wrong = await get(gw, url_path, tok, hotel="RESORT9")
        assert missing.status_code == wrong.status_code == 400
        assert wrong.json()["status"] == 400
        assert (await get(gw, url_path, tok, hotel=res["hotelId"])).status_code == 200
    (_, key), _res = next((k, v) for k, v in expected.items() if k[0] == "Profile")
    assert (await get(gw, path("Profile", key), tok)).status_code == 200  # not hotel-scoped


async def test_rate_limit_answers_429_with_retry_after_then_recovers(
    sandbox_factory, clock: FrozenClock
):
    """Issue #9 item 12: on a frozen clock the bucket refills only when the test says, so
    slow requests cannot earn a token early."""
    gw = await sandbox_factory(backlog=100, rest_rate=1.0, rest_burst=2)
    tok = await token(gw)
    (module, key), res = next(iter(truth(gw, "DEMO").items()))
    url_path, hotel = path(module, key, res["hotelId"]), res["hotelId"]
    first = [await get(gw, url_path, tok, hotel=hotel) for _ in range(2)]
    assert [r.status_code for r in first] == [200, 200]
    throttled = await get(gw, url_path, tok, hotel=hotel)
    assert throttled.status_code == 429
    assert throttled.json()["status"] == 429
    wait = int(throttled.headers["retry-after"])
    assert wait == 1  # whole seconds, at least one: 1/s refills one token within a second
    # Throttling comes before auth: an unauthenticated request is throttled too.
    assert (await get(gw, url_path, None)).status_code == 429
    clock.advance(wait)
    again = await get(gw, url_path, tok, hotel=hotel)
    assert again.status_code == 200 and again.json() == res
    assert gw.stats.rest_requests == 5
    assert gw.stats.rest_throttled == 2
    assert gw.stats.rest_paths == {url_path: 3}


async def test_idle_time_saves_at_most_a_burst(sandbox_factory, clock: FrozenClock):
    """Issue #9 item 12: the three requests come at one instant of a frozen clock; the test
    no longer needs them to take less than 1/4 s of real time."""
    gw = await sandbox_factory(backlog=50, rest_rate=4.0, rest_burst=2)
    tok = await token(gw)
    (_, key), _res = next((k, v) for k, v in truth(gw, "DEMO").items() if k[0] == "Profile")
    clock.advance(0.75)  # 3 tokens' worth of refill on a full bucket: still only 2
    got = [await get(gw, path("Profile", key), tok) for _ in range(3)]  # no refill between
    statuses = [r.status_code for r in got]
    assert statuses == [200, 200, 429]


async def test_no_rate_limit_by_default(sandbox_factory):
    gw = await sandbox_factory(backlog=50)
    tok = await token(gw)
    (_, key), _res = next((k, v) for k, v in truth(gw, "DEMO").items() if k[0] == "Profile")
    statuses = [(await get(gw, path("Profile", key), tok)).status_code for _ in range(12)]
    assert statuses == [200] * 12  # more than the default burst of 5
    assert gw.stats.rest_throttled == 0


async def test_injected_failures_come_first_and_in_order(sandbox_factory):
    gw = await sandbox_factory(backlog=50)
    tok = await token(gw)
    (_, key), _res = next((k, v) for k, v in truth(gw, "DEMO").items() if k[0] == "Profile")
    gw.fail_rest([503, 429], retry_after=2)
    gw.fail_rest([500])
    got = [await get(gw, path("Profile", key), None) for _ in range(3)]  # even without auth
    assert [r.status_code for r in got] == [503, 429, 500]
    assert [r.headers.get("retry-after") for r in got] == ["2", "2", None]
    assert [r.json()["status"] for r in got] == [503, 429, 500]
    ok = await get(gw, path("Profile", key), tok)
    assert ok.status_code == 200
    assert (await get(gw, path("Profile", key), None)).status_code == 401  # failures used up
    assert gw.stats.rest_requests == 5
    assert gw.stats.rest_throttled == 0  # injected 429s are not the rate limit's
    assert gw.stats.rest_paths == {path("Profile", key): 1}


async def test_stats_count_rest_requests_and_successes_per_path(sandbox_factory):
    gw = await sandbox_factory(backlog=300)
    tok = await token(gw)
    expected = truth(gw, "DEMO")
    (_, rsv), r_res = next((k, v) for k, v in expected.items() if k[0] == "Reservation")
    (_, fin), f_res = next((k, v) for k, v in expected.items() if k[0] == "Financial")
    rsv_path, fin_path = (
        path("Reservation", rsv, r_res["hotelId"]),
        path("Financial", fin, f_res["hotelId"]),
    )
    statuses = [
        (await get(gw, rsv_path, tok, hotel=r_res["hotelId"])).status_code for _ in range(3)
    ]
    statuses.append((await get(gw, fin_path, tok, hotel=f_res["hotelId"])).status_code)
    statuses.append((await get(gw, fin_path, "bad", hotel=f_res["hotelId"])).status_code)
    statuses.append((await get(gw, path("Profile", "1"), tok)).status_code)
    assert statuses == [200, 200, 200, 200, 401, 404]
    async with httpx.AsyncClient() as http:  # not REST requests
        assert (await http.get(f"{gw.url}/healthz")).status_code == 200
        assert (await http.get(f"{gw.url}/crm/v1/profiles")).status_code == 404
    assert gw.stats.rest_requests == 6
    assert gw.stats.rest_throttled == 0
    assert gw.stats.rest_paths == {rsv_path: 3, fin_path: 1}


def test_cli_passes_the_rest_limits(monkeypatch: pytest.MonkeyPatch):
    seen: list[SandboxOptions] = []

    async def fake_run(options: SandboxOptions) -> None:
        seen.append(options)

    monkeypatch.setattr("consumer.sandbox.run_sandbox", fake_run)
    assert cli.main(["sandbox", "--port", "0", "--rest-rate", "2.5", "--rest-burst", "3"]) == 0
    assert cli.main(["sandbox", "--port", "0"]) == 0
    assert [(o.rest_rate, o.rest_burst) for o in seen] == [(2.5, 3), (0.0, 5)]
