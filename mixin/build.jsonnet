// What `scripts/mixin` writes: file name -> content (rule files as YAML, dashboards as JSON).
// jsonnet evaluates it to one JSON document; scripts/mixin turns each entry into its file.
local mixin = import 'mixin.libsonnet';
local isFleet(g) = g.name == 'poolwatch-fleet';

{
  'alerts/poolwatch.rules.yml': { groups: [g for g in mixin.prometheusAlerts.groups if !isFleet(g)] },
  'alerts/poolwatch-fleet.rules.yml': { groups: mixin.prometheusRules.groups + [g for g in mixin.prometheusAlerts.groups if isFleet(g)] },
} + {
  ['dashboards/' + name]: mixin.grafanaDashboards[name]
  for name in std.objectFields(mixin.grafanaDashboards)
}
