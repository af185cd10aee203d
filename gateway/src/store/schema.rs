//! The database schema, its version, and the epoch kept in the `meta` table.

use rusqlite::{Connection, OptionalExtension};

use super::error::StoreError;

/// The newest schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 3;

/// Schema version 1. Times are milliseconds since the Unix epoch; lifetimes are seconds.
///
/// Indexes are few on purpose: every index whose key is random (a lease id, a host identity)
/// makes each insert dirty a page of its own, and at thousands of grants per second those page
/// writes, not the rows, are the cost (measured: three such indexes halved the write rate).
/// So the audit trail is indexed by time only (it is appended in id and time order); queries by
/// host, application or lease scan backwards from the newest event or within a time range.
/// Leases have their id (primary key), live leases by expiry (restore, expiry timer) and ended
/// leases by end time (retention).
/// Names (states, kinds, outcomes) are stored as text so that an operator with `sqlite3` can
/// read the trail directly; the code decodes them strictly.
pub(crate) const SCHEMA_V1: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value ANY
) STRICT;

CREATE TABLE leases (
    id                 BLOB PRIMARY KEY NOT NULL,
    identity           TEXT NOT NULL,
    peer               TEXT,
    grants             TEXT NOT NULL,
    app_name           TEXT,
    app_exe            TEXT,
    app_uid            INTEGER,
    app_pid            INTEGER,
    requested_lifetime INTEGER,
    granted_lifetime   INTEGER NOT NULL,
    created_ms         INTEGER NOT NULL,
    renewed_ms         INTEGER,
    expires_ms         INTEGER NOT NULL,
    state              TEXT NOT NULL,
    ended_ms           INTEGER,
    end_by             TEXT,
    end_reason         TEXT,
    revoke_reason      INTEGER
) STRICT;
CREATE INDEX leases_live_by_expiry ON leases (expires_ms) WHERE state = 'live';
CREATE INDEX leases_ended_by_time ON leases (ended_ms) WHERE state <> 'live';

CREATE TABLE audit (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms          INTEGER NOT NULL,
    kind             TEXT NOT NULL,
    outcome          TEXT,
    identity         TEXT,
    peer             TEXT,
    lease            BLOB,
    has_request      INTEGER NOT NULL DEFAULT 0,
    protocol         INTEGER,
    port_first       INTEGER,
    port_last        INTEGER,
    app_id           TEXT,
    host             TEXT,
    remotes          TEXT,
    lifetime_asked   INTEGER,
    app_name         TEXT,
    app_exe          TEXT,
    app_uid          INTEGER,
    app_pid          INTEGER,
    grants           TEXT,
    lifetime_granted INTEGER,
    rule             TEXT,
    reason           TEXT,
    code             INTEGER,
    actor            TEXT
) STRICT;
CREATE INDEX audit_by_time ON audit (time_ms);
"#;

/// Version 2: each lease remembers the client certificate that last opened or renewed it, as a
/// CRL names it (the issuer's DER-encoded name and the serial in upper-case hex), so that a CRL
/// loaded after a restart still finds the leases a revoked certificate made while its host is
/// offline. Rows of version 1 keep both NULL: nothing is known of their certificate.
pub(crate) const MIGRATE_TO_V2: &str = r#"
ALTER TABLE leases ADD COLUMN cert_issuer BLOB;
ALTER TABLE leases ADD COLUMN cert_serial TEXT;
UPDATE meta SET value = 2 WHERE key = 'schema_version';
"#;

/// Version 3: the audit table's ids are no longer `AUTOINCREMENT`, which made every insert
/// read and rewrite the table's row in `sqlite_sequence` (measured: about 8 % of the
/// writer's time per grant). Ids are still never reused, even after every row was pruned: the
/// writer numbers each event one past the highest id it has used, and before a prune it keeps
/// that highest id in `meta` (`audit_last_id`), which the store reads back when it opens. The
/// trail is copied as it is; its next id continues from the old table's sequence.
pub(crate) const MIGRATE_TO_V3: &str = r#"
CREATE TABLE audit_v3 (
    id               INTEGER PRIMARY KEY,
    time_ms          INTEGER NOT NULL,
    kind             TEXT NOT NULL,
    outcome          TEXT,
    identity         TEXT,
    peer             TEXT,
    lease            BLOB,
    has_request      INTEGER NOT NULL DEFAULT 0,
    protocol         INTEGER,
    port_first       INTEGER,
    port_last        INTEGER,
    app_id           TEXT,
    host             TEXT,
    remotes          TEXT,
    lifetime_asked   INTEGER,
    app_name         TEXT,
    app_exe          TEXT,
    app_uid          INTEGER,
    app_pid          INTEGER,
    grants           TEXT,
    lifetime_granted INTEGER,
    rule             TEXT,
    reason           TEXT,
    code             INTEGER,
    actor            TEXT
) STRICT;
INSERT INTO audit_v3 SELECT * FROM audit;
INSERT INTO meta (key, value) VALUES ('audit_last_id', max(
    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit'), 0),
    coalesce((SELECT max(id) FROM audit), 0)))
    ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value);
