// Everything a user may change when importing the mixin. Override with
//   (import 'github.com/poolwatch/poolwatch/mixin/mixin.libsonnet') + { _config+:: { jobSelector: 'job="api"' } }
// (installed with `jb install github.com/poolwatch/poolwatch/mixin@main`; see README.md).
{
  _config+:: {
    // Selects the app processes that run poolwatch. Every alert, recording rule and
    // dashboard query carries it.
    jobSelector: 'job!=""',
    // Where each alert's runbook lives; %s is the alert name.
    runbookURLPattern: 'https://github.com/poolwatch/poolwatch/blob/main/docs/runbooks/%s.md',
    // Labels that identify one watched pool of one process (besides the job selector).
    poolLabels: ['job', 'instance', 'db_client_connection_pool_name'],

    // `for` durations and windows, at real pace (see alerts/tests/ for the timelines).
    forDurations: {
      PoolwatchPhantomGapGrowing: '15m',
      PoolwatchPhantomGapPresent: '15m',
      PoolwatchCensusDown: '5m',
      PoolwatchWatchStalled: '5m',
      PoolwatchPoolSaturated: '5m',
      PoolwatchAcquireTimeouts: '5m',
      PoolwatchAcquireWaiters: '10m',
      PoolwatchSlowConnects: '10m',
      PoolwatchPoolExhausted: '2m',
      PoolwatchDatabaseDown: '2m',
      PoolwatchListenerReconnectLoop: '0m',
      PoolwatchListenerDown: '5m',
      PoolwatchListenerIdleSessionTimeout: '0m',
      PoolwatchLeakSuspects: '10m',
      PoolwatchWorkStalled: '5m',
      PoolwatchTransactionStuck: '2m',
      PoolwatchLockWait: '5m',
      PoolwatchClientSocketsCloseWait: '10m',
      PoolwatchConfigHazard: '5m',
      PoolwatchServerAddressUnreachable: '5m',
      PoolwatchStrandedSlots: '10m',
      PoolwatchFleetPhantomGapShare: '15m',
      PoolwatchFleetPhantomGapGrowing: '15m',
      PoolwatchFleetGap: '10m',
    },
    // Leak drift: the gap grew in each of two consecutive windows this long (one pooler
    // reap is one step, not drift).
    driftWindow: '90m',
    // Leak drift: total growth over two windows at least this many slots.
    driftMinSlots: 2,
    // A stalled watch: no sample (or heartbeat seen) for this many seconds. The default
    // suits sample_interval and heartbeat_interval up to about a minute; raise it with them.
    watchStalledSeconds: 300,
    // A standing gap: present at every census this long.
    gapPresentWindow: '15m',
    // Reconnect loop: this many reconnects within the window.
    reconnectLoopWindow: '4h',
    reconnectLoopCount: 3,
    // Idle-session kills are looked for this far back.
    idleSessionWindow: '2h',
    // Stalled work: no progress this long while connections stay checked out.
    stallWindow: '15m',
    // A hazard seen in this window counts as present (a crash-looping process does not flap).
    hazardWindow: '30m',
    // Fleet: share of a job's replicas with a standing gap that pages a warning.
    fleetGapShare: 0.1,
    // Fleet: window over which a replica's gap growth is measured, and the growth that alerts.
    fleetGrowthWindow: '1h',
    fleetGrowthMinSlots: 2,
    // Rate window of the recording rules.
    recordingRateWindow: '5m',

    // Dashboards.
    dashboardTags: ['poolwatch'],
    dashboardTimezone: 'utc',
    dashboardRefresh: '30s',
  },
}
