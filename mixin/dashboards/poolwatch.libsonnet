// The per-pool dashboard: the ledger (pool-believed vs server-real) first, then acquires,
// listeners, heartbeats, sockets and hazards, leak suspects and progress, reachability.
local d = import '../lib/dashboard.libsonnet';

{
  poolwatchDashboard(c):: d.new(c, 'poolwatch', 'poolwatch: sqlx connection pools', "Pool-believed vs server-real connections, acquire waits, listeners, heartbeats, sockets, hazards, leak suspects and progress, per pool. Metrics from the poolwatch crate; alerts in alerts/poolwatch.rules.yml.", [
    {
      title: "Ledger: what the pool believes vs what the server has",
      panels: [
        d.panel(
          "Pool: used / idle / max",
          "What the pool believes: connections checked out (used), idle in the pool, and its max_connections / min_connections. Used pinned at max = every acquire waits (see Acquire row). Compare with the server panel to its right: pool used+idle should equal server sessions.",
          "short",
          [
            ["sum by (db_client_connection_pool_name, db_client_connection_state) (db_client_connection_count{%(sel)s})", "{{db_client_connection_pool_name}} {{db_client_connection_state}}"],
            ["sum by (db_client_connection_pool_name) (db_client_connection_max{%(sel)s})", "{{db_client_connection_pool_name}} max"],
            ["sum by (db_client_connection_pool_name) (db_client_connection_idle_min{%(sel)s})", "{{db_client_connection_pool_name}} min"],
          ],
        ),
        d.panel(
          "Server: real sessions by state",
          "What really exists: this pool's sessions in pg_stat_activity (matched by poolwatch's application_name tag), by state. idle_in_transaction for long = held transactions (incident 3); unknown = the census role lacks pg_read_all_stats.",
          "short",
          [
            ["sum by (db_client_connection_pool_name, state) (poolwatch_server_connections{%(sel)s})", "{{db_client_connection_pool_name}} {{state}}"],
          ],
        ),
        d.panel(
          "Phantom gap (pool open − server real)",
          "Connections the pool counts that do not exist on the server, per instance. 0 is healthy. A line that steps up and never comes down is leaking slots (incident 1: +1 per listener reconnect); alerts PoolwatchPhantomGapGrowing / PoolwatchPhantomGapPresent. Only meaningful while the census is up.",
          "short",
          [
            ["poolwatch_phantom_connections{%(sel)s}", "{{db_client_connection_pool_name}} {{instance}}"],
          ],
        ),
        d.panel(
          "Pool open vs server real",
          "The ledger in one picture: total connections the pool counts (open) against the sessions the server really has for it. The space between the two lines is the phantom gap.",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (db_client_connection_count{%(sel)s})", "{{db_client_connection_pool_name}} pool open"],
            ["sum by (db_client_connection_pool_name) (poolwatch_server_connections{%(sel)s})", "{{db_client_connection_pool_name}} server real"],
          ],
        ),
        d.panel(
          "Census up / duration",
          "Whether poolwatch's dedicated census connection can read pg_stat_activity (1 = up) and how long the last census took. While it is 0 the server-side figures and the phantom gap are stale (PoolwatchCensusDown); a slow census means a slow or overloaded server.",
          "short",
          [
            ["min by (db_client_connection_pool_name) (poolwatch_census_up{%(sel)s})", "{{db_client_connection_pool_name}} up"],
            ["max by (db_client_connection_pool_name) (poolwatch_census_duration_seconds{%(sel)s})", "{{db_client_connection_pool_name}} duration (s)"],
            ["sum by (db_client_connection_pool_name, cause) (increase(poolwatch_census_errors_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} errors {{cause}}"],
          ],
        ),
        d.panel(
          "Watch liveness: seconds since each task last completed",
          "How long ago poolwatch last completed a sample (every sample_interval, 5 s by default), a successful census (every census_interval, 900 s ±20 % by default; retried within seconds after a failure, and followed up within a minute after seeing a lock wait, a long transaction or a gap) and saw a heartbeat. A line that climbs without falling back is a stalled or dead task: every figure of that pool is frozen (PoolwatchWatchStalled). Restarts: a task that panicked and was restarted (a poolwatch bug: report it).",
          "s",
          [
            ["max by (db_client_connection_pool_name) (time() - poolwatch_last_sample_timestamp_seconds{%(sel)s})", "{{db_client_connection_pool_name}} sample"],
            ["max by (db_client_connection_pool_name) (time() - poolwatch_last_heartbeat_timestamp_seconds{%(sel)s})", "{{db_client_connection_pool_name}} heartbeat"],
            ["max by (db_client_connection_pool_name) (time() - poolwatch_last_census_timestamp_seconds{%(sel)s})", "{{db_client_connection_pool_name}} census"],
            ["max by (db_client_connection_pool_name) (poolwatch_census_age_seconds{%(sel)s})", "{{db_client_connection_pool_name}} census figures' age"],
            ["sum by (db_client_connection_pool_name, task) (increase(poolwatch_task_restarts_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} restarts {{task}}"],
          ],
        ),
      ],
    },
    {
      title: "Acquire: waiting for a connection",
      panels: [
        d.panel(
          "Acquire wait p50 / p99",
          "How long callers waited in acquire() for a connection. p99 near acquire_timeout = timeouts imminent. Rising wait with used at max = pool too small or slots held/leaked; rising wait with used below max = new connections are slow (see create time).",
          "s",
          [
            ["histogram_quantile(0.5, sum by (db_client_connection_pool_name, le) (rate(db_client_connection_wait_time_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{db_client_connection_pool_name}} p50"],
            ["histogram_quantile(0.99, sum by (db_client_connection_pool_name, le) (rate(db_client_connection_wait_time_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{db_client_connection_pool_name}} p99"],
          ],
        ),
        d.panel(
          "Pending acquires",
          "Callers queued for a connection right now. Sustained > 0 for 10 min fires PoolwatchAcquireWaiters.",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (db_client_connection_pending_requests{%(sel)s})", "{{db_client_connection_pool_name}}"],
          ],
        ),
        d.panel(
          "Acquire timeouts",
          "Acquires that waited the whole acquire_timeout and failed (sqlx PoolTimedOut; sqlx itself logs nothing). Each one is a failed request: PoolwatchAcquireTimeouts pages.",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (increase(db_client_connection_timeouts_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}}"],
          ],
        ),
        d.panel(
          "Connection use time p50 / p99",
          "How long a connection stays checked out per acquire. A growing p99 means transactions or code paths holding connections longer (slow queries, I/O while holding a connection) and leads to saturation.",
          "s",
          [
            ["histogram_quantile(0.5, sum by (db_client_connection_pool_name, le) (rate(db_client_connection_use_time_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{db_client_connection_pool_name}} p50"],
            ["histogram_quantile(0.99, sum by (db_client_connection_pool_name, le) (rate(db_client_connection_use_time_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{db_client_connection_pool_name}} p99"],
          ],
        ),
        d.panel(
          "Connection create time p50 / p99",
          "Time to open one new connection (TCP, TLS, auth). Healthy: well under 200 ms. A p99 of seconds while p50 stays low = some resolved addresses or proxy nodes hang (incident 4); PoolwatchSlowConnects fires above 2 s.",
          "s",
          [
            ["histogram_quantile(0.5, sum by (db_client_connection_pool_name, le) (rate(db_client_connection_create_time_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{db_client_connection_pool_name}} p50"],
            ["histogram_quantile(0.99, sum by (db_client_connection_pool_name, le) (rate(db_client_connection_create_time_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{db_client_connection_pool_name}} p99"],
          ],
        ),
        d.panel(
          "Acquires by any caller (pool hooks) and slow acquires (sqlx's events)",
          "For pools driven by a library (ORM, job queue) whose acquires bypass WatchedPool: connections opened and idle connections handed out, counted by the pool's own hooks (instrument_options_named), releases, and acquires sqlx itself reported slower than acquire_slow_threshold (sqlx_acquire_layer). Acquires = opened + idle acquires (minus min-connection fills). Slow acquires > 0: the pool is saturated; see wait time above.",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (rate(poolwatch_pool_connects_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} opened/s"],
            ["sum by (db_client_connection_pool_name) (rate(poolwatch_pool_idle_acquires_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} idle acquires/s"],
            ["sum by (db_client_connection_pool_name) (rate(poolwatch_pool_releases_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} releases/s"],
            ["sum by (db_client_connection_pool_name) (increase(poolwatch_pool_slow_acquires_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} slow acquires"],
          ],
        ),
      ],
    },
    {
      title: "Listener: LISTEN/NOTIFY connections",
      panels: [
        d.panel(
          "Listener connected",
          "1 = the listener has a live connection, 0 = notifications are being lost. Down for 5 min pages (PoolwatchListenerDown).",
          "short",
          [
            ["min by (db_client_connection_pool_name, listener) (poolwatch_listener_connected{%(sel)s})", "{{db_client_connection_pool_name}} {{listener}}"],
          ],
          "stat", {"fieldConfig": {"defaults": {"unit": "short", "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": null}, {"color": "green", "value": 1}]}}}},
        ),
        d.panel(
          "Listener reconnects by cause",
          "Why listeners lost their connection. idle_session_timeout = the server's 57P05 kill of a LISTEN-only session (incident 1: hourly); connection_ended/reset = a pooler or proxy idle kill (incident 2). More than 3 an hour fires PoolwatchListenerReconnectLoop.",
          "short",
          [
            ["sum by (db_client_connection_pool_name, listener, cause) (increase(poolwatch_listener_reconnects_total{%(sel)s}[$__rate_interval]))", "{{listener}} {{cause}}"],
          ],
        ),
        d.panel(
          "Listener downtime p50 / p99",
          "How long each disconnection lasted until the listener was listening again. Notifications sent in this time are lost.",
          "s",
          [
            ["histogram_quantile(0.5, sum by (db_client_connection_pool_name, listener, le) (rate(poolwatch_listener_downtime_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{listener}} p50"],
            ["histogram_quantile(0.99, sum by (db_client_connection_pool_name, listener, le) (rate(poolwatch_listener_downtime_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{listener}} p99"],
          ],
        ),
        d.panel(
          "Notifications / age of the last one",
          "Notifications received per second, and seconds since the last one. A listener that is connected but has received nothing for far longer than usual may be listening on the wrong channel or a dead connection.",
          "short",
          [
            ["sum by (db_client_connection_pool_name, listener) (rate(poolwatch_listener_notifications_total{%(sel)s}[$__rate_interval]))", "{{listener}} per s"],
            ["time() - max by (db_client_connection_pool_name, listener) (poolwatch_listener_last_notification_timestamp_seconds{%(sel)s})", "{{listener}} age (s)"],
          ],
        ),
      ],
    },
    {
      title: "Heartbeat: pool exhausted or database down?",
      panels: [
        d.panel(
          "Heartbeat duration p99 by path",
          "Heartbeat round trip through the pool (path=pool: the acquire, which pings the connection, or acquire + SELECT 1 when test_before_acquire is off) and a ping on poolwatch's dedicated connection (path=direct; the beats space out to 120 s on a quiet replica). pool slow + direct fast = the pool is the bottleneck; both slow = the database or network.",
          "s",
          [
            ["histogram_quantile(0.99, sum by (db_client_connection_pool_name, path, le) (rate(poolwatch_heartbeat_duration_seconds_bucket{%(sel)s}[$__rate_interval])))", "{{db_client_connection_pool_name}} {{path}} p99"],
          ],
        ),
        d.panel(
          "Heartbeat up by path",
          "1 = the last heartbeat succeeded. pool=0 with direct=1: pool exhausted (PoolwatchPoolExhausted); both 0: database unreachable (PoolwatchDatabaseDown).",
          "short",
          [
            ["min by (db_client_connection_pool_name, path) (poolwatch_heartbeat_up{%(sel)s})", "{{db_client_connection_pool_name}} {{path}}"],
          ],
        ),
        d.panel(
          "Heartbeat failures by cause",
          "Failed heartbeats by path and cause (pool_timed_out = no connection from the pool; refused / timed_out / too_many_connections = the database side).",
          "short",
          [
            ["sum by (db_client_connection_pool_name, path, cause) (increase(poolwatch_heartbeat_failures_total{%(sel)s}[$__rate_interval]))", "{{path}} {{cause}}"],
          ],
        ),
      ],
    },
    {
      title: "Sockets & configuration hazards",
      panels: [
        d.panel(
          "Client sockets to the database by TCP state",
          "This process's own TCP sockets to the database (Linux). close_wait = the server/pooler/proxy hung up and the app has not noticed: the next query on it fails (PoolwatchClientSocketsCloseWait). syn_sent piling up = connects hanging (incident 4).",
          "short",
          [
            ["sum by (db_client_connection_pool_name, state) (poolwatch_client_sockets{%(sel)s})", "{{db_client_connection_pool_name}} {{state}}"],
          ],
        ),
        d.panel(
          "Configuration hazards present",
          "Settings poolwatch found that will kill connections (e.g. server idle_session_timeout vs idle listener/min connections, heartbeat slower than an idle timeout): how many, and each one found (a hazard's series exists once it was found; Detail::Full exports all twelve at 0). Any value 1 fires PoolwatchConfigHazard; the runbook explains each hazard.",
          "short",
          [
            ["max by (db_client_connection_pool_name) (poolwatch_config_hazards{%(sel)s})", "{{db_client_connection_pool_name}} hazards found"],
            ["max by (db_client_connection_pool_name, hazard) (poolwatch_config_hazard_active{%(sel)s})", "{{db_client_connection_pool_name}} {{hazard}}"],
          ],
          "stat", {"fieldConfig": {"defaults": {"unit": "short", "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": null}, {"color": "orange", "value": 1}]}}}},
        ),
      ],
    },
    {
      title: "Leak suspects & progress",
      panels: [
        d.panel(
          "Leak suspects",
          "Connections held longer than the leak threshold now, and new suspects found. Suspects for 10 min fire PoolwatchLeakSuspects; the app log names where each was acquired.",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (poolwatch_leak_suspect_connections{%(sel)s})", "{{db_client_connection_pool_name}} held now"],
            ["sum by (db_client_connection_pool_name) (increase(poolwatch_leak_suspects_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} new"],
          ],
        ),
        d.panel(
          "Progress vs checked-out connections",
          "Units of work the app reports per second (poolwatch::Progress) next to connections checked out. Progress at 0 while connections stay checked out = workers wedged holding connections (incident 3, PoolwatchWorkStalled).",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (rate(poolwatch_progress_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} work/s"],
            ["sum by (db_client_connection_pool_name) (db_client_connection_count{%(sel)s, db_client_connection_state=\"used\"})", "{{db_client_connection_pool_name}} used"],
          ],
        ),
        d.panel(
          "Server sessions: longest in state (stuck transactions)",
          "The longest any of the pool's server sessions has been in its state. A climbing idle_in_transaction line is a transaction left open by a wedged task (incident 3): its locks block others. A climbing active line is a stuck or slow statement. Fires PoolwatchTransactionStuck.",
          "s",
          [
            ["max by (db_client_connection_pool_name, state) (poolwatch_server_longest_in_state_seconds{%(sel)s, state=~\"idle_in_transaction|idle_in_transaction_aborted|active\"})", "{{db_client_connection_pool_name}} {{state}}"],
          ],
        ),
        d.panel(
          "Locks: waiters and advisory locks held",
          "Sessions of the pool waiting for a lock, and the advisory locks its sessions hold (total, and the most in one session). Many session-scoped advisory locks on one session tie work groups to that session: if it wedges, they all stop. Waiters for 10 min fire PoolwatchLockWait.",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (poolwatch_server_lock_waiters{%(sel)s})", "{{db_client_connection_pool_name}} waiting for a lock"],
            ["sum by (db_client_connection_pool_name) (poolwatch_server_advisory_locks{%(sel)s})", "{{db_client_connection_pool_name}} advisory locks held"],
            ["max by (db_client_connection_pool_name) (poolwatch_server_advisory_locks_max_per_session{%(sel)s})", "{{db_client_connection_pool_name}} most in one session"],
          ],
        ),
      ],
    },
    {
      title: "Reachability: every address the database host resolves to",
      panels: [
        d.panel(
          "Server addresses up",
          "1 = a TCP connect to this resolved address of the database host succeeded within census_timeout at the last probe, 0 = refused or timed out. Some addresses at 0 while others are at 1: connects that try the dead one first hang (incident 4, PoolwatchServerAddressUnreachable). A gap: the address left the DNS answer. Per-address series need Config::detail(Detail::Full).",
          "short",
          [
            ["min by (db_client_connection_pool_name, server_address) (poolwatch_server_address_up{%(sel)s})", "{{db_client_connection_pool_name}} {{server_address}}"],
          ],
        ),
        d.panel(
          "TCP connect time per address",
          "How long the last bare TCP handshake to each resolved address took. A healthy address takes milliseconds; a value pinned at census_timeout is an address that drops SYNs (a blackhole: the driver waits minutes on it); near 0 with up = 0 is a refusal. Per-address series need Config::detail(Detail::Full).",
          "s",
          [
            ["max by (db_client_connection_pool_name, server_address) (poolwatch_server_address_connect_seconds{%(sel)s})", "{{db_client_connection_pool_name}} {{server_address}}"],
          ],
        ),
        d.panel(
          "Addresses resolved vs up",
          "How many addresses the pool's database host resolves to (0: DNS failed) and how many of them failed a TCP connect at the last probe. A change in the count is a DNS change (failover, proxy fleet scaling); down above 0 while others answer fires PoolwatchServerAddressUnreachable.",
          "short",
          [
            ["max by (db_client_connection_pool_name) (poolwatch_server_addresses{%(sel)s})", "{{db_client_connection_pool_name}} resolved"],
            ["max by (db_client_connection_pool_name) (poolwatch_server_addresses_down{%(sel)s})", "{{db_client_connection_pool_name}} down"],
          ],
        ),
      ],
    },
    {
      title: "Pooler: sessions ended and PgBouncer's view",
      panels: [
        d.panel(
          "Sessions ended without the pool closing them",
          "Sessions of the pool that the server, a pooler or a proxy ended while the pool still counted them (sqlx replaces them silently), by cause, per 5 min. idle_session_timeout / pooler_idle_timeout: an idle limit on the path is shorter than the pool's idle lifetime (PoolwatchSessionsEndedByPooler); admin_shutdown: pg_terminate_backend or a restart.",
          "short",
          [
            ["sum by (db_client_connection_pool_name, cause) (increase(poolwatch_sessions_ended_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} {{cause}}"],
          ],
        ),
        d.panel(
          "Pooler: waiting clients and oldest wait",
          "With pooler_admin: clients waiting in PgBouncer's pool of this database and user (all replicas) and how long the oldest has waited (maxwait). Waiters with idle app pools: PgBouncer's default_pool_size is the bottleneck, not the app's pool.",
          "short",
          [
            ["max by (db_client_connection_pool_name) (poolwatch_pooler_waiting_clients{%(sel)s})", "{{db_client_connection_pool_name}} waiting"],
            ["max by (db_client_connection_pool_name) (poolwatch_pooler_max_wait_seconds{%(sel)s})", "{{db_client_connection_pool_name}} max wait (s)"],
          ],
        ),
        d.panel(
          "Pooler: server connections",
          "With pooler_admin: PgBouncer's server connections for this database and user, active (linked to a client) and idle. Active at the pool size with waiting clients: the pooler's pool is exhausted.",
          "short",
          [
            ["max by (db_client_connection_pool_name, state) (poolwatch_pooler_server_connections{%(sel)s})", "{{db_client_connection_pool_name}} {{state}}"],
          ],
        ),
      ],
    },
    {
      title: "Stranded slots, silent peers and the oldest waiter",
      panels: [
        d.panel(
          "Stranded slots and sockets whose send queue never drains",
          "Slots the pool counts as checked out that the app does not hold through the watched pool (e.g. stuck in sqlx's return-to-pool ping after the peer went silent), and sockets with unacknowledged bytes that never drain. The census cannot see this leak: the server session is alive. See PoolwatchStrandedSlots.",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (poolwatch_stranded_slots{%(sel)s})", "{{db_client_connection_pool_name}} stranded slots"],
            ["sum by (db_client_connection_pool_name) (poolwatch_client_sockets_send_queue_stuck{%(sel)s})", "{{db_client_connection_pool_name}} sockets with a stuck send queue"],
          ],
        ),
        d.panel(
          "Oldest waiting acquire (maxwait) and waiters",
          "How long the oldest acquire still waiting for a connection has waited (PgBouncer's maxwait, for the app's own pool), next to how many wait. Climbing towards acquire_timeout: the pool is exhausted; the exhaustion WARN in the log names who holds the connections.",
          "s",
          [
            ["max by (db_client_connection_pool_name) (poolwatch_acquire_oldest_wait_seconds{%(sel)s})", "{{db_client_connection_pool_name}} oldest wait"],
            ["sum by (db_client_connection_pool_name) (db_client_connection_pending_requests{%(sel)s})", "{{db_client_connection_pool_name}} waiting"],
          ],
        ),
      ],
    },
    {
      title: "Connection lifecycle (with instrument_options_named)",
      panels: [
        d.panel(
          "Connections opened and closed by reason",
          "Per second: connections the pool opened, and closed by reason (idle_timeout, max_lifetime, broken, pool_closed), counted from sqlx's hooks with instrument_options_named (the closes at Detail::Full). broken climbing: killed backends, dead peers, errors (see poolwatch_sessions_ended_total for who ended them). Opens and closes both high and steady: churn (idle_timeout below the traffic's gaps, or max_lifetime short).",
          "short",
          [
            ["sum by (db_client_connection_pool_name) (rate(poolwatch_pool_connects_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} opened"],
            ["sum by (db_client_connection_pool_name, reason) (rate(poolwatch_connections_closed_total{%(sel)s}[$__rate_interval]))", "{{db_client_connection_pool_name}} closed: {{reason}}"],
          ],
        ),
        d.panel(
          "Oldest connection's age",
          "How long ago the oldest connection the pool holds was opened. A sawtooth capped at max_lifetime is healthy; a line that only grows means max_lifetime is off: connections never re-resolve the host or pick up server-side changes (a failover, new settings).",
          "s",
          [
            ["max by (db_client_connection_pool_name) (poolwatch_connection_oldest_age_seconds{%(sel)s})", "{{db_client_connection_pool_name}} oldest"],
          ],
        ),
      ],
    },
    {
      title: "Fleet: the ledger on every sample and across every replica",
      panels: [
        d.panel(
          "Client gap (pool open − established sockets), every sample",
          "Per instance: connections the pool counts minus its established TCP sockets, read on every sample from the kernel (no server cost). Above 0: slots whose connection the server or a pooler closed (a leaked slot, incident 1) or half-closed (close_wait). Below 0: sockets to the database the pool does not count, until the next census tells them apart. A change runs a server census at once.",
          "short",
          [
            ["max by (db_client_connection_pool_name, instance) (poolwatch_client_gap{%(sel)s})", "{{db_client_connection_pool_name}} {{instance}}"],
          ],
        ),
        d.panel(
          "Fleet gap per pool (all replicas believed − server real, via postgres_exporter)",
          "Per pool across every replica: what the pools believe open minus the server sessions postgres_exporter counts for the pool's stable tag (application_name). Needs alerts/fleet-gap.rules.yml and postgres_exporter with alerts/postgres_exporter/queries.yaml. Above 0 for 10 min: PoolwatchFleetGap; find the replica with the client gap above.",
          "short",
          [
            ["max by (db_client_connection_pool_name, application_name) (application_name:poolwatch_fleet_gap_connections:sum * on (application_name) group_left () max by (application_name) (poolwatch_pool_info{%(sel)s}))", "{{db_client_connection_pool_name}} ({{application_name}})"],
          ],
        ),
      ],
    },
  ]),
}
