"""The discrete-event simulator, workloads, cost models, capacity search, compare and report.

Drives ``scheduler_svc.core`` unchanged; never imports grpc or torch."""
