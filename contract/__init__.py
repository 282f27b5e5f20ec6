"""The scheduler <-> executor contract as plain values, and what every side shares about it.

``plan`` (the step plan and its result), ``sampling``, ``tiers``, ``executor_info``,
``cost_models`` (what a plan costs to run), ``lifecycle`` (the core's request events, which
telemetry turns into spans) and ``model_files``. Stdlib only; imports nothing else of this project.
"""
