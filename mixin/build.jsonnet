// What `scripts/mixin` writes: file name -> content (rule files as YAML, dashboards as JSON).
// jsonnet evaluates it to one JSON document; scripts/mixin turns each entry into its file.
local mixin = import 'mixin.libsonnet';
local isFleet(g) = g.name == 'poolwatch-fleet';
// The fleet gap joins postgres_exporter's series: its own file (alerts/fleet-gap.rules.yml).
local isGap(g) = std.startsWith(g.name, 'poolwatch-fleet-gap');

{
  'alerts/poolwatch.rules.yml': { groups: [g for g in mixin.prometheusAlerts.groups if !isFleet(g) && !isGap(g)] },
  'alerts/poolwatch-fleet.rules.yml': { groups: [g for g in mixin.prometheusRules.groups if !isGap(g)] + [g for g in mixin.prometheusAlerts.groups if isFleet(g)] },
  'alerts/fleet-gap.rules.yml': { groups: [g for g in mixin.prometheusRules.groups if isGap(g)] + [g for g in mixin.prometheusAlerts.groups if isGap(g)] },
} + {
  ['dashboards/' + name]: mixin.grafanaDashboards[name]
  for name in std.objectFields(mixin.grafanaDashboards)
}
