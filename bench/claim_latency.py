"""Claim latency with many delayed messages ahead of the ready ones.

Fills a PGMQ queue with N delayed messages (due in 3 days, so they sit ahead of the ready ones in
msg_id order), then times single claims of one ready message with Tasker's claim statement and with
``pgmq.read``. Prints a table and writes bench/results/claim_<timestamp>.json.

    .venv/bin/python bench/claim_latency.py [--delayed 100000] [--samples 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasker.brokers.queue_names import map_queue_name  # noqa: E402
from tasker.db.migrate import migrate  # noqa: E402
from tasker.db.queries import render  # noqa: E402

DEFAULT_URL = "postgresql://root@127.0.0.1:5432/tasker_bench_claim"


def _recreate(url: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(url)
    name = str(params["dbname"])
    if "bench" not in name:
        raise SystemExit(f"refusing to drop database {name!r}: its name must contain 'bench'")
    params["dbname"] = "postgres"
    with psycopg.connect(psycopg.conninfo.make_conninfo(**params), autocommit=True) as conn:
        database = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(database))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(database))


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1], 3),
        "max_ms": round(ordered[-1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--delayed", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the results JSON (default: bench/results/claim_<UTC timestamp>.json)",
    )
    args = parser.parse_args()
    started = datetime.now(UTC)

    _recreate(args.database_url)
    migrate(args.database_url)
    names = map_queue_name("claimbench", "tasker")
    claim = render("broker", "claim", queue=names.table, dead=names.dead_table)
    results: dict[str, object] = {
        "started_at": started.isoformat(),
        "delayed": args.delayed,
        "samples": args.samples,
    }
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.create(%s)", (names.main,))
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (vt, message) SELECT now() + interval '3 days', '{{}}'::jsonb"
                " FROM generate_series(1, %s)"
            ).format(names.table),
            (args.delayed,),
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(names.table))
        insert = sql.SQL("INSERT INTO {} (vt, message) VALUES (clock_timestamp(), '{{}}')").format(
            names.table
        )
        delete = sql.SQL("DELETE FROM {} WHERE msg_id = %s").format(names.table)
        variants = {
            "tasker claim (vt index)": (claim, {"limit": 1, "lease_ms": 30_000}),
            "pgmq.read": (
                "SELECT msg_id FROM pgmq.read(%(queue)s::text, 30, 1)",
                {"queue": names.main},
            ),
        }
        for label, (query, params) in variants.items():
            timings = []
            for _ in range(args.samples):
                conn.execute(insert)
                started = time.perf_counter()
                row = conn.execute(query, params).fetchone()
                timings.append((time.perf_counter() - started) * 1000)
                assert row is not None, f"{label} found no ready message"
                conn.execute(delete, (row[0],))
            results[label] = _percentiles(timings)
        results["server_version"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]

    print(f"claim of 1 ready message behind {args.delayed:,} delayed ones ({args.samples} samples)")
    print(f"{'statement':<26} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for label in variants:
        stats = results[label]
        assert isinstance(stats, dict)
        print(f"{label:<26} {stats['p50_ms']:>8} {stats['p95_ms']:>8} {stats['max_ms']:>8}")
    out = args.output or ROOT / "bench" / "results" / f"claim_{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
