// Runs the rules faster than real time (the demo): every duration of `_config` divided by
// `factor`. Windows stay at least `minWindow` (a few scrapes) so range functions still see
// samples; a non-zero `for` stays at least `minFor` (a few evaluations), so a blip at start-up
// (no census yet) does not fire an alert that waits minutes at real pace. Windows written
// into an expression, not `_config`, keep their real length.
//   (import 'lib/timescale.libsonnet').apply(import 'mixin.libsonnet', 600, '3s')
local units = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 };
local digits(s) = std.length(s) > 0 && std.length([c for c in std.stringChars(s) if std.length(std.findSubstr(c, '0123456789')) == 0]) == 0;
// Seconds of a Prometheus duration of one unit ('90m', '2h', '500ms'), or null.
local seconds(d) =
  if !std.isString(d) then null
  else
    local unit = if std.endsWith(d, 'ms') then 'ms' else d[std.length(d) - 1];
    local number = std.substr(d, 0, std.length(d) - std.length(unit));
    if std.objectHas(units, unit) && digits(number) then std.parseInt(number) * units[unit] else null;
local ms(secs) = '%dms' % std.floor(secs * 1000);
{
  seconds:: seconds,
  apply(mixin, factor, minWindow, minFor='2s')::
    local c = mixin._config;
    local floor = seconds(minWindow);
    mixin {
      _config+:: {
        [k]: ms(std.max(floor, seconds(c[k]) / factor))
        for k in std.objectFields(c)
        if k != 'dashboardRefresh' && seconds(c[k]) != null
      } + {
        forDurations: {
          [k]: if seconds(c.forDurations[k]) == 0 then '0m' else ms(std.max(seconds(minFor), seconds(c.forDurations[k]) / factor))
          for k in std.objectFields(c.forDurations)
        },
      },
    },
}
