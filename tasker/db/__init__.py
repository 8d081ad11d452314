"""Database plumbing: connection pools, the embedded PostgreSQL, migrations and the PGMQ install."""
