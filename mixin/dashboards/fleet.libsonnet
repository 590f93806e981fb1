// The fleet overview: every replica of a job side by side, the worst pools first. Answers
// "which replica leaks?" before anyone opens the per-pool dashboard.
local d = import '../lib/dashboard.libsonnet';

{
  fleetDashboard(c):: d.new(c, 'poolwatch-fleet', 'poolwatch: fleet overview', 'Every replica of a job: phantom gap per replica, the worst pools, pool-believed vs server-real for the whole job, replicas whose census, heartbeats or listeners fail. Alerts in alerts/poolwatch-fleet.rules.yml.', [
    {
      title: 'Ledger across the fleet',
      panels: [
        d.panel(
          'Phantom gap by replica',
          "Each replica's pool-counted connections minus its real server sessions. One line climbing while the others stay at 0 is one replica leaking slots (PoolwatchFleetPhantomGapGrowing names it); many lines above 0 is a fleet-wide leak (PoolwatchFleetPhantomGapShare).",
          'short',
          [['max by (instance, db_client_connection_pool_name) (poolwatch_phantom_connections{%(sel)s})', '{{instance}} {{db_client_connection_pool_name}}']],
        ),
        d.panel(
          'Worst pools: largest gap',
          'The ten replica pools with the largest phantom gap now. Start with the first row: its process holds the most slots that no query can use.',
          'short',
          [['topk(10, max by (instance, db_client_connection_pool_name) (poolwatch_phantom_connections{%(sel)s}))', '{{instance}} {{db_client_connection_pool_name}}']],
          'table',
          { options: { showHeader: true }, targets: [super.targets[0] { instant: true, format: 'table' }] },
        ),
        d.panel(
          'Share of replicas with a gap',
          'Of the replicas running each pool, the share whose phantom gap is above 0 now. A release that leaks shows here as a rising share across the fleet.',
          'percentunit',
          [['count by (job, db_client_connection_pool_name) (poolwatch_phantom_connections{%(sel)s} > 0) / count by (job, db_client_connection_pool_name) (poolwatch_phantom_connections{%(sel)s}) or 0 * count by (job, db_client_connection_pool_name) (poolwatch_phantom_connections{%(sel)s})', '{{job}} {{db_client_connection_pool_name}}']],
        ),
        d.panel(
          'Whole job: pool believes vs server has',
          'The sum over every replica of the connections the pools count and the sessions that really exist on the server. The distance between the two lines is the fleet-wide phantom gap; the server side is what the database really carries.',
          'short',
          [
            ['sum by (job, db_client_connection_pool_name) (db_client_connection_count{%(sel)s})', '{{job}} {{db_client_connection_pool_name}} pool believes'],
            ['sum by (job, db_client_connection_pool_name) (poolwatch_server_connections{%(sel)s})', '{{job}} {{db_client_connection_pool_name}} server has'],
          ],
        ),
      ],
    },
    {
      title: 'Health of every replica',
      panels: [
        d.panel(
          'Replicas reporting, census down, heartbeat failing',
          'How many replicas export the pool, how many of them cannot run the census now (their server-side figures are stale), and how many fail the heartbeat through the pool (exhausted or leaking).',
          'short',
          [
            ['count by (job, db_client_connection_pool_name) (db_client_connection_max{%(sel)s})', '{{job}} {{db_client_connection_pool_name}} replicas'],
            ['sum by (job, db_client_connection_pool_name) (1 - poolwatch_census_up{%(sel)s})', '{{job}} {{db_client_connection_pool_name}} census down'],
            ['sum by (job, db_client_connection_pool_name) (1 - poolwatch_heartbeat_up{%(sel)s, path="pool"})', '{{job}} {{db_client_connection_pool_name}} pool heartbeat failing'],
          ],
        ),
        d.panel(
          'Listener reconnects by replica (top 10)',
          'The replicas whose LISTEN/NOTIFY listeners reconnect the most. A replica with a steady rhythm (once an hour) is being killed by idle_session_timeout or a pooler, and may leak a slot each time (incident 1).',
          'short',
          [['topk(10, sum by (instance, db_client_connection_pool_name) (increase(poolwatch_listener_reconnects_total{%(sel)s}[$__rate_interval])))', '{{instance}} {{db_client_connection_pool_name}}']],
        ),
        d.panel(
          'Acquire wait p99, whole job',
          'The 99th percentile of acquire waits across every replica of the job. Rising with the phantom gap: leaked slots are starving the pools; rising alone: the fleet is too small for the load.',
          's',
          [['histogram_quantile(0.99, sum by (job, db_client_connection_pool_name, le) (rate(db_client_connection_wait_time_seconds_bucket{%(sel)s}[$__rate_interval])))', '{{job}} {{db_client_connection_pool_name}} p99']],
        ),
        d.panel(
          'Acquire timeouts by replica (top 10)',
          'Acquires that waited acquire_timeout and got nothing, per replica: user-facing errors. One replica alone: its pool leaks or is wedged; all replicas: the database or the fleet size.',
          'short',
          [['topk(10, sum by (instance, db_client_connection_pool_name) (increase(db_client_connection_timeouts_total{%(sel)s}[$__rate_interval])))', '{{instance}} {{db_client_connection_pool_name}}']],
        ),
      ],
    },
  ]),
}
