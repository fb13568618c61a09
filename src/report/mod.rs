//! What culprit writes for people and programs: the trace report's schema, table and merge
//! ([`trace`]) its self-contained HTML page ([`html`]), and the scan report ([`scan`]). The audit, purge and eval reports live
//! with their commands; all of them share [`trace::OUTPUT_SCHEMA_VERSION`] (`docs/OUTPUT.md`).

pub mod html;
pub mod scan;
pub mod trace;
