// The dashboards, keyed by file name.
{
  grafanaDashboards+:: {
    'poolwatch.json': (import 'poolwatch.libsonnet').poolwatchDashboard($._config),
    'poolwatch-fleet.json': (import 'fleet.libsonnet').fleetDashboard($._config),
  },
}
