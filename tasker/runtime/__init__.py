"""Wiring for worker and client processes: a broker from settings, workflow steps as actors, the
orchestration-stage actors. Importing these modules has no side effects (unlike ``tasker.actors``,
the Dramatiq CLI entry point that uses them)."""
