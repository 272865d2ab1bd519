"""What both `backends/` and `orchestrator/` need, below both: the user-facing errors and the crash points.

Imports nothing from the project, so either package can use it without tying the layers together.
"""
