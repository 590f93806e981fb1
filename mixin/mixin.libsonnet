// The poolwatch monitoring mixin: Prometheus alerts, recording rules and Grafana dashboards
// for sqlx pools watched by poolwatch. `scripts/mixin` renders it into alerts/ and
// dashboards/ (committed for users who import the files directly); CI fails when they differ.
(import 'config.libsonnet') +
(import 'alerts.libsonnet') +
(import 'rules.libsonnet') +
(import 'fleet_gap.libsonnet') +
(import 'dashboards/dashboards.libsonnet')
