// poolwatch's per-process alerts. Every alert: a severity (critical = page, warning = ticket;
// see alerts/alertmanager.yml), a runbook (docs/runbooks/<alertname>.md), a firing and a silent
// promtool test (alerts/tests/). Series are per (job, instance, db_client_connection_pool_name):
// one watched pool of one process. Metric names come from src/catalog.rs only.
local alert = import 'lib/alert.libsonnet';

{
  prometheusAlerts+:: {
    local c = $._config {
      s: $._config.jobSelector,
      poolLabelsJoined: std.join(', ', $._config.poolLabels),
      on: 'on (%s)' % self.poolLabelsJoined,
    },
    local a(name, severity, expr, summary, description) = alert.new(c, name, severity, expr % c, summary, description),
    groups+: [
      // Ledger: what the pool believes vs what really exists on the server (incident 1).
      {
        name: 'poolwatch-ledger',
        rules: [
          // Leak drift: the gap grew in each of two consecutive windows (90 min each) and by
          // at least 2 slots in all. One leaked slot an hour (incident 1) fires 2h45m after the
          // first leak, before the 3rd. One pooler reap is one step: it grows in one window
          // only. "A census succeeded in the last 5 min", not "for the whole window": one
          // failed census does not blind the alert for hours (the gauge keeps its last value
          // while the census fails, so a failure never looks like growth).
          a('PoolwatchPhantomGapGrowing', 'warning', |||
            (poolwatch_phantom_connections{%(s)s} - min_over_time(poolwatch_phantom_connections{%(s)s}[%(driftWindow)s])) >= 1
            and (min_over_time(poolwatch_phantom_connections{%(s)s}[%(driftWindow)s]) - min_over_time(poolwatch_phantom_connections{%(s)s}[%(driftWindow)s] offset %(driftWindow)s)) >= 1
            and (poolwatch_phantom_connections{%(s)s} - min_over_time(poolwatch_phantom_connections{%(s)s}[%(driftWindow)s] offset %(driftWindow)s)) >= %(driftMinSlots)s
            and max_over_time(poolwatch_census_up{%(s)s}[5m]) == 1
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: phantom connections keep growing (+{{ $value }} in 90m)',
            'The pool counts connections that do not exist on the server, and the gap grew in each of the last two 90-minute windows: slots are leaking (e.g. a listener that takes a pool connection on every reconnect and never returns it). Left alone the pool saturates and every acquire blocks.'),
          // A standing gap: at least one phantom slot at every census for 15 min, so it is not
          // the one-census race of a connection opening. Idle connections a pooler reaped are
          // dropped by the pool's idle_timeout (10 min) before this fires. A census that
          // fails now and then (>90 % up) still gives a verdict; a flapping one does not.
          a('PoolwatchPhantomGapPresent', 'warning', |||
            min_over_time(poolwatch_phantom_connections{%(s)s}[%(gapPresentWindow)s]) > 0
            and max_over_time(poolwatch_census_up{%(s)s}[5m]) == 1
            and avg_over_time(poolwatch_census_up{%(s)s}[%(gapPresentWindow)s]) > 0.9
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value }} phantom connection(s) for 30m',
            'The pool counts at least this many connections that have no session on the server (leaked, or killed by the server and not noticed). They hold pool slots that no query can use.'),
          // The census runs every 900 s (±20 %) by default, but a failed one is retried within
          // seconds (5 s, 10 s, 20 s … at most 2 min, ±20 %): one failure reads 0 for a few
          // seconds, so 5 min at 0 is some 6 failures in a row, not a blip. Without the census
          // the ledger and the phantom alerts are blind. (A dead task reads NaN, not 0:
          // PoolwatchWatchStalled covers it.)
          a('PoolwatchCensusDown', 'warning', |||
            poolwatch_census_up{%(s)s} == 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: poolwatch census failing for 5m',
            'poolwatch cannot query pg_stat_activity on its dedicated connection, and its retries (every few seconds to 2 minutes) keep failing. Server-real figures and the phantom gap are stale, so the leak alerts cannot fire.'),
        ],
      },
      // Liveness of poolwatch itself: a stalled or dead task freezes every figure of its pool.
      {
        name: 'poolwatch-liveness',
        rules: [
          // A sample completes every sample_interval (5 s by default) and a heartbeat is seen
          // every heartbeat_interval (10 s): 5 min without either is a stopped task, not a
          // slow one (the census, which can take seconds, never holds a sample that long).
          a('PoolwatchWatchStalled', 'warning', |||
            time() - poolwatch_last_sample_timestamp_seconds{%(s)s} > %(watchStalledSeconds)s
            or
            time() - poolwatch_last_heartbeat_timestamp_seconds{%(s)s} > %(watchStalledSeconds)s
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: poolwatch figures frozen for {{ $value | humanizeDuration }}',
            'poolwatch has not completed a sample (or seen a heartbeat) of this pool for minutes while the process still serves metrics: its background task stalled or died, and every figure of this pool (gaps, heartbeats, census) is frozen at its last value. health() reads degraded (watch_stalled).'),
        ],
      },
      // Acquire: callers waiting for a pool connection (incidents 1 and 4).
      {
        name: 'poolwatch-acquire',
        rules: [
          // Every slot checked out for 5 min: the next acquire waits. Short bursts at max are
          // normal for a right-sized pool, a 5 min plateau is not.
          a('PoolwatchPoolSaturated', 'warning', |||
            sum without (db_client_connection_state) (db_client_connection_count{%(s)s, db_client_connection_state="used"})
              >= db_client_connection_max{%(s)s}
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: all {{ $value }} connections checked out for 5m',
            'Every slot of the pool is in use; new acquires queue until one is returned or acquire_timeout expires.'),
          // Each timeout is a request that waited the whole acquire_timeout and failed. The
          // counter exists at 0 from the start, so the first timeout counts.
          a('PoolwatchAcquireTimeouts', 'critical', |||
            increase(db_client_connection_timeouts_total{%(s)s}[5m]) > 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value | humanize }} acquire timeouts in 5m',
            'Callers waited acquire_timeout and got no connection (sqlx PoolTimedOut). Requests are failing.'),
          // Someone is queued for a connection at every scrape for 10 min.
          a('PoolwatchAcquireWaiters', 'warning', |||
            db_client_connection_pending_requests{%(s)s} > 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value }} acquire(s) waiting for 10m',
            'Requests keep queueing for a pool connection. Latency grows by the wait time; acquire timeouts follow if it gets worse.'),
          // More than 1 in 100 connects took over 2.5 s in 10 min. Read from the le="2.5"
          // bucket, which both the coarse default buckets and the full ones have, so the
          // answer does not depend on interpolation inside a wide bucket (incident 4: 3-6 ms
          // for some connects, 18-24 min for others).
          a('PoolwatchSlowConnects', 'warning', |||
            1 - (
              sum by (%(poolLabelsJoined)s) (rate(db_client_connection_create_time_seconds_bucket{%(s)s, le="2.5"}[10m]))
              / sum by (%(poolLabelsJoined)s) (rate(db_client_connection_create_time_seconds_count{%(s)s}[10m]))
            ) > 0.01
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value | humanizePercentage }} of connects take over 2.5s',
            'Opening a new database connection is slow for more than 1 in 100 connects. New connections (after a kill, lifetime expiry or a burst) stall callers.'),
        ],
      },
      // Heartbeats: pool exhausted vs database unreachable (incident 4).
      {
        name: 'poolwatch-heartbeat',
        rules: [
          a('PoolwatchPoolExhausted', 'critical', |||
            poolwatch_heartbeat_up{%(s)s, path="pool"} == 0
            and %(on)s
            poolwatch_heartbeat_up{%(s)s, path="direct"} == 1
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }} is exhausted; the database is up',
            'Heartbeats through the pool fail while heartbeats on a dedicated connection succeed: the app cannot get connections. Either the process holds its slots, or the pool cannot grow (the server or the role is out of connection slots, or connects hang): the runbook tells which; do not restart for the second.'),
          a('PoolwatchDatabaseDown', 'critical', |||
            poolwatch_heartbeat_up{%(s)s, path="direct"} == 0
            and %(on)s
            poolwatch_heartbeat_up{%(s)s, path="pool"} == 0
          |||,
            'Database of pool {{ $labels.db_client_connection_pool_name }} unreachable from {{ $labels.instance }}',
            'Heartbeats fail both through the pool and on a dedicated connection: the database, DNS, or the network path to it is down.'),
        ],
      },
      // LISTEN/NOTIFY listeners (incident 1).
      {
        name: 'poolwatch-listener',
        rules: [
          // At least 3 reconnects in 4 h, all causes together: incident 1's one kill an hour
          // fires at the 3rd. Two ways to count, either is enough: increase() over series that
          // existed at 0 (the idle-session ones do from the start), and the sum now minus the
          // sum 4 h ago, which also sees a cause's first reconnect (a new series) once the
          // listener is older than the window. A single reconnect or a deploy (one each) is silent.
          a('PoolwatchListenerReconnectLoop', 'warning', |||
            sum without (cause, evidence) (increase(poolwatch_listener_reconnects_total{%(s)s}[%(reconnectLoopWindow)s])) >= %(reconnectLoopCount)s - 0.5
            or
            (
              sum without (cause, evidence) (poolwatch_listener_reconnects_total{%(s)s})
              - sum without (cause, evidence) (poolwatch_listener_reconnects_total{%(s)s} offset %(reconnectLoopWindow)s)
            ) >= %(reconnectLoopCount)s
          |||,
            'Listener {{ $labels.listener }} of pool {{ $labels.db_client_connection_pool_name }} reconnected {{ $value | humanize }} times in 4h',
            'A LISTEN/NOTIFY listener keeps losing its connection. Notifications sent while it reconnects are lost, and a buggy connect step may leak a pool slot each time.'),
          a('PoolwatchListenerDown', 'critical', |||
            poolwatch_listener_connected{%(s)s} == 0
          |||,
            'Listener {{ $labels.listener }} of pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }} down for 5m',
            'The LISTEN/NOTIFY listener has no connection: every notification sent now is lost for this process.'),
          // The server killed the listener's session for being idle (57P05) at least once in
          // 2 h. The counter exists at 0 for each way the cause is known (evidence), so the
          // first kill counts. One kill is enough to act on: it repeats.
          a('PoolwatchListenerIdleSessionTimeout', 'warning', |||
            sum without (evidence) (increase(poolwatch_listener_reconnects_total{%(s)s, cause="idle_session_timeout"}[%(idleSessionWindow)s])) > 0
          |||,
            'Server idle_session_timeout killed listener {{ $labels.listener }} of pool {{ $labels.db_client_connection_pool_name }}',
            'PostgreSQL ended the listener\'s session as idle (57P05). It will happen again every idle_session_timeout; each time notifications are lost and a slot may leak.'),
        ],
      },
      // Held connections and stalled work (incident 3).
      {
        name: 'poolwatch-work',
        rules: [
          a('PoolwatchLeakSuspects', 'warning', |||
            poolwatch_leak_suspect_connections{%(s)s} > 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value }} connection(s) held past the leak threshold',
            'Connections have been checked out far longer than expected. poolwatch logs where each was acquired.'),
          // No progress for 15 min while connections stay checked out AND something is stuck:
          // acquires waiting, a session active or idle in a transaction for 5 min, or lock
          // waiters now. A worker holding its dedicated connections idle with an empty queue has
          // none of these (its sessions sit `idle`), so it stays silent. The census figures are
          // read as they stand, not over a window: a census that sees lock waiters or a long
          // transaction is followed up within about a minute, so a glimpse is cleared by then,
          // while a lasting one stays (incident 3 pages about 20 min after work stops).
          a('PoolwatchWorkStalled', 'critical', |||
            increase(poolwatch_progress_total{%(s)s}[%(stallWindow)s]) == 0
            and %(on)s
            min_over_time(db_client_connection_count{%(s)s, db_client_connection_state="used"}[%(stallWindow)s]) > 0
            and %(on)s
            (
              max_over_time(db_client_connection_pending_requests{%(s)s}[%(stallWindow)s]) > 0
              or max without (state) (poolwatch_server_longest_in_state_seconds{%(s)s, state=~"active|idle_in_transaction|idle_in_transaction_aborted"}) > 300
              or poolwatch_server_lock_waiters{%(s)s} > 0
            )
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: no progress for 20m while connections stay checked out',
            'The app stopped reporting work done while its connections stay held and something is stuck (waiting acquires, a long statement or open transaction, lock waits): workers are wedged, not idle. The process looks healthy from outside.'),
          // The figure is the longest idle-in-transaction age at the last census. A census that
          // sees one open for a minute or more is followed up 45 s later (then 90 s, 180 s …),
          // so a transaction that ends right after the census clears within a minute (below
          // the 2 min `for`), and one that stays is followed until it crosses 5 min.
          a('PoolwatchTransactionStuck', 'warning', |||
            max without (state) (poolwatch_server_longest_in_state_seconds{%(s)s, state=~"idle_in_transaction|idle_in_transaction_aborted"}) > 300
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: a transaction idle for {{ $value | humanizeDuration }}',
            'A server session of this pool has been idle inside an open transaction for more than 5 minutes. Its locks (row, table, advisory) block other work.'),
          // Lock waiters at every census for 15 min (the 10 min window and the 5 min `for`).
          // Censuses run every 900 s, but one that sees a waiter is followed up 45 s later (then
          // 90 s, 180 s …): a wait one census happened to see is cleared within a minute; one
          // that lasts keeps the figure up through each follow-up.
          a('PoolwatchLockWait', 'warning', |||
            min_over_time(poolwatch_server_lock_waiters{%(s)s}[10m]) > 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value }} session(s) waiting for a lock for 10m+',
            'Sessions of this pool keep waiting for locks that are not released. Work that needs those locks has stopped.'),
        ],
      },
      // Sockets and configuration hazards (incidents 1 and 2).
      {
        name: 'poolwatch-hazards',
        rules: [
          a('PoolwatchClientSocketsCloseWait', 'warning', |||
            poolwatch_client_sockets{%(s)s, state="close_wait"} > 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value }} dead socket(s) in CLOSE_WAIT',
            'The peer closed these connections but the app still holds them: the next query on each fails (connection ended).'),
          // A hazard seen at any time in the last 30 min: a process in a crash loop (alive 2
          // min, gone 1 min) keeps one alert firing instead of firing and resolving at each
          // restart. Static until fixed.
          a('PoolwatchConfigHazard', 'warning', |||
            max_over_time(poolwatch_config_hazard_active{%(s)s}[%(hazardWindow)s]) > 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: configuration hazard {{ $labels.hazard }}',
            'poolwatch found a setting that will end idle connections under the app (listeners, minimum connections, heartbeats). See the runbook for each hazard.'),
        ],
      },
      // Per-address reachability of the database host (incident 4).
      {
        name: 'poolwatch-reach',
        rules: [
          // Some address down while another is up, for 5 min. Read from the per-pool counts,
          // present at every detail level; Detail::Full adds poolwatch_server_address_up per
          // address to name it. Every address down is PoolwatchDatabaseDown's case.
          a('PoolwatchServerAddressUnreachable', 'warning', |||
            poolwatch_server_addresses_down{%(s)s} > 0
            and %(on)s
            (poolwatch_server_addresses{%(s)s} - poolwatch_server_addresses_down{%(s)s}) > 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value }} database address(es) unreachable, other addresses up',
            'A TCP connect to some resolved address of the database host fails or times out while other addresses answer. New connections that try it first hang or fail; some connects are fast and others very slow. poolwatch_server_address_up (Detail::Full) or PoolWatch::reachability() names the address.'),
        ],
      },
      // Pooler kills: PgBouncer closes the pool's idle connections or fails its queries.
      {
        name: 'poolwatch-pooler',
        rules: [
          // The pooler (PgBouncer client_idle_timeout) ended the pool's connections, or a
          // heartbeat through it failed on client_idle_timeout / query_wait_timeout, in 30 min.
          // Incident 1 behind a pooler: sqlx replaces the dead connections silently, a held one
          // fails the app's next query.
          a('PoolwatchSessionsEndedByPooler', 'warning', |||
            sum by (%(poolLabelsJoined)s, cause) (
              increase(poolwatch_sessions_ended_total{%(s)s, cause=~"pooler_.*"}[30m])
              or increase(poolwatch_heartbeat_failures_total{%(s)s, cause=~"pooler_.*"}[30m])
            ) > 0
          |||,
            'Pooler ended connections of pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }} ({{ $labels.cause }})',
            'PgBouncer closed the pool\'s connections (pooler_idle_timeout: client_idle_timeout) or made its queries give up waiting for a server connection (pooler_wait_timeout: query_wait_timeout). Held connections fail the app\'s next query.'),
        ],
      },
      // Stranded slots and silent peers. A slot the pool counts as checked out that
      // the app does not hold through WatchedPool: typically stuck in sqlx's return-to-pool ping
      // on a connection whose peer went silent (no RST, no FIN). No census shows it: the server
      // session is alive. The gauge already needs the slot stranded at 3 consecutive samples;
      // sqlx never gives such a slot back, so 10 min of it is a slot lost until a restart.
      {
        name: 'poolwatch-stranded',
        rules: [
          a('PoolwatchStrandedSlots', 'warning', |||
            poolwatch_stranded_slots{%(s)s} > 0
          |||,
            'Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }}: {{ $value }} pool slot(s) stranded',
            'The pool counts connections as in use that the app does not hold and that are not idle: stuck in sqlx\'s return-to-pool cleanup, typically on a connection whose peer went silent. The pool is smaller by that much until the process restarts.'),
        ],
      },
    ],
  },
}
