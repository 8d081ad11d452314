"""Orchestration over the database: templates, task creation, step execution, results, finalization.

Every function takes an open connection and runs inside the caller's transaction; one
transaction per orchestration move (state change + the messages it causes) is the whole idea.
"""
