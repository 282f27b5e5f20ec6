"""The scheduler <-> executor contract as plain values, and what every side shares about it.

``plan`` (the step plan and its result), ``sampling``, ``tiers``, ``executor_info`` and
``cost_models`` (what a plan costs to run). Stdlib only; imports nothing else of this project.
"""
