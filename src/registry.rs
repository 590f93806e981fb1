//! Process-wide state, all of it here.
//!
//! Why there is any: sqlx's events carry no pool identity. Its connect, acquire and release
//! hooks and its acquire events say "a connection", never "of which pool", and a socket of
//! the process does not say which pool (or poolwatch itself) opened it. So poolwatch keeps,
//! for the whole process:
//! - the pools a live `PoolWatch` watches, by tag (`watch::registration`): one watch per pool;
//! - the figures the bare pool's hooks and acquire events feed, by pool name (`acquire::bare`);
//! - each watched pool's peers and ports, to tell its sockets from a sibling pool's or another
//!   client's (`ledger::client`);
//! - the local ports of poolwatch's own short-lived sockets, left out of every socket census
//!   (`ledger::sockets`);
//! - the live listeners, by pool name, for the health report (`listener::status`);
//! - poolwatch's own exporters, so a pool's end retires its series from each (`export::retire`).
//!
//! Each is a table of its owner's entry type, held here; the owner keeps the logic. A
//! handful of entries per table, each behind its own lock.

use std::any::{Any, TypeId};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// One table per entry type, created at its first use and kept for the process's life.
static TABLES: Mutex<Vec<(TypeId, &'static (dyn Any + Send + Sync))>> = Mutex::new(Vec::new());

/// The table of entries of type `T`, locked. A panic while it was held never locks it for
/// good: every entry is a plain record, valid between any two statements.
pub(crate) fn lock<T: Send + 'static>() -> MutexGuard<'static, Vec<T>> {
    table::<T>().lock().unwrap_or_else(PoisonError::into_inner)
}

fn table<T: Send + 'static>() -> &'static Mutex<Vec<T>> {
    let mut tables = TABLES.lock().unwrap_or_else(PoisonError::into_inner);
    let id = TypeId::of::<T>();
    // Found by its type's id, so the downcast always succeeds.
    if let Some(table) = tables.iter().find(|(k, _)| *k == id).and_then(|(_, t)| t.downcast_ref::<Mutex<Vec<T>>>()) {
        return table;
    }
    let table: &'static Mutex<Vec<T>> = Box::leak(Box::new(Mutex::new(Vec::new())));
    tables.push((id, table));
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct A(u32);
    #[derive(Debug, PartialEq)]
    struct B(u32);

    #[test]
    fn each_type_has_its_own_table() {
        lock::<A>().push(A(1));
        lock::<B>().push(B(2));
        lock::<A>().push(A(3));
        assert_eq!(*lock::<A>(), vec![A(1), A(3)]);
        assert_eq!(*lock::<B>(), vec![B(2)]);
    }

    #[test]
    fn a_panic_under_the_lock_leaves_the_table_usable() {
        struct C;
        let _ = std::thread::spawn(|| {
            let _held = lock::<C>();
            panic!("while held");
        })
        .join();
        lock::<C>().push(C);
        assert_eq!(lock::<C>().len(), 1);
    }
}
