//! The ledger: what the pool believes against what really exists (server sessions, the
//! process's own sockets), and how a session is attributed to one pool of one process.
pub mod attribution;
pub(crate) mod census;
pub(crate) mod client;
pub(crate) mod ended;
pub(crate) mod loss;
pub(crate) mod pooler;
pub(crate) mod retag;
pub(crate) mod send_queues;
pub(crate) mod snapshot;
pub(crate) mod sockets;
