// A tiny dashboard builder: variables every poolwatch dashboard has (datasource, job,
// instance, pool; dashboard-linter's rules), rows of panels laid out two per line.
{
  local ds = { type: 'prometheus', uid: '${datasource}' },

  // The matchers every query carries.
  selector:: 'job=~"$job", instance=~"$instance", db_client_connection_pool_name=~"$pool"',

  target(expr, legend):: { expr: expr, legendFormat: legend },

  // A panel; `targets` are [expr, legend] pairs whose exprs may use %(sel)s.
  panel(title, description, unit, targets, type='timeseries', extra={}):: {
    type: type,
    title: title,
    description: description,
    datasource: ds,
    fieldConfig: { defaults: { unit: unit }, overrides: [] },
    options: if type == 'stat' then { reduceOptions: { calcs: ['lastNotNull'] } } else { legend: { displayMode: 'list', placement: 'bottom' } },
    targets: [
      { datasource: ds, refId: std.char(65 + i), expr: targets[i][0] % { sel: $.selector }, legendFormat: targets[i][1] }
      for i in std.range(0, std.length(targets) - 1)
    ],
  } + extra,

  local variable(name, query) = {
    name: name,
    label: std.asciiUpper(name[0]) + name[1:],
    type: 'query',
    datasource: ds,
    query: { query: query, refId: name },
    definition: query,
    refresh: 2,
    multi: true,
    includeAll: true,
    allValue: '.+',
    current: {},
    sort: 1,
    hide: 0,
    regex: '',
  },

  // `rows`: [{ title, panels }]. Panels are placed two per line, 12 wide and 8 high.
  new(c, uid, title, description, rows):: {
    local laid = std.foldl(
      function(acc, row)
        local header = { type: 'row', title: row.title, collapsed: false, panels: [], gridPos: { x: 0, y: acc.y, w: 24, h: 1 } };
        local n = std.length(row.panels);
        local placed = [
          row.panels[i] { gridPos: { x: (i % 2) * 12, y: acc.y + 1 + std.floor(i / 2) * 8, w: 12, h: 8 } }
          for i in std.range(0, n - 1)
        ];
        { y: acc.y + 1 + std.ceil(n / 2) * 8, panels: acc.panels + [header] + placed },
      rows,
      { y: 0, panels: [] }
    ).panels,
    uid: uid,
    title: title,
    description: description,
    tags: c.dashboardTags,
    timezone: c.dashboardTimezone,
    refresh: c.dashboardRefresh,
    editable: false,
    graphTooltip: 1,
    // What Grafana 10.0 writes: Grafana 10.0 and later import the dashboards and migrate them up
    // (39-41 change nothing here: no timeSeriesTable transformation, refresh is a string, no
    // timepicker.time_options). tests/artefacts.rs holds the JSON to what 10.0 knows.
    schemaVersion: 38,
    version: 1,
    time: { from: 'now-6h', to: 'now' },
    links: [],
    annotations: { list: [] },
    templating: {
      list: [
        { name: 'datasource', label: 'Data source', type: 'datasource', query: 'prometheus', current: {}, hide: 0, refresh: 1, regex: '' },
        variable('job', 'label_values(db_client_connection_count{%s}, job)' % c.jobSelector),
        variable('instance', 'label_values(db_client_connection_count{job=~"$job"}, instance)'),
        variable('pool', 'label_values(db_client_connection_count{job=~"$job", instance=~"$instance"}, db_client_connection_pool_name)'),
      ],
    },
    panels: [laid[i] { id: i + 1 } for i in std.range(0, std.length(laid) - 1)],
  },
}