DROP TABLE audit;
DELETE FROM sqlite_sequence WHERE name = 'audit';
ALTER TABLE audit_v3 RENAME TO audit;
CREATE INDEX audit_by_time ON audit (time_ms);
UPDATE meta SET value = 3 WHERE key = 'schema_version';
"#;

/// The migrations, in order, with what each does for error messages: entry `i` takes a store
/// from version `i + 1` to `i + 2`.
const MIGRATIONS: &[(&str, &str)] = &[
    ("migrate the schema to version 2", MIGRATE_TO_V2),
    ("migrate the schema to version 3", MIGRATE_TO_V3),
];
const _: () = assert!(
    MIGRATIONS.len() + 1 == SCHEMA_VERSION as usize,
    "one migration per version after the first"
);

/// Brings a store of schema `version` up to [`SCHEMA_VERSION`], inside the caller's
/// transaction, so that a failed migration leaves the old store as it was.
fn migrate(tx: &Connection, version: u32) -> Result<(), StoreError> {
    let first = usize::try_from(version.saturating_sub(1)).unwrap_or(usize::MAX);
    for &(what, step) in MIGRATIONS.iter().skip(first) {
        tx.execute_batch(step).map_err(StoreError::sqlite(what))?;
    }
    Ok(())
}

/// What [`prepare`] found or made.
pub(crate) struct Prepared {
    pub(crate) epoch: u64,
    pub(crate) created_ms: u64,
    pub(crate) new_state: bool,
}

/// Create the schema and the epoch in an empty database, or check an existing one.
pub(crate) fn prepare(conn: &mut Connection, now_ms: u64) -> Result<Prepared, StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite("begin schema transaction"))?;
    let has_meta: bool = tx
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'meta'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(StoreError::sqlite("look for the meta table"))?
        > 0;
    if !has_meta {
        let other_tables: i64 = tx
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(StoreError::sqlite("count tables"))?;
        if other_tables > 0 {
            return Err(StoreError::corrupt(
                "the database has tables but no meta table: it is not an FWNP store",
            ));
        }
        tx.execute_batch(SCHEMA_V1)
            .map_err(StoreError::sqlite("create schema"))?;
        let epoch = loop {
            // Zero is kept out so that "no epoch" can never be confused with a real one.
            let candidate: u64 = rand::random();
            if candidate != 0 {
                break candidate;
            }
        };
        let created = i64::try_from(now_ms).unwrap_or(i64::MAX);
        // A new store is made as version 1 and migrated like an old one: one path, always run.
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', 1), ('epoch', ?1), ('created_ms', ?2)",
            rusqlite::params![epoch_to_i64(epoch), created],
        )
        .map_err(StoreError::sqlite("write meta"))?;
        migrate(&tx, 1)?;
        tx.commit().map_err(StoreError::sqlite("commit schema"))?;
        return Ok(Prepared {
            epoch,
            created_ms: now_ms,
            new_state: true,
        });
    }
    let version = meta_integer(&tx, "schema_version")?;
    let version = u32::try_from(version).map_err(|_| {
        StoreError::corrupt(format!("schema_version {version} is not a version number"))
    })?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version < 1 {
        return Err(StoreError::corrupt(format!(
            "schema_version {version} never existed"
        )));
    }
    migrate(&tx, version)?;
    let epoch = epoch_from_i64(meta_integer(&tx, "epoch")?);
    if epoch == 0 {
        return Err(StoreError::corrupt("the epoch is 0"));
    }
    let created_ms = u64::try_from(meta_integer(&tx, "created_ms")?)
        .map_err(|_| StoreError::corrupt("created_ms is negative"))?;
    tx.commit()
        .map_err(StoreError::sqlite("commit schema check"))?;
    Ok(Prepared {
        epoch,
        created_ms,
        new_state: false,
    })
}

/// The highest audit id ever used: the newest row's, or the one kept in `meta` when a prune
/// took the newest rows away. The writer numbers the next event one past it.
pub(crate) fn last_audit_id(conn: &Connection) -> Result<u64, StoreError> {
    let newest: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) FROM audit", [], |r| r.get(0))
        .map_err(StoreError::sqlite("read newest audit id"))?;
    // Every store of version 3 has the key: the migration to it writes it.
    let kept = meta_integer(conn, "audit_last_id")?;
    let last = newest.max(kept);
    u64::try_from(last).map_err(|_| StoreError::corrupt(format!("audit id {last} is negative")))
}

fn meta_integer(conn: &Connection, key: &str) -> Result<i64, StoreError> {
    let value: Option<rusqlite::types::Value> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(StoreError::sqlite("read meta"))?;
    match value {
        Some(rusqlite::types::Value::Integer(v)) => Ok(v),
        Some(other) => Err(StoreError::corrupt(format!(
            "meta {key} is not an integer: {other:?}"
        ))),
        None => Err(StoreError::corrupt(format!("meta {key} is missing"))),
    }
}

/// The epoch is a u64; SQLite integers are i64: store the same 64 bits.
fn epoch_to_i64(epoch: u64) -> i64 {
    i64::from_ne_bytes(epoch.to_ne_bytes())
}

fn epoch_from_i64(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}
