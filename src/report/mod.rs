//! What culprit writes for people and programs: the trace report's schema, table and merge
//! ([`trace`]) its self-contained HTML page ([`html`]), the scan report ([`scan`]) and the dedup report ([`dedup`]). The audit, purge and eval reports live
//! with their commands; all of them share [`trace::OUTPUT_SCHEMA_VERSION`] (`docs/OUTPUT.md`).

pub mod dedup;
pub mod html;
pub mod scan;
pub mod trace;
