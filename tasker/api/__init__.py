"""The HTTP API of Tasker (``tasker serve``): Litestar over the engine; see docs/api.md."""
