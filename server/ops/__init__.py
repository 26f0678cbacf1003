"""The operators' kit: a Grafana dashboard (``grafana-dashboard.json``) and Prometheus alert rules
with runbooks (``prometheus-alerts.yml``) for `serve` and the trainer, and the checks that keep
them true to what is exported (``server.ops.kit``). Data files beside this one; nothing here runs
in the server."""
