// The fleet gap: per pool, across every replica, what the pools believe minus the
// server sessions that really exist, joined on the pool's stable tag (application_name).
//
// Needs two sources scraped by the same Prometheus:
// - every app replica's poolwatch metrics (db_client_connection_count, poolwatch_pool_info);
// - postgres_exporter with alerts/postgres_exporter/queries.yaml, or sql_exporter with
//   alerts/sql_exporter/poolwatch.collector.yml (the same query and series:
//   pg_stat_activity_by_app_count{application_name, state}).
// Sessions that reach the server through a pooler carry the pooler's application_name, not the
// app's: the join holds for apps that connect to PostgreSQL directly (or through a pooler that
// forwards application_name, e.g. PgBouncer session mode with track_extra_parameters).
// Rendered into alerts/fleet-gap.rules.yml (group `poolwatch-fleet-gap`).
local alert = import 'lib/alert.libsonnet';

{
  local c = $._config { s: $._config.jobSelector },
  local record(name, expr) = { record: name, expr: expr % c },

  prometheusRules+:: {
    groups+: [
      {
        name: 'poolwatch-fleet-gap',
        rules: [
          // What the replicas' pools believe is open (used + idle), per pool tag, all
          // instances summed.
          record('application_name:poolwatch_pool_believed_connections:sum', |||
            sum by (application_name, db_client_connection_pool_name) (
              sum without (db_client_connection_state) (db_client_connection_count{%(s)s})
              * on (job, instance, db_client_connection_pool_name) group_left (application_name)
              poolwatch_pool_info{%(s)s}
            )
          |||),
          // The pool's server sessions across the fleet, one reading per database
          // (postgres_exporter's job, not the apps').
          record('application_name:pg_stat_activity_by_app_connections:sum', 'sum by (application_name) (pg_stat_activity_by_app_count)'),
          // The fleet gap: believed minus real; a pool with no session at all on the server
          // reads its whole believed count, but only while postgres_exporter is scraped at
          // all (no exporter series: no gap, not a false one). Above 0: slots the replicas
          // count that do not exist (leaks, connections killed by the server or a pooler).
          record('application_name:poolwatch_fleet_gap_connections:sum', |||
            application_name:poolwatch_pool_believed_connections:sum
            - on (application_name) group_left ()
            (
              application_name:pg_stat_activity_by_app_connections:sum
              or on (application_name)
              (
                sum by (application_name) (application_name:poolwatch_pool_believed_connections:sum) * 0
                and on () (count(pg_stat_activity_by_app_count) > 0)
              )
            )
          |||),
        ],
      },
    ],
  },

  prometheusAlerts+:: {
    groups+: [
      {
        name: 'poolwatch-fleet-gap-alerts',
        rules: [
          alert.new(c, 'PoolwatchFleetGap', 'warning',
                    'application_name:poolwatch_fleet_gap_connections:sum > 0',
                    'Pool {{ $labels.db_client_connection_pool_name }}: {{ $value }} connection(s) counted by the fleet\'s pools do not exist on the server',
                    'Across every replica, pool {{ $labels.db_client_connection_pool_name }} ({{ $labels.application_name }}) believes {{ $value }} more connection(s) open than the server has sessions for, for 10 minutes: leaked or dead slots somewhere in the fleet. Find the replicas with poolwatch_client_gap > 0.'),
        ],
      },
    ],
  },
}
