"""bench/report.py turns wrk results into the tables of docs/benchmarks.md (no timing here)."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.profile import summarize


def part(op: str, requests: int, p99_us: int, conflicts: int = 0) -> dict[str, Any]:
    return {
        "op": op,
        "connections": 64,
        "requests": requests,
        "duration_us": 10_000_000,
        "throughput": requests / 10,
        "ok": requests - conflicts,
        "conflicts": conflicts,
        "other": 0,
        "latency_us": {"p50": p99_us // 4, "p90": p99_us // 2, "p95": p99_us // 2, "p99": p99_us},
    }


def scenario(name: str, target: str, parts: list[dict[str, Any]], cpu_ms: float) -> dict[str, Any]:
    requests = sum(p["requests"] for p in parts)
    return {
        "name": name,
        "target": target,
        "replicas": 1,
        "connections": 64,
        "parts": parts,
        "requests": requests,
        "throughput": requests / 10,
        "cpu_ms_per_request": cpu_ms,
        "redis_cpu_ms_per_request": 0.05,
        "memory": [{"rss_mb": 80.0, "hwm_mb": 90.0}],
        "note": "",
    }


RESULTS: dict[str, Any] = {
    "started_at": "2026-11-27T06:00:00+00:00",
    "label": "before",
    "plan": {
        "sessions": 1000,
        "warm_sessions": 200,
        "cold_sessions": 200,
        "connections": 64,
        "warmup": 3,
        "seconds": 12,
        "server_cpus": "0",
        "support_cpus": "1",
    },
    "machine": {
        "cpu": "x",
        "cpus": 2,
        "mhz": "?",
        "memory_gib": 24,
        "kernel": "k",
        "python": "3.11",
        "redis": "7.0",
        "wrk": "wrk 4",
        "packages": {"msgspec": "0.19"},
        "uvicorn_fast_path": False,
        "loadavg_start": ["1", "1", "1"],
        "loadavg_end": ["2", "2", "2"],
    },
    "mongodb": "mongomock",
    "cold_skip": None,
    "scenarios": [
        scenario("hot GET", "sessionmgr", [part("GET hot", 30_000, 8_000)], 0.40),
        scenario("hot GET", "FastAPI + pydantic", [part("GET hot", 15_000, 20_000)], 0.80),
        scenario("hot GET", "floor (Litestar + HGETALL)", [part("GET hot", 40_000, 5_000)], 0.25),
        scenario("update", "sessionmgr", [part("PATCH", 10_000, 30_000, conflicts=500)], 0.9),
        scenario(
            "mixed",
            "sessionmgr",
            [part("GET hot", 8_000, 9_000), part("PATCH", 1_500, 16_000, conflicts=15)],
            0.5,
        ),
    ],
}


def test_ratios_compare_sessionmgr_with_each_baseline() -> None:
    text = report.render(RESULTS, None, [])

    assert (
        "| hot GET: sessionmgr / FastAPI + pydantic (target ≥ 1.5) | **2.00x** | **2.00x**" in text
    )
    assert "| hot GET: sessionmgr / floor (Litestar + HGETALL) (target ≥ 0.9) | **0.75x**" in text


def test_targets_say_which_bound_held() -> None:
    text = report.render(RESULTS, None, [])

    assert "| p99 GET hot, mixed, 64 connections, 1 replica | 10 ms | 9.0 ms | yes |" in text
    assert "| p99 update, mixed, 64 connections, 1 replica | 15 ms | 16.0 ms | **no** |" in text
    assert "| hot GET throughput vs FastAPI + pydantic | ≥ 1.5x | 2.00x | yes |" in text
    capacity = "| hot GET capacity (1 / CPU per request) vs floor (Litestar + HGETALL)"
    assert f"{capacity} | ≥ 0.9x | 0.62x | **no** |" in text


def peer_result(op: str, concurrency: int, throughput: float) -> dict[str, Any]:
    return {
        "op": op,
        "concurrency": concurrency,
        "requests": int(throughput * 10),
        "throughput": throughput,
        "cpu_ms_per_request": 1.5,
        "postgres_cpu_ms_per_request": 0.5,
        "latency_us": {"p50": 2_000, "p99": 9_000},
    }


def test_peer_ratio_is_against_the_peers_better_concurrency() -> None:
    results = {
        **RESULTS,
        "peer": {
            "url": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
            "packages": {"google-adk": "2.13.0"},
            "results": [peer_result("get", 1, 250.0), peer_result("get", 64, 400.0)],
        },
    }

    text = report.render(results, None, [])

    assert "| get | 64 | 400 | 2.0 | 9.0 | 1.50 | 0.50 |" in text
    # sessionmgr's hot GET: 3000 req/s, against the peer's 400 (not its 250).
    # CPU: sessionmgr's 0.40 + 0.05 (Redis) against the peer's 1.5 + 0.5 (PostgreSQL).
    assert "| get (hot GET) | 3000 | 400 | **7.5x** | **no** | 0.45 / 2.00 | 4.4x |" in text


def test_the_floor_table_says_what_10x_asks_of_one_core() -> None:
    floor = "floor (Litestar + insert_one + HSET)"
    results = {
        **RESULTS,
        "scenarios": [
            *RESULTS["scenarios"],
            scenario("create", "sessionmgr", [part("POST create", 11_000, 90_000)], 0.70),
            scenario("create", floor, [part("POST create", 26_000, 40_000)], 0.38),
        ],
        "peer": {
            "url": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
            "packages": {},
            "results": [
                peer_result("create", 1, 400.0),
                peer_result("create", 64, 650.0),
                peer_result("get", 64, 400.0),
            ],
        },
    }

    text = report.render(results, None, [])

    # The peer's best create: 650/s. 10x that on one core leaves 1 s / 6 500 = 0.154 ms a
    # create; the floor's 2 600/s is 4.0x the peer, sessionmgr's 1 100/s 1.7x.
    assert "| create | 650 | 0.154 | 2600 | 0.380 | 4.0x | 0.700 | 1.7x |" in text
    # The GET's floor is in RESULTS too (4 000/s against 400/s: 10.0x; 1 s / 4 000 = 0.25 ms).
    assert "| get | 400 | 0.250 | 4000 | 0.250 | 10.0x | 0.400 | 7.5x |" in text
    # No append was measured: no row, rather than a row of dashes.
    assert not any(row.startswith("| append |") for row in report.floor_rows(results))


def test_no_floor_table_without_a_measured_floor_and_peer() -> None:
    text = report.render({**RESULTS, "peer": {"skip": "no PostgreSQL"}}, None, [])

    assert "What 10x the peer asks" not in text


def test_a_skipped_peer_says_why() -> None:
    results = {**RESULTS, "peer": {"skip": "no PostgreSQL reachable at x (OSError: refused)"}}

    text = report.render(results, None, [])

    assert "The peer was not measured in this run: no PostgreSQL reachable at x" in text


def test_outbox_backlog_and_drain_time_per_write_scenario() -> None:
    assert report.outbox_cell(None) == "-"
    assert report.outbox_cell({"backlog": 1200, "drain_s": 3.4, "left": 0}) == "1200 (3.4 s)"
    stuck = {"backlog": 9000, "drain_s": 120.0, "left": 40}
    assert report.outbox_cell(stuck) == "9000 (120.0 s), 40 left"


def test_conflict_rate_is_conflicts_over_patches() -> None:
    rows = report.scenario_rows(RESULTS)

    update = next(r for r in rows if r.startswith("| update | sessionmgr"))
    assert "| 5.0 % |" in update
    mixed = "\n".join(report.mixed_rows(RESULTS))
    assert "| PATCH | 64 | 150 | 15.8 % | 4.0 | 8.0 | 16.0 | 1.0 % |" in mixed


def test_before_and_after_table_pairs_the_same_scenarios() -> None:
    after = {
        **RESULTS,
        "scenarios": [scenario("hot GET", "sessionmgr", [part("GET hot", 45_000, 4_000)], 0.30)],
    }

    text = report.render(after, RESULTS, [])

    assert (
        "| hot GET | sessionmgr | 3000 → 4500 (1.50x) | GET hot: 8.0 → 4.0 | 0.40 → 0.30 |" in text
    )


def test_profile_summary_ranks_functions_and_packages() -> None:
    collapsed = (
        "run_forever (asyncio/base_events.py:1);handle (site-packages/litestar/app.py:5);"
        "decode (site-packages/jwt/api_jwt.py:9) 30\n"
        "run_forever (asyncio/base_events.py:1);handle (site-packages/litestar/app.py:5) 10\n"
        "<module> (sessionmgr/cli.py:1);_find_and_load (<frozen importlib._bootstrap>:1) 50\n"
    )

    text = summarize(collapsed)

    assert "samples: 40" in text
    assert " 75.0 %  PyJWT + cryptography" in text
    assert "handle (litestar/app.py)" not in text.split("self share")[0]  # in every sample
