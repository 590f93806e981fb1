// Builds one alerting rule the way every poolwatch alert looks: severity, runbook_url from
// the configured pattern, `for` from the configured durations.
{
  new(c, name, severity, expr, summary, description)::
    local forDuration = std.get(c.forDurations, name, '0m');
    {
      alert: name,
      expr: expr,
      labels: { severity: severity },
      annotations: {
        summary: summary,
        description: description,
        runbook_url: c.runbookURLPattern % name,
      },
    } + (if forDuration == '0m' then {} else { 'for': forDuration }),
}
