// Fleet scale: recording rules that aggregate every replica of a job (without `instance`)
// into one series per job and pool, named level:metric:operations, and fleet alerts that
// name the replica at fault. 500 replicas x 2 pools become 2 series per rule and pool.
local alert = import 'lib/alert.libsonnet';

{
  local c = $._config {
    s: $._config.jobSelector,
    w: $._config.recordingRateWindow,
  },
  local record(name, expr) = { record: name, expr: expr % c },

  prometheusRules+:: {
    groups+: [
      {
        name: 'poolwatch-fleet.rules',
        rules: [
          record('job:db_client_connection_count:sum', 'sum without (instance) (db_client_connection_count{%(s)s})'),
          record('job:db_client_connection_max:sum', 'sum without (instance) (db_client_connection_max{%(s)s})'),
          record('job:poolwatch_server_connections:sum', 'sum without (instance, state) (poolwatch_server_connections{%(s)s})'),
          record('job:poolwatch_phantom_connections:sum', 'sum without (instance) (poolwatch_phantom_connections{%(s)s})'),
          record('job:poolwatch_phantom_connections:max', 'max without (instance) (poolwatch_phantom_connections{%(s)s})'),
          // The share of a job's replicas whose pool has had a gap at every census of the
          // window; 0 (not absent) when none has.
          record('job:poolwatch_replicas_with_phantom_gap:ratio', |||
            (
              count without (instance) (min_over_time(poolwatch_phantom_connections{%(s)s}[%(gapPresentWindow)s]) > 0)
              or 0 * count without (instance) (poolwatch_phantom_connections{%(s)s})
            )
            / count without (instance) (poolwatch_phantom_connections{%(s)s})
          |||),
          record('job:poolwatch_census_up:min', 'min without (instance) (poolwatch_census_up{%(s)s})'),
          record('job:poolwatch_heartbeat_up:min', 'min without (instance) (poolwatch_heartbeat_up{%(s)s})'),
          record('job:db_client_connection_pending_requests:sum', 'sum without (instance) (db_client_connection_pending_requests{%(s)s})'),
          record('job:db_client_connection_timeouts:rate' + c.w, 'sum without (instance) (rate(db_client_connection_timeouts_total{%(s)s}[%(w)s]))'),
          record('job:db_client_connection_wait_time_seconds_bucket:rate' + c.w, 'sum without (instance) (rate(db_client_connection_wait_time_seconds_bucket{%(s)s}[%(w)s]))'),
          record('job:poolwatch_listener_reconnects:rate' + c.w, 'sum without (instance, cause, evidence) (rate(poolwatch_listener_reconnects_total{%(s)s}[%(w)s]))'),
        ],
      },
    ],
  },

  prometheusAlerts+:: {
    local a(name, severity, expr, summary, description) = alert.new(c, name, severity, expr % c, summary, description),
    groups+: [
      {
        name: 'poolwatch-fleet',
        rules: [
          // More than 10 % of a job's replicas hold a standing phantom gap in the same pool:
          // a code path leaking across the fleet (a release), not one sick process.
          a('PoolwatchFleetPhantomGapShare', 'warning', |||
            job:poolwatch_replicas_with_phantom_gap:ratio{%(s)s} > %(fleetGapShare)s
          |||,
            '{{ $value | humanizePercentage }} of the replicas of {{ $labels.job }} have phantom connections in pool {{ $labels.db_client_connection_pool_name }}',
            'Many replicas count pool connections that do not exist on the server: a leak shipped to the whole fleet (a release, a config change), or the server/pooler ends sessions the pools do not notice.'),
          // The replica whose gap grew the most in the window, one alert per job and pool,
          // naming it (`instance`): where to look first when a fleet leaks.
          a('PoolwatchFleetPhantomGapGrowing', 'warning', |||
            topk without (instance) (1,
              poolwatch_phantom_connections{%(s)s} - min_over_time(poolwatch_phantom_connections{%(s)s}[%(fleetGrowthWindow)s])
            ) >= %(fleetGrowthMinSlots)s
          |||,
            'Replica {{ $labels.instance }} of {{ $labels.job }}: phantom gap of pool {{ $labels.db_client_connection_pool_name }} grew by {{ $value }}',
            'This replica leaks pool slots faster than any other of its job: its pool counts connections the server does not have, and the count grows. Look at this process first (its logs, its listener reconnects).'),
        ],
      },
    ],
  },
}
